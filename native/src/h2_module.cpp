// `native._h2`: fleet's native gRPC transport (h2_server.hpp) as a Python class. Only these bindings
// touch Python objects, on the caller's thread. `poll`, `send` and `consume` keep the GIL: they never wait (every
// socket is non-blocking) and take microseconds, and giving the GIL up for that long hands it to the model's
// thread and then waits for it back, per call (as uvloop's transports keep it for their syscalls).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cstring>
#include <memory>

#include "h2_server.hpp"

namespace nb = nanobind;
using fleet::h2::Event;
using fleet::h2::Reply;
using fleet::h2::Server;

namespace {

PyObject *bytes_of(const std::string &s) { return PyBytes_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size())); }

PyObject *str_of(const std::string &s) {
  return PyUnicode_DecodeLatin1(s.data(), static_cast<Py_ssize_t>(s.size()), nullptr);
}

// One event as the tuple `native/_h2.pyi` describes.
PyObject *event_tuple(Event &e) {
  PyObject *call = PyLong_FromUnsignedLongLong(e.call);
  switch (e.kind) {
    case fleet::h2::kUnary:
    case fleet::h2::kStreamStart: {
      PyObject *md = PyList_New(static_cast<Py_ssize_t>(e.metadata.size()));
      for (size_t i = 0; i < e.metadata.size(); ++i)
        PyList_SET_ITEM(md, i, Py_BuildValue("(NN)", bytes_of(e.metadata[i].first), bytes_of(e.metadata[i].second)));
      PyObject *message = e.kind == fleet::h2::kUnary ? bytes_of(e.message) : Py_NewRef(Py_None);
      PyObject *deadline = e.deadline < 0 ? Py_NewRef(Py_None) : PyFloat_FromDouble(e.deadline);
      return Py_BuildValue("(iNNNNNN)", e.kind, call, str_of(e.path), md, message, str_of(*e.peer), deadline);
    }
    case fleet::h2::kStreamMessage:
      return Py_BuildValue("(iNNn)", e.kind, call, bytes_of(e.message), static_cast<Py_ssize_t>(e.wire_bytes));
    case fleet::h2::kStopped:
      Py_DECREF(call);
      return Py_BuildValue("(i)", e.kind);
    default:
      return Py_BuildValue("(iN)", e.kind, call);
  }
}

// (call, data: bytes | None, end, status, details, trailers: sequence of (str, str)) -> Reply.
Reply reply_of(nb::handle call, nb::handle data, bool end, int status, nb::handle details, nb::handle trailers) {
  Reply r;
  r.call = nb::cast<uint64_t>(call);
  if (!data.is_none()) {
    char *buf;
    Py_ssize_t len;
    if (PyBytes_AsStringAndSize(data.ptr(), &buf, &len) != 0) throw nb::python_error();
    if (static_cast<uint64_t>(len) > 0xffffffffu) throw nb::value_error("a gRPC message is at most 4 GiB");
    // framed here, in one allocation: the compressed flag (0) and the big-endian length, then the message
    const uint32_t size = static_cast<uint32_t>(len);
    r.has_data = true;
    r.data.resize(5 + static_cast<size_t>(len));
    r.data[0] = 0;
    r.data[1] = static_cast<char>(size >> 24);
    r.data[2] = static_cast<char>(size >> 16);
    r.data[3] = static_cast<char>(size >> 8);
    r.data[4] = static_cast<char>(size);
    std::memcpy(&r.data[5], buf, static_cast<size_t>(len));
  }
  r.end = end;
  r.status = status;
  if (!details.is_none()) r.details = nb::cast<std::string>(details);
  if (!trailers.is_none()) {
    for (nb::handle kv : trailers) {
      nb::handle key = kv[0], value = kv[1];
      std::string v;
      if (PyBytes_Check(value.ptr())) {
        v.assign(PyBytes_AS_STRING(value.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(value.ptr())));
      } else {
        v = nb::cast<std::string>(value);
      }
      r.trailers.emplace_back(nb::cast<std::string>(key), std::move(v));
    }
  }
  return r;
}

}  // namespace

