// The I/O thread of fleet's native gRPC transport (see h2_server.hpp): sockets, nghttp2 sessions,
// gRPC's 5-byte message framing, and the queues to and from Python. Nothing here touches Python.
#include "h2_server.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace fleet::h2 {

namespace {

constexpr int32_t kWindow = 16 << 20;             // connection and stream receive windows
constexpr size_t kMaxMetadataBytes = 64 << 10;   // a call's request metadata
constexpr size_t kWriteChunk = 256 << 10;        // bytes gathered from nghttp2 before a send()
constexpr int kReadsPerWakeup = 16;              // reads of one connection before the others get a turn
constexpr uint64_t kListenKey = 0, kWakeKey = 1;
// Answers of one stream held for a client that does not read them: past this the stream is reset.
constexpr size_t kMaxStreamBacklog = 64 << 20;

// gRPC status codes the transport answers itself.
constexpr int kInvalidArgument = 3, kResourceExhausted = 8, kUnimplemented = 12;

}  // namespace

double monotonic_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

struct Stream {
  int32_t id = 0;
  bool is_post = false, streaming = false;
  bool delivered = false;      // Python knows the call (it must hear of its cancellation)
  bool finished = false;       // the end of the answer has been submitted: later replies are dropped
  bool errored = false;        // refused by the transport: its request data is discarded
  bool headers_sent = false, remote_closed = false, deferred = false, big_metadata = false;
  std::string path, timeout;
  bool grpc_content_type = false;  // content-type application/grpc, application/grpc+proto, ...
  Metadata metadata;
  size_t metadata_bytes = 0;
  double deadline = -1.0;
  // the request message being read
  uint8_t prefix[5] = {0, 0, 0, 0, 0};
  size_t prefix_have = 0;
  bool in_body = false;
  uint32_t need = 0;
  std::string body;
  int messages = 0;
  std::string unary_message;
  // the answer
  std::string out;
  size_t out_off = 0;
  bool out_end = false;
  int status = 0;
  std::string details;
  Metadata trailers;
};

struct Conn {
  uint32_t id = 0;
  int fd = -1;
  Server *server = nullptr;
  nghttp2_session *session = nullptr;
  std::shared_ptr<const std::string> peer;
  std::unordered_map<int32_t, Stream *> streams;
  std::string wbuf;
  size_t woff = 0;
  bool out_interest = false;
  bool closing = false;
  uint64_t call(int32_t stream_id) const { return (static_cast<uint64_t>(id) << 32) | static_cast<uint32_t>(stream_id); }
};

