-- POST one request body from a file, for KServe v2 JSON or binary-tensor requests.
-- wrk -t2 -c64 -d10s -s benchmarks/lua/post.lua URL -- BODY_FILE [INFERENCE_HEADER_LENGTH]
function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*all")
  f:close()
  wrk.method = "POST"
  if args[2] then
    wrk.headers["Inference-Header-Content-Length"] = args[2]
    wrk.headers["Content-Type"] = "application/octet-stream"
  else
    wrk.headers["Content-Type"] = "application/json"
  end
end

-- Count answers by status so errors show up as data, not as missing latency.
local statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
