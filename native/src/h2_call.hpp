// The calls of fleet's native gRPC transport (h2_server.hpp): a connection, its streams, the nghttp2 callbacks
// that read requests, and gRPC's 5-byte message framing. Internal to native/src/h2_*.cpp.
#pragma once

#include <nghttp2/nghttp2.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "h2_server.hpp"

namespace fleet::h2 {

constexpr int32_t kWindow = 16 << 20;            // connection and stream receive windows
constexpr size_t kMaxMetadataBytes = 64 << 10;  // a call's request metadata

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

// The callbacks of every server session (h2_call.cpp); the caller owns them.
nghttp2_session_callbacks *new_callbacks();

}  // namespace fleet::h2
