// The calls of fleet's native gRPC transport: nghttp2's callbacks read each request (headers, gRPC's 5-byte
// framed messages, its end) into events for Python, and Python's replies become response headers, framed
// messages and trailers. Runs inside Server's pump and submit (h2_server.cpp); nothing here touches Python.
#include "h2_call.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

namespace fleet::h2 {

namespace {

// Answers of one stream held for a client that does not read them: past this the stream is reset.
constexpr size_t kMaxStreamBacklog = 64 << 20;
// gRPC status codes the transport answers itself.
constexpr int kInvalidArgument = 3, kResourceExhausted = 8, kUnimplemented = 12;

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

}  // namespace

nghttp2_session_callbacks *new_callbacks() {
  nghttp2_session_callbacks *callbacks = nullptr;
  nghttp2_session_callbacks_new(&callbacks);
  nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, on_data_chunk);
  nghttp2_session_callbacks_set_on_frame_send_callback(callbacks, on_frame_send);
  nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_stream_close);
  return callbacks;
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

}  // namespace fleet::h2
