-- POST one request body from a file and print ONE machine-readable line at the end:
--   WRK_JSON {"duration_us":..,"requests":..,"bytes":..,"errors":{..},"latency_us":{..},"statuses":{"200":n,..}}
-- wrk -t2 -c64 -d10s -s benchmarks/lua/report.lua URL -- BODY_FILE [INFERENCE_HEADER_LENGTH]
-- Headers given with -H are kept; Content-Type is only set here when -H did not set it.
-- Parsed by benchmarks/wrk.py (run_wrk).

local threads = {}

-- Runs in the main Lua state, once per wrk thread, before that thread's init().
function setup(thread)
  table.insert(threads, thread)
end

local function has_header(name)
  for k, _ in pairs(wrk.headers) do
    if string.lower(k) == string.lower(name) then return true end
  end
  return false
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*all")
  f:close()
  wrk.method = "POST"
  local binary = args[2] ~= nil and args[2] ~= ""
  if binary then
    wrk.headers["Inference-Header-Content-Length"] = args[2]
  end
  if not has_header("Content-Type") then
    wrk.headers["Content-Type"] = binary and "application/octet-stream" or "application/json"
  end
end

-- Per-thread Lua state: each wrk thread counts its own answers by status and, with WRK_COUNT_VERSIONS=1 in
-- the environment, by the "model_version" of each answer (a 200 without one counts as "none").
statuses = {}
versions = {}
local count_versions = os.getenv("WRK_COUNT_VERSIONS") == "1"
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if count_versions and status == 200 then
    local v = string.match(body, '"model_version"%s*:%s*"([^"]*)"') or "none"
    versions[v] = (versions[v] or 0) + 1
  end
end

local function num(x)
  -- JSON has no NaN/Infinity; an empty run reports null.
  if x == nil or x ~= x or x == math.huge or x == -math.huge then return "null" end
  return string.format("%.17g", x)
end

-- Runs in the main Lua state after all threads stopped; thread:get copies each thread's table here.
-- The per-thread table `name` summed over the threads, as the inside of a JSON object ("key":n,...);
-- `key` turns a table key into the JSON key.
local function merged(name, key)
  local counts = {}
  for _, thread in ipairs(threads) do
    local t = thread:get(name)
    if type(t) == "table" then
      for k, n in pairs(t) do
        k = key(k)
        counts[k] = (counts[k] or 0) + n
      end
    end
  end
  local parts = {}
  for k, n in pairs(counts) do
    table.insert(parts, string.format('"%s":%s', k, num(n)))
  end
  return table.concat(parts, ",")
end

function done(summary, latency, requests)
  local statuses_json = merged("statuses", function(code) return tostring(math.floor(tonumber(code))) end)
  local versions_json = merged("versions", tostring)
  local e = summary.errors
  local line = string.format(
    '{"duration_us":%s,"requests":%s,"bytes":%s,' ..
    '"errors":{"connect":%s,"read":%s,"write":%s,"status":%s,"timeout":%s},' ..
    '"latency_us":{"mean":%s,"p50":%s,"p90":%s,"p95":%s,"p99":%s,"max":%s},' ..
    '"threads":%d,"statuses":{%s},"versions":{%s}}',
    num(summary.duration), num(summary.requests), num(summary.bytes),
    num(e.connect), num(e.read), num(e.write), num(e.status), num(e.timeout),
    num(latency.mean), num(latency:percentile(50)), num(latency:percentile(90)),
    num(latency:percentile(95)), num(latency:percentile(99)), num(latency.max),
    #threads, statuses_json, versions_json)
  io.write("WRK_JSON ", line, "\n")
end