namespace {

nghttp2_nv nv(const std::string &name, const std::string &value) {
  return {reinterpret_cast<uint8_t *>(const_cast<char *>(name.data())),
          reinterpret_cast<uint8_t *>(const_cast<char *>(value.data())), name.size(), value.size(),
          NGHTTP2_NV_FLAG_NONE};
}

// grpc-message is percent-encoded: every byte outside 0x20..0x7e, and '%' itself.
std::string percent_encode(const std::string &s) {
  static const char hex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (unsigned char ch : s) {
    if (ch < 0x20 || ch > 0x7e || ch == '%') {
      out.push_back('%');
      out.push_back(hex[ch >> 4]);
      out.push_back(hex[ch & 15]);
    } else {
      out.push_back(static_cast<char>(ch));
    }
  }
  return out;
}

// grpc-timeout: 1 to 8 digits and a unit (H M S m u n); seconds, or < 0 when malformed.
double parse_timeout(const std::string &t) {
  if (t.size() < 2 || t.size() > 9) return -1.0;
  double value = 0;
  for (size_t i = 0; i + 1 < t.size(); ++i) {
    if (t[i] < '0' || t[i] > '9') return -1.0;
    value = value * 10 + (t[i] - '0');
  }
  switch (t.back()) {
    case 'H': return value * 3600.0;
    case 'M': return value * 60.0;
    case 'S': return value;
    case 'm': return value * 1e-3;
    case 'u': return value * 1e-6;
    case 'n': return value * 1e-9;
    default: return -1.0;
  }
}

std::string format_peer(const sockaddr_storage &addr) {
  char host[INET6_ADDRSTRLEN] = {0};
  if (addr.ss_family == AF_INET) {
    auto *a = reinterpret_cast<const sockaddr_in *>(&addr);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    return std::string("ipv4:") + host + ":" + std::to_string(ntohs(a->sin_port));
  }
  if (addr.ss_family == AF_INET6) {
    auto *a = reinterpret_cast<const sockaddr_in6 *>(&addr);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    return std::string("ipv6:[") + host + "]:" + std::to_string(ntohs(a->sin6_port));
  }
  return "unknown";
}

Stream *stream_of(nghttp2_session *session, int32_t id) {
  return static_cast<Stream *>(nghttp2_session_get_stream_user_data(session, id));
}

// Metadata names go out lower-case (HTTP/2 refuses upper-case names).
void lower_names(Metadata &md) {
  for (auto &kv : md)
    for (char &ch : kv.first)
      if (ch >= 'A' && ch <= 'Z') ch = static_cast<char>(ch - 'A' + 'a');
}

void submit_trailers(nghttp2_session *session, Stream *st) {
  const std::string status_name = "grpc-status", message_name = "grpc-message";
  const std::string status = std::to_string(st->status), message = percent_encode(st->details);
  std::vector<nghttp2_nv> nva;
  nva.reserve(2 + st->trailers.size());
  nva.push_back(nv(status_name, status));
  if (!message.empty()) nva.push_back(nv(message_name, message));
  for (auto &kv : st->trailers) nva.push_back(nv(kv.first, kv.second));
  nghttp2_submit_trailer(session, st->id, nva.data(), nva.size());
}

ssize_t read_answer(nghttp2_session *session, int32_t, uint8_t *buf, size_t length, uint32_t *flags,
                    nghttp2_data_source *source, void *) {
  auto *st = static_cast<Stream *>(source->ptr);
  const size_t avail = st->out.size() - st->out_off;
  if (avail == 0 && !st->out_end) {
    st->deferred = true;
    return NGHTTP2_ERR_DEFERRED;
  }
  const size_t n = std::min(avail, length);
  if (n > 0) std::memcpy(buf, st->out.data() + st->out_off, n);
  st->out_off += n;
  if (st->out_off == st->out.size()) {
    st->out.clear();
    st->out_off = 0;
    if (st->out_end) {
      *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
      submit_trailers(session, st);
    }
  }
  return static_cast<ssize_t>(n);
}

int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
  if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  auto *c = static_cast<Conn *>(user);
  auto *st = new Stream();
  st->id = frame->hd.stream_id;
  c->streams[st->id] = st;
  nghttp2_session_set_stream_user_data(session, st->id, st);
  return 0;
}

bool is(const uint8_t *name, size_t len, const char *literal) {
  const size_t n = std::strlen(literal);
  return len == n && std::memcmp(name, literal, n) == 0;
}

int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
              const uint8_t *value, size_t valuelen, uint8_t, void *) {
  if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;  // trailers
  Stream *st = stream_of(session, frame->hd.stream_id);
  if (st == nullptr) return 0;
  const char *v = reinterpret_cast<const char *>(value);
  if (namelen > 0 && name[0] == ':') {
    if (is(name, namelen, ":method")) st->is_post = valuelen == 4 && std::memcmp(v, "POST", 4) == 0;
    else if (is(name, namelen, ":path")) st->path.assign(v, valuelen);
    return 0;
  }
  if (is(name, namelen, "content-type")) {
    st->grpc_content_type = valuelen >= 16 && std::memcmp(v, "application/grpc", 16) == 0 &&
                            (valuelen == 16 || v[16] == '+' || v[16] == ';');
    return 0;
  }
  if (is(name, namelen, "grpc-timeout")) { st->timeout.assign(v, valuelen); return 0; }
  if (is(name, namelen, "te") || is(name, namelen, "grpc-encoding") || is(name, namelen, "grpc-accept-encoding"))
    return 0;
  st->metadata_bytes += namelen + valuelen + 32;
  if (st->metadata_bytes > kMaxMetadataBytes) {
    st->big_metadata = true;
    return 0;
  }
  st->metadata.emplace_back(std::string(reinterpret_cast<const char *>(name), namelen), std::string(v, valuelen));
  return 0;
}

