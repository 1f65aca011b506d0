// fleet's native gRPC transport (see h2_server.hpp): the listening socket, connections, epoll, and the
// events for Python and its replies (the calls themselves: h2_call.cpp). Nothing here touches Python.
#include "h2_server.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "h2_call.hpp"

namespace fleet::h2 {

namespace {

constexpr size_t kWriteChunk = 256 << 10;        // bytes gathered from nghttp2 before a send()
constexpr int kReadsPerWakeup = 16;              // reads of one connection before the others get a turn
constexpr uint64_t kListenKey = 0, kWakeKey = 1;

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

}  // namespace

double monotonic_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

Server::Server(Config config) : config_(std::move(config)) {}

Server::~Server() {
  if (running_) finish();
  for (int fd : {listen_fd_, epoll_fd_, wake_fd_})
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
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epoll_fd_ < 0 || wake_fd_ < 0) return std::string("epoll/eventfd: ") + std::strerror(errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenKey;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
  // Edge-triggered: every write of the wake eventfd is an edge, so it is never read (its counter would take 2^64
  // writes to fill). It is written when events wait for a pump that no socket would cause.
  ev.events = EPOLLIN | EPOLLET;
  ev.data.u64 = kWakeKey;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);

  callbacks_ = new_callbacks();
  nghttp2_option_new(&option_);
  nghttp2_option_set_no_auto_window_update(option_, 1);

  started_ = true;
  running_ = true;
  return "";
}

std::vector<Event> Server::pump() {
  std::lock_guard<std::mutex> lock(mu_);
  if (running_) {
    const bool ok = step();
    if (!ok || (stopping_ && (conns_.empty() || monotonic_s() >= stop_deadline_))) finish();
  }
  std::vector<Event> out;
  out.swap(events_);
  return out;
}

void Server::submit(Reply &reply) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!running_) {
    if (reply.op == Reply::kSend) stats.replies_dropped++;
    return;
  }
  apply(reply);
  flush_dirty();
  // a connection closed by this answer cancelled its other calls; a stopping server may be done
  if (!events_.empty() || stopping_) nudge();
}

void Server::stop(double grace_s) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!running_) return;
  begin_stop(grace_s);
  flush_dirty();
  nudge();
}

void Server::nudge() {
  const uint64_t one = 1;
  ssize_t ignored = ::write(wake_fd_, &one, sizeof one);
  (void)ignored;
}

void Server::push(Event &&event) { events_.push_back(std::move(event)); }

void Server::set_out_interest(Conn *c, bool on) {
  if (c->out_interest == on) return;
  c->out_interest = on;
  epoll_event ev{};
  ev.events = on ? (EPOLLIN | EPOLLOUT) : EPOLLIN;
  ev.data.u64 = c->id;
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, c->fd, &ev);
}

bool Server::step() {
  const int n = epoll_wait(epoll_fd_, ready_.data(), static_cast<int>(ready_.size()), 0);
  if (n < 0 && errno != EINTR) return false;
  for (int i = 0; i < n; ++i) {
    const uint64_t key = ready_[i].data.u64;
    if (key == kListenKey) {
      if (!stopping_) accept_all();
    } else if (key != kWakeKey) {  // (a wake-up only brings the loop here)
      auto it = conns_.find(static_cast<uint32_t>(key));
      if (it == conns_.end()) continue;
      Conn *c = it->second;
      if ((ready_[i].events & (EPOLLERR | EPOLLHUP)) != 0 && (ready_[i].events & EPOLLIN) == 0) {
        close_conn(c);
        continue;
      }
      if ((ready_[i].events & EPOLLIN) != 0) {
        read_conn(c);  // flushes or closes
      } else if ((ready_[i].events & EPOLLOUT) != 0) {
        if (!flush(c)) close_conn(c);
      }
    }
  }
  flush_dirty();
  return true;
}

void Server::flush_dirty() {
  if (dirty_.empty()) return;
  dirty_list_.assign(dirty_.begin(), dirty_.end());
  dirty_.clear();
  for (uint32_t id : dirty_list_) {  // (close_conn edits dirty_: walk a copy)
    auto it = conns_.find(id);
    if (it != conns_.end() && !flush(it->second)) close_conn(it->second);
  }
}

// Past the grace period (or an epoll failure): whatever is still open goes, its calls cancelled.
void Server::finish() {
  while (!conns_.empty()) close_conn(conns_.begin()->second);
  if (listen_fd_ >= 0) {
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
    ::close(listen_fd_);
    listen_fd_ = -1;
  }
  Event stopped;
  stopped.kind = kStopped;
  push(std::move(stopped));
  running_ = false;
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


void Server::apply(Reply &r) {
  auto it = conns_.find(static_cast<uint32_t>(r.call >> 32));
  if (it == conns_.end()) {
    if (r.op == Reply::kSend) stats.replies_dropped++;
    return;
  }
  Conn *c = it->second;
  const int32_t sid = static_cast<int32_t>(r.call & 0xffffffffu);
  auto st = c->streams.find(sid);
  if (st == c->streams.end()) {
    if (r.op == Reply::kSend) stats.replies_dropped++;
    return;
  }
  if (r.op == Reply::kConsume) {
    nghttp2_session_consume_stream(c->session, sid, r.consumed);
    dirty_.insert(c->id);
  } else {
    answer(c, st->second, r);
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
