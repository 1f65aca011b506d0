"""KServe v2 over gRPC: `inference.GRPCInferenceService` (the service `tritonclient.grpc` ships code for).

`codec` turns the protobuf messages into the HTTP path's `InferRequest` and back, `status` maps
fleet's errors to gRPC status codes, `handlers` answers each RPC through the same
`InferenceService` as HTTP, and `server` runs it with grpc.aio on a SO_REUSEPORT port in each
ingress replica.
"""