int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
  auto *c = static_cast<Conn *>(user);
  if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
  Stream *st = stream_of(session, frame->hd.stream_id);
  if (st == nullptr) return 0;
  if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST)
    c->server->request_headers(c, st);
  if ((frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0) c->server->request_end(c, st);
  return 0;
}

int on_data_chunk(nghttp2_session *session, uint8_t, int32_t stream_id, const uint8_t *data, size_t len,
                  void *user) {
  auto *c = static_cast<Conn *>(user);
  Stream *st = stream_of(session, stream_id);
  if (st == nullptr || !st->streaming || st->errored || st->finished) {
    // unary calls are bounded by max_message_bytes: their window reopens at once
    nghttp2_session_consume(session, stream_id, len);
  } else {
    // a stream's window reopens as Python reads its messages (`consume`): its backlog is bounded
    nghttp2_session_consume_connection(session, len);
  }
  if (st != nullptr && !st->errored && !st->finished) c->server->request_data(c, st, data, len);
  return 0;
}

int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
  if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
    static_cast<Conn *>(user)->server->stats.connections_failed++;  // the client broke the protocol
    return 0;
  }
  // An answer that ended before the request did: reset the rest of the request (NO_ERROR), as grpc-core does.
  if ((frame->hd.type == NGHTTP2_HEADERS || frame->hd.type == NGHTTP2_DATA) &&
      (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0) {
    Stream *st = stream_of(session, frame->hd.stream_id);
    if (st != nullptr && !st->remote_closed)
      nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_NO_ERROR);
  }
  return 0;
}

int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t, void *user) {
  auto *c = static_cast<Conn *>(user);
  if (c->closing) return 0;
  Stream *st = stream_of(session, stream_id);
  if (st == nullptr) return 0;
  if (st->delivered && !st->finished) {
    Event e;
    e.kind = kCancel;
    e.call = c->call(stream_id);
    c->server->push(std::move(e));
    c->server->stats.calls_cancelled++;
  }
  nghttp2_session_set_stream_user_data(session, stream_id, nullptr);
  c->streams.erase(stream_id);
  delete st;
  return 0;
}

// Moves `items` onto the shared queue `to` under `mu`; the eventfd is written only when `to` was empty (its
// reader takes the whole queue, so one wake-up per batch).
template <typename T>
void hand_over(std::mutex &mu, std::vector<T> &to, std::vector<T> &items, int fd) {
  if (items.empty()) return;
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu);
    wake = to.empty();
    if (wake) {
      to.swap(items);
    } else {
      for (auto &item : items) to.push_back(std::move(item));
    }
  }
  items.clear();
  items.reserve(64);  // (a swap left it the reader's empty vector)
  if (wake) {
    const uint64_t one = 1;
    ssize_t ignored = ::write(fd, &one, sizeof one);
    (void)ignored;
  }
}

}  // namespace

Server::Server(Config config) : config_(std::move(config)) {}

Server::~Server() {
  if (thread_.joinable()) {
    stop(0.0);
    thread_.join();
  }
  for (int fd : {listen_fd_, epoll_fd_, events_fd_, wake_fd_})
    if (fd >= 0) ::close(fd);
  if (callbacks_ != nullptr) nghttp2_session_callbacks_del(callbacks_);
  if (option_ != nullptr) nghttp2_option_del(option_);
}

