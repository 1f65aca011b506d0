// fleet's native gRPC transport: an HTTP/2 (h2c, prior knowledge) server on libnghttp2 with gRPC's
// message framing, driven by its caller's thread (the replica's event loop): no thread of its own.
//
// The server's sockets sit in an epoll set of their own, whose descriptor (`poll_fd`) the event loop
// watches with `loop.add_reader`. When it is readable, `pump` reads and writes what is ready and returns
// complete events (a unary call: headers, its one message and the end of the request as one event);
// `submit` answers calls at once (nghttp2 frames them and they are sent before it returns). No request or
// answer crosses a thread: on two cores, the hand-over between an I/O thread and the loop (two eventfd
// wake-ups per call) cost more than the work it moved off the loop. Every call into a Server must come
// from one thread at a time (a mutex makes sure of it); none touches a Python object.
#pragma once

#include <nghttp2/nghttp2.h>
#include <sys/epoll.h>

#include <atomic>
#include <memory>
#include <cstdint>
#include <mutex>
#include <string>
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
  kStopped = 5,        // (): the server has stopped (after `stop`): every connection is closed
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
  enum Op : int { kSend, kConsume } op = kSend;
  uint64_t call = 0;
  bool has_data = false;
  std::string data;  // the message framed: a 0 flag byte, its 4-byte big-endian length, the message
  bool end = false;
  int status = 0;
  std::string details;
  Metadata trailers;
  size_t consumed = 0;  // kConsume
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

  // Binds and listens; an empty string, or what failed.
  std::string start();
  int bound_port() const { return port_; }
  // The epoll set's descriptor: readable while a socket is ready (or `pump` has events waiting).
  int poll_fd() const { return epoll_fd_; }
  // Serves what is ready without waiting; returns every event since the last call.
  std::vector<Event> pump();
  // Answers a call now (its frames are sent, or queued on a full socket).
  void submit(Reply &reply);
  // Stops accepting, sends GOAWAY; the server stops (a STOPPED event) at a `pump` once the calls in flight
  // have ended or grace_s has passed.
  void stop(double grace_s);
  bool running() const { return running_.load(); }
  Stats stats;

  // The calls' side (public for nghttp2's C callbacks).
  const Config config_;
  void push(Event &&event);
  void fail(Conn *c, Stream *st, int status, const std::string &details);
  void respond_http(Conn *c, Stream *st, int http_status);
  void request_headers(Conn *c, Stream *st);
  void request_end(Conn *c, Stream *st);
  void request_data(Conn *c, Stream *st, const uint8_t *data, size_t len);

 private:
  void deliver(Conn *c, Stream *st, int kind);  // the call's headers (and a unary call's message) to Python
  bool step();  // one epoll_wait without waiting, and what it found; false when epoll failed
  void flush_dirty();
  void finish();  // closes everything (its calls cancelled) and posts STOPPED
  void nudge();   // makes poll_fd readable, so that the loop pumps again
  void accept_all();
  void read_conn(Conn *c);
  bool flush(Conn *c);
  void close_conn(Conn *c);
  void apply(Reply &r);
  void answer(Conn *c, Stream *st, Reply &reply);
  void begin_stop(double grace_s);
  void set_out_interest(Conn *c, bool on);

  int listen_fd_ = -1, epoll_fd_ = -1, wake_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> running_{false};
  bool started_ = false;

  std::mutex mu_;  // held by pump, submit and stop
  std::unordered_map<uint32_t, Conn *> conns_;
  uint32_t next_conn_ = 2;  // 0: the listening socket, 1: the wake eventfd
  std::vector<Event> events_;  // since the last pump
  std::vector<epoll_event> ready_ = std::vector<epoll_event>(128);
  std::vector<uint32_t> dirty_list_;
  std::unordered_set<uint32_t> dirty_;
  bool stopping_ = false;
  double stop_deadline_ = 0.0;
  nghttp2_session_callbacks *callbacks_ = nullptr;
  nghttp2_option *option_ = nullptr;
};

double monotonic_s();

}  // namespace fleet::h2
