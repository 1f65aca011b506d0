"""KServe v2 over gRPC: `inference.GRPCInferenceService` (the service `tritonclient.grpc` ships code for).

`codec` turns the protobuf messages into the HTTP path's `InferRequest` and back, `status` maps
fleet's errors to gRPC status codes, `handlers` answers each RPC through the same
`InferenceService` as HTTP. Each ingress replica serves them on a SO_REUSEPORT port with
`native_server` (fleet's native transport, `native._h2`: HTTP/2 on libnghttp2, driven by the event loop) when
it is built, else with grpc.aio (`server`, also chosen by `grpc_transport: grpcio`);
`server.make_grpc_listener` picks one.
"""