std::string Server::start() {
  if (started_) return "the server was started already";
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  const std::string port = std::to_string(config_.port);
  const int rc = getaddrinfo(config_.host.empty() ? nullptr : config_.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return "cannot resolve " + config_.host + ": " + gai_strerror(rc);
  int fd = ::socket(res->ai_family, res->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, res->ai_protocol);
  std::string error;
  if (fd < 0) {
    error = std::string("socket: ") + std::strerror(errno);
  } else {
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (::bind(fd, res->ai_addr, res->ai_addrlen) != 0) error = std::string("bind: ") + std::strerror(errno);
    else if (::listen(fd, 1024) != 0) error = std::string("listen: ") + std::strerror(errno);
  }
  freeaddrinfo(res);
  if (!error.empty()) {
    if (fd >= 0) ::close(fd);
    return error;
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof bound;
  getsockname(fd, reinterpret_cast<sockaddr *>(&bound), &len);
  port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6 *>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in *>(&bound)->sin_port);
  listen_fd_ = fd;
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  events_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epoll_fd_ < 0 || events_fd_ < 0 || wake_fd_ < 0) return std::string("epoll/eventfd: ") + std::strerror(errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenKey;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
  // Edge-triggered: every write of the wake eventfd is an edge, so it is never read (a syscall saved per wake-up;
  // its counter would take 2^64 writes to fill).
  ev.events = EPOLLIN | EPOLLET;
  ev.data.u64 = kWakeKey;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);

  nghttp2_session_callbacks_new(&callbacks_);
  nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks_, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(callbacks_, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks_, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks_, on_data_chunk);
  nghttp2_session_callbacks_set_on_frame_send_callback(callbacks_, on_frame_send);
  nghttp2_session_callbacks_set_on_stream_close_callback(callbacks_, on_stream_close);
  nghttp2_option_new(&option_);
  nghttp2_option_set_no_auto_window_update(option_, 1);

  started_ = true;
  running_ = true;
  thread_ = std::thread([this] { run(); });
  return "";
}

std::vector<Event> Server::take() {
  uint64_t count;
  ssize_t ignored = ::read(events_fd_, &count, sizeof count);  // EAGAIN when nothing is pending
  (void)ignored;
  std::vector<Event> out;
  std::lock_guard<std::mutex> lock(events_mu_);
  out.swap(events_);
  return out;
}

void Server::submit(std::vector<Reply> &&replies) { hand_over(replies_mu_, replies_, replies, wake_fd_); }

void Server::stop(double grace_s) {
  if (!started_) return;
  Reply r;
  r.op = Reply::kStop;
  r.grace_s = grace_s;
  std::vector<Reply> v;
  v.push_back(std::move(r));
  submit(std::move(v));
}

void Server::join() {
  if (thread_.joinable()) thread_.join();
}

void Server::push(Event &&event) { local_events_.push_back(std::move(event)); }

void Server::publish() { hand_over(events_mu_, events_, local_events_, events_fd_); }

void Server::set_out_interest(Conn *c, bool on) {
  if (c->out_interest == on) return;
  c->out_interest = on;
  epoll_event ev{};
  ev.events = on ? (EPOLLIN | EPOLLOUT) : EPOLLIN;
  ev.data.u64 = c->id;
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, c->fd, &ev);
}

void Server::run() {
  pthread_setname_np(pthread_self(), "fleet-grpc-io");
  std::vector<epoll_event> evs(128);
  std::vector<Reply> replies;
  std::vector<uint32_t> dirty_list;
  for (;;) {
    int timeout_ms = -1;
    if (stopping_) {
      if (conns_.empty()) break;
      const double left = stop_deadline_ - monotonic_s();
      if (left <= 0) break;
      timeout_ms = static_cast<int>(left * 1000) + 1;
    }
    const int n = epoll_wait(epoll_fd_, evs.data(), static_cast<int>(evs.size()), timeout_ms);
    if (n < 0 && errno != EINTR) break;
    for (int i = 0; i < n; ++i) {
      const uint64_t key = evs[i].data.u64;
      if (key == kListenKey) {
        if (!stopping_) accept_all();
      } else if (key == kWakeKey) {
        {
          std::lock_guard<std::mutex> lock(replies_mu_);
          replies.swap(replies_);
        }
        apply(replies);
        replies.clear();
      } else {
        auto it = conns_.find(static_cast<uint32_t>(key));
        if (it == conns_.end()) continue;
        Conn *c = it->second;
        if ((evs[i].events & (EPOLLERR | EPOLLHUP)) != 0 && (evs[i].events & EPOLLIN) == 0) {
          close_conn(c);
          continue;
        }
        if ((evs[i].events & EPOLLIN) != 0) {
          read_conn(c);  // flushes or closes
        } else if ((evs[i].events & EPOLLOUT) != 0) {
          if (!flush(c)) close_conn(c);
        }
      }
    }
    dirty_list.assign(dirty_.begin(), dirty_.end());
    dirty_.clear();
    for (uint32_t id : dirty_list) {  // (close_conn edits dirty_: walk a copy)
      auto it = conns_.find(id);
      if (it != conns_.end() && !flush(it->second)) close_conn(it->second);
    }
    publish();
  }
  // Past the grace period (or an epoll failure): whatever is still open goes, its calls cancelled.
  while (!conns_.empty()) close_conn(conns_.begin()->second);
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    listen_fd_ = -1;
  }
  Event stopped;
  stopped.kind = kStopped;
  push(std::move(stopped));
  running_ = false;
  publish();
}