NB_MODULE(_h2, m) {
  m.doc() = "fleet's native gRPC transport: HTTP/2 (libnghttp2) and gRPC framing, driven by the caller's event loop";
  m.attr("UNARY") = static_cast<int>(fleet::h2::kUnary);
  m.attr("STREAM_START") = static_cast<int>(fleet::h2::kStreamStart);
  m.attr("STREAM_MESSAGE") = static_cast<int>(fleet::h2::kStreamMessage);
  m.attr("STREAM_END") = static_cast<int>(fleet::h2::kStreamEnd);
  m.attr("CANCEL") = static_cast<int>(fleet::h2::kCancel);
  m.attr("STOPPED") = static_cast<int>(fleet::h2::kStopped);

  nb::class_<Server>(m, "Server")
      .def("__init__",
           [](Server *self, const std::string &host, int port, uint32_t max_message_bytes, uint32_t max_concurrent_streams,
              size_t max_connections, nb::iterable stream_paths) {
             fleet::h2::Config config;
             config.host = host;
             config.port = port;
             config.max_message_bytes = max_message_bytes;
             config.max_concurrent_streams = max_concurrent_streams;
             config.max_connections = max_connections;
             for (nb::handle p : stream_paths) config.stream_paths.insert(nb::cast<std::string>(p));
             new (self) Server(std::move(config));
           },
           nb::arg("host"), nb::arg("port"), nb::arg("max_message_bytes"), nb::arg("max_concurrent_streams"),
           nb::arg("max_connections"), nb::arg("stream_paths"))
      .def("start",
           [](Server &s) {
             std::string error;
             {
               nb::gil_scoped_release release;
               error = s.start();
             }
             if (!error.empty()) {
               PyErr_SetString(PyExc_OSError, error.c_str());
               throw nb::python_error();
             }
           },
           "Binds (SO_REUSEPORT) and listens; OSError when the address cannot be bound.")
      .def_prop_ro("port", &Server::bound_port)
      .def("fileno", &Server::poll_fd, "The epoll descriptor that is readable while `poll` has work to do.")
      .def("poll",
           [](Server &s) {
             std::vector<Event> events = s.pump();
             PyObject *out = PyList_New(static_cast<Py_ssize_t>(events.size()));
             if (out == nullptr) throw nb::python_error();
             for (size_t i = 0; i < events.size(); ++i) {
               PyObject *t = event_tuple(events[i]);
               if (t == nullptr) {
                 Py_DECREF(out);
                 throw nb::python_error();
               }
               PyList_SET_ITEM(out, i, t);
             }
             return nb::steal<nb::list>(out);
           },
           "Serves what is ready (reads, writes, accepts) without waiting; every event since the last call, as tuples "
           "(kind, call, ...); see the module's .pyi.")
      .def("send",
           [](Server &s, nb::handle call, nb::handle data, bool end, int status, nb::handle details,
              nb::handle trailers) {
             Reply r = reply_of(call, data, end, status, details, trailers);
             s.submit(r);
           },
           nb::arg("call"), nb::arg("data").none(), nb::arg("end"), nb::arg("status") = 0,
           nb::arg("details").none() = nb::none(), nb::arg("trailers").none() = nb::none(),
           "Answers `call` now: a message (`data`), and with `end` its status, details and trailers.")
      .def("consume",
           [](Server &s, uint64_t call, size_t nbytes) {
             Reply r;
             r.op = Reply::kConsume;
             r.call = call;
             r.consumed = nbytes;
             s.submit(r);
           },
           nb::arg("call"), nb::arg("nbytes"), "Reopens a stream's receive window by the wire bytes of messages read.")
      .def("stop",
           [](Server &s, double grace_s) {
             nb::gil_scoped_release release;
             s.stop(grace_s);
           },
           nb::arg("grace_s"),
           "Stops accepting and sends GOAWAY; a later `poll` posts a STOPPED event once the calls in flight have ended "
           "(or grace_s has passed), every connection closed.")
      .def_prop_ro("running", &Server::running)
      .def("stats", [](Server &s) {
        nb::dict d;
        d["connections_accepted"] = s.stats.connections_accepted.load();
        d["connections_refused"] = s.stats.connections_refused.load();
        d["connections_failed"] = s.stats.connections_failed.load();
        d["connections_open"] = s.stats.connections_open.load();
        d["calls_refused"] = s.stats.calls_refused.load();
        d["calls_cancelled"] = s.stats.calls_cancelled.load();
        d["replies_dropped"] = s.stats.replies_dropped.load();
        return d;
      });
}
