"""Following a request through fleet: `tracing` (W3C traceparent, spans recorded on the request path and
exported by a thread), `otlp` (their OTLP/HTTP encoding), `logs` (fleet's loggers in the replicas' logs,
as text or JSON lines carrying request and trace ids)."""