void Server::accept_all() {
  for (;;) {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    const int fd = accept4(listen_fd_, reinterpret_cast<sockaddr *>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // EAGAIN, or out of descriptors (tried again at the next readiness)
    }
    if (conns_.size() >= config_.max_connections) {
      stats.connections_refused++;
      ::close(fd);
      continue;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    auto *c = new Conn();
    c->id = next_conn_++;
    if (next_conn_ < 2) next_conn_ = 2;
    c->fd = fd;
    c->server = this;
    c->peer = std::make_shared<const std::string>(format_peer(addr));
    nghttp2_session_server_new2(&c->session, callbacks_, c, option_);
    const nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, config_.max_concurrent_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, static_cast<uint32_t>(kWindow)},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, static_cast<uint32_t>(kMaxMetadataBytes * 2)},
    };
    nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, settings, sizeof settings / sizeof settings[0]);
    nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, kWindow);
    conns_[c->id] = c;
    stats.connections_accepted++;
    stats.connections_open++;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = c->id;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
    if (!flush(c)) close_conn(c);
  }
}

void Server::read_conn(Conn *c) {
  uint8_t buf[65536];
  for (int i = 0; i < kReadsPerWakeup; ++i) {
    const ssize_t r = ::recv(c->fd, buf, sizeof buf, 0);
    if (r == 0) {
      close_conn(c);
      return;
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      close_conn(c);
      return;
    }
    const ssize_t used = nghttp2_session_mem_recv(c->session, buf, static_cast<size_t>(r));
    if (used < 0) {  // a bad preface or framing: what nghttp2 queued (a GOAWAY) goes out, then the connection
      stats.connections_failed++;
      flush(c);
      close_conn(c);
      return;
    }
    if (static_cast<size_t>(r) < sizeof buf) break;
  }
  if (!flush(c)) close_conn(c);
}

bool Server::flush(Conn *c) {
  for (;;) {
    while (c->wbuf.size() - c->woff < kWriteChunk) {
      const uint8_t *data = nullptr;
      const ssize_t n = nghttp2_session_mem_send(c->session, &data);
      if (n < 0) return false;
      if (n == 0) break;
      c->wbuf.append(reinterpret_cast<const char *>(data), static_cast<size_t>(n));
    }
    if (c->woff == c->wbuf.size()) {
      c->wbuf.clear();
      c->woff = 0;
      break;
    }
    const ssize_t w = ::send(c->fd, c->wbuf.data() + c->woff, c->wbuf.size() - c->woff, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        set_out_interest(c, true);
        return true;
      }
      return false;
    }
    c->woff += static_cast<size_t>(w);
    if (c->woff < c->wbuf.size()) {
      set_out_interest(c, true);
      return true;
    }
    c->wbuf.clear();
    c->woff = 0;
  }
  set_out_interest(c, false);
  return nghttp2_session_want_read(c->session) != 0 || nghttp2_session_want_write(c->session) != 0;
}

void Server::close_conn(Conn *c) {
  c->closing = true;
  for (auto &kv : c->streams) {
    Stream *st = kv.second;
    if (st->delivered && !st->finished) {
      Event e;
      e.kind = kCancel;
      e.call = c->call(st->id);
      push(std::move(e));
      stats.calls_cancelled++;
    }
    delete st;
  }
  c->streams.clear();
  nghttp2_session_del(c->session);
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c->fd, nullptr);
  ::close(c->fd);
  conns_.erase(c->id);
  dirty_.erase(c->id);
  stats.connections_open--;
  delete c;
}

