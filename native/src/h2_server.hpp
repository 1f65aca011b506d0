// fleet's native gRPC transport: an HTTP/2 (h2c, prior knowledge) server on libnghttp2 with gRPC's
// message framing, run by one I/O thread (epoll) that never touches a Python object.
//
// Python sees complete events (a unary call: headers, its one message and the end of the request as one
// event) through an eventfd it watches with `loop.add_reader`, takes every pending event in one call,
// and answers with `send`/`send_many`, which queue the replies and wake the I/O thread (a second
// eventfd). Every nghttp2 call is made on the I/O thread.
#pragma once

#include <nghttp2/nghttp2.h>

#include <atomic>
#include <memory>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace fleet::h2 {

using Metadata = std::vector<std::pair<std::string, std::string>>;

enum EventKind : int {
  kUnary = 0,          // (call, path, metadata, message, peer, deadline): a whole unary call
  kStreamStart = 1,    // (call, path, metadata, None, peer, deadline): a streaming call's headers
  kStreamMessage = 2,  // (call, message, wire bytes to acknowledge with `consume`)
  kStreamEnd = 3,      // (call,): the client half-closed its stream
  kCancel = 4,         // (call,): the client reset the call or its connection went; it takes no answer
  kStopped = 5,        // (): the I/O thread has ended (after `stop`)
};

struct Event {
  int kind = 0;
  uint64_t call = 0;
  std::string path;
  Metadata metadata;
  std::string message;
  std::shared_ptr<const std::string> peer;  // the connection's, shared by its calls
  double deadline = -1.0;  // CLOCK_MONOTONIC seconds (Python's time.monotonic()); < 0: none
  size_t wire_bytes = 0;
};

// A reply from Python: a message (`has_data`), the end of the call with its status, or both.
struct Reply {
  enum Op : int { kSend, kConsume, kStop } op = kSend;
  uint64_t call = 0;
  bool has_data = false;
  std::string data;  // the message framed: a 0 flag byte, its 4-byte big-endian length, the message
  bool end = false;
  int status = 0;
  std::string details;
  Metadata trailers;
  size_t consumed = 0;   // kConsume
  double grace_s = 0.0;  // kStop
};

struct Config {
  std::string host;
  int port = 0;
  uint32_t max_message_bytes = 4 << 20;
  uint32_t max_concurrent_streams = 100;
  size_t max_connections = 4096;
  std::unordered_set<std::string> stream_paths;  // methods with a streaming request (every other: unary)
};

struct Stats {
  std::atomic<uint64_t> connections_accepted{0};
  std::atomic<uint64_t> connections_refused{0};   // beyond max_connections
  std::atomic<uint64_t> connections_failed{0};    // closed for a protocol error (bad preface, bad framing)
  std::atomic<uint64_t> calls_refused{0};         // answered by the transport (bad message, content-type ...)
  std::atomic<uint64_t> calls_cancelled{0};       // reset by the client or lost with their connection
  std::atomic<uint64_t> replies_dropped{0};       // replies for calls that had gone
  std::atomic<uint64_t> connections_open{0};
};

struct Conn;
struct Stream;

class Server {
 public:
  explicit Server(Config config);
  ~Server();
  Server(const Server &) = delete;
  Server &operator=(const Server &) = delete;

  // Binds, listens and starts the I/O thread; an empty string, or what failed.
  std::string start();
  int bound_port() const { return port_; }
  int events_fd() const { return events_fd_; }
  // Every pending event (clears the eventfd first, so a later event makes it readable again).
  std::vector<Event> take();
  void submit(std::vector<Reply> &&replies);
  // Stops accepting, sends GOAWAY, ends when the calls in flight have ended or after grace_s.
  void stop(double grace_s);
  void join();
  bool running() const { return running_.load(); }
  Stats stats;

  // The I/O thread's side (public for nghttp2's C callbacks).
  const Config config_;
  void push(Event &&event);
  void fail(Conn *c, Stream *st, int status, const std::string &details);
  void respond_http(Conn *c, Stream *st, int http_status);
  void request_headers(Conn *c, Stream *st);
  void request_end(Conn *c, Stream *st);
  void request_data(Conn *c, Stream *st, const uint8_t *data, size_t len);

 private:
  void deliver(Conn *c, Stream *st, int kind);  // the call's headers (and a unary call's message) to Python
  void run();
  void accept_all();
  void read_conn(Conn *c);
  bool flush(Conn *c);
  void close_conn(Conn *c);
  void apply(std::vector<Reply> &replies);
  void answer(Conn *c, Stream *st, Reply &reply);
  void begin_stop(double grace_s);
  void publish();
  void set_out_interest(Conn *c, bool on);

  int listen_fd_ = -1, epoll_fd_ = -1, events_fd_ = -1, wake_fd_ = -1;
  int port_ = 0;
  std::thread thread_;
  std::atomic<bool> running_{false};
  bool started_ = false;

  // I/O thread only
  std::unordered_map<uint32_t, Conn *> conns_;
  uint32_t next_conn_ = 2;  // 0: the listening socket, 1: the wake eventfd
  std::vector<Event> local_events_;
  std::unordered_set<uint32_t> dirty_;
  bool stopping_ = false;
  double stop_deadline_ = 0.0;
  nghttp2_session_callbacks *callbacks_ = nullptr;
  nghttp2_option *option_ = nullptr;

  std::mutex events_mu_;
  std::vector<Event> events_;
  std::mutex replies_mu_;
  std::vector<Reply> replies_;
};

double monotonic_s();

}  // namespace fleet::h2