void Server::request_headers(Conn *c, Stream *st) {
  if (!st->is_post) {
    respond_http(c, st, 405);
    return;
  }
  if (!st->grpc_content_type) {
    respond_http(c, st, 415);
    return;
  }
  if (st->big_metadata) {
    fail(c, st, kResourceExhausted, "request metadata larger than " + std::to_string(kMaxMetadataBytes) + " bytes");
    return;
  }
  if (!st->timeout.empty()) {
    const double t = parse_timeout(st->timeout);
    if (t < 0) {
      fail(c, st, kInvalidArgument, "malformed grpc-timeout: " + st->timeout);
      return;
    }
    st->deadline = monotonic_s() + t;
  }
  st->streaming = config_.stream_paths.count(st->path) != 0;
  if (st->streaming) deliver(c, st, kStreamStart);
}

void Server::deliver(Conn *c, Stream *st, int kind) {
  Event e;
  e.kind = kind;
  e.call = c->call(st->id);
  e.path = std::move(st->path);
  e.metadata = std::move(st->metadata);
  e.message = std::move(st->unary_message);
  e.peer = c->peer;
  e.deadline = st->deadline;
  push(std::move(e));
  st->delivered = true;
}

void Server::request_data(Conn *c, Stream *st, const uint8_t *data, size_t len) {
  while (len > 0 && !st->errored && !st->finished) {
    if (!st->in_body) {
      const size_t take = std::min(len, sizeof st->prefix - st->prefix_have);
      std::memcpy(st->prefix + st->prefix_have, data, take);
      st->prefix_have += take;
      data += take;
      len -= take;
      if (st->prefix_have < sizeof st->prefix) return;
      const uint32_t size = (static_cast<uint32_t>(st->prefix[1]) << 24) | (static_cast<uint32_t>(st->prefix[2]) << 16) |
                            (static_cast<uint32_t>(st->prefix[3]) << 8) | static_cast<uint32_t>(st->prefix[4]);
      if ((st->prefix[0] & 1) != 0) {
        fail(c, st, kUnimplemented, "compressed messages are not supported");
        return;
      }
      if (size > config_.max_message_bytes) {
        fail(c, st, kResourceExhausted, "Received message larger than max (" + std::to_string(size) + " vs. " +
                                            std::to_string(config_.max_message_bytes) + ")");
        return;
      }
      if (!st->streaming && st->messages > 0) {
        fail(c, st, kInvalidArgument, "a unary call takes one request message; the client sent more");
        return;
      }
      st->in_body = true;
      st->need = size;
      st->body.clear();
      st->body.reserve(size);
    } else {
      const size_t take = std::min(len, static_cast<size_t>(st->need) - st->body.size());
      st->body.append(reinterpret_cast<const char *>(data), take);
      data += take;
      len -= take;
    }
    if (st->in_body && st->body.size() == st->need) {  // a whole message
      st->in_body = false;
      st->prefix_have = 0;
      st->messages++;
      if (st->streaming) {
        Event e;
        e.kind = kStreamMessage;
        e.call = c->call(st->id);
        e.wire_bytes = 5 + st->body.size();
        e.message = std::move(st->body);
        st->body = std::string();
        push(std::move(e));
      } else {
        st->unary_message = std::move(st->body);
        st->body = std::string();
      }
    }
  }
}

void Server::request_end(Conn *c, Stream *st) {
  st->remote_closed = true;
  if (st->errored || st->finished) return;
  if (st->in_body || st->prefix_have > 0) {
    fail(c, st, kInvalidArgument, "the request ended inside a message");
    return;
  }
  if (st->streaming) {
    Event e;
    e.kind = kStreamEnd;
    e.call = c->call(st->id);
    push(std::move(e));
    return;
  }
  if (st->messages == 0) {
    fail(c, st, kInvalidArgument, "a unary call takes one request message; the client sent none");
    return;
  }
  deliver(c, st, kUnary);
}

void Server::respond_http(Conn *c, Stream *st, int http_status) {
  const std::string status_name = ":status", status = std::to_string(http_status);
  nghttp2_nv nva[] = {nv(status_name, status)};
  nghttp2_submit_response(c->session, st->id, nva, 1, nullptr);
  st->errored = st->finished = st->headers_sent = true;
  stats.calls_refused++;
  dirty_.insert(c->id);
}

void Server::fail(Conn *c, Stream *st, int status, const std::string &details) {
  const bool tell_python = st->delivered && !st->finished;
  st->errored = true;
  stats.calls_refused++;
  Reply r;
  r.end = true;
  r.status = status;
  r.details = details;
  answer(c, st, r);
  if (tell_python) {
    Event e;
    e.kind = kCancel;
    e.call = c->call(st->id);
    push(std::move(e));
  }
}

void Server::answer(Conn *c, Stream *st, Reply &r) {
  if (st->finished) {
    stats.replies_dropped++;
    return;
  }
  dirty_.insert(c->id);
  if (r.has_data) {  // r.data: the framed message (prefix and all, see frame_message)
    if (st->out.empty()) {
      st->out.swap(r.data);
      st->out_off = 0;
    } else {
      st->out.append(r.data);
    }
    if (st->streaming && st->out.size() - st->out_off > kMaxStreamBacklog) {
      nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_ENHANCE_YOUR_CALM);
      st->out.clear();
      st->out_off = 0;
      st->finished = st->errored = true;
      stats.calls_refused++;
      Event e;
      e.kind = kCancel;
      e.call = c->call(st->id);
      push(std::move(e));
      return;
    }
  }
  if (r.end) {
    st->out_end = true;
    st->finished = true;
    st->status = r.status;
    st->details = std::move(r.details);
    st->trailers = std::move(r.trailers);
    lower_names(st->trailers);
  }
  if (!st->headers_sent) {
    st->headers_sent = true;
    const std::string status_name = ":status", ok = "200", ct_name = "content-type", ct = "application/grpc";
    if (r.end && st->out.empty()) {  // trailers-only
      const std::string gs_name = "grpc-status", gm_name = "grpc-message";
      const std::string gs = std::to_string(st->status), gm = percent_encode(st->details);
      std::vector<nghttp2_nv> nva = {nv(status_name, ok), nv(ct_name, ct), nv(gs_name, gs)};
      if (!gm.empty()) nva.push_back(nv(gm_name, gm));
      for (auto &kv : st->trailers) nva.push_back(nv(kv.first, kv.second));
      nghttp2_submit_response(c->session, st->id, nva.data(), nva.size(), nullptr);
      return;
    }
    nghttp2_nv nva[] = {nv(status_name, ok), nv(ct_name, ct)};
    nghttp2_data_provider provider;
    provider.source.ptr = st;
    provider.read_callback = read_answer;
    nghttp2_submit_response(c->session, st->id, nva, 2, &provider);
    return;
  }
  if (st->deferred) {
    st->deferred = false;
    nghttp2_session_resume_data(c->session, st->id);
  }
}

void Server::apply(std::vector<Reply> &replies) {
  for (auto &r : replies) {
    if (r.op == Reply::kStop) {
      begin_stop(r.grace_s);
      continue;
    }
    auto it = conns_.find(static_cast<uint32_t>(r.call >> 32));
    if (it == conns_.end()) {
      if (r.op == Reply::kSend) stats.replies_dropped++;
      continue;
    }
    Conn *c = it->second;
    const int32_t sid = static_cast<int32_t>(r.call & 0xffffffffu);
    auto st = c->streams.find(sid);
    if (st == c->streams.end()) {
      if (r.op == Reply::kSend) stats.replies_dropped++;
      continue;
    }
    if (r.op == Reply::kConsume) {
      nghttp2_session_consume_stream(c->session, sid, r.consumed);
      dirty_.insert(c->id);
    } else {
      answer(c, st->second, r);
    }
  }
}

void Server::begin_stop(double grace_s) {
  const double deadline = monotonic_s() + std::max(0.0, grace_s);
  if (stopping_) {
    stop_deadline_ = std::min(stop_deadline_, deadline);
    return;
  }
  stopping_ = true;
  stop_deadline_ = deadline;
  if (listen_fd_ >= 0) {
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
    ::close(listen_fd_);
    listen_fd_ = -1;
  }
  for (auto &kv : conns_) {
    Conn *c = kv.second;
    nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(c->session),
                          NGHTTP2_NO_ERROR, nullptr, 0);
    dirty_.insert(c->id);
  }
}

}  // namespace fleet::h2
