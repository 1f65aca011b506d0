-- POST two bodies in turn, by wall-clock phase, over the same connections, and count the answers of each
-- phase: a KServe v2 binary-tensor body (A) and a JSON body (B) of the same request. Print ONE line at the end:
--   WRK_PHASES {"errors":n,"phases":{"<k>":{"2xx":n,"other":n},..}}
-- wrk -t2 -c64 -d60s -s benchmarks/lua/alternate_bodies.lua URL -- JSON_FILE BINARY_FILE HEADER_LENGTH START PHASE_S
-- HEADER_LENGTH: the binary body's Inference-Header-Content-Length; START, PHASE_S and the A B B A ... order of
-- the phases as in alternate.lua (phase k is A when k % 4 is 0 or 3; before START, B). Parsed by
-- benchmarks/wrk.py (run_alternating_bodies).

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } fleet_timespec;
int clock_gettime(int clock_id, fleet_timespec *tp);
]]
local ts = ffi.new("fleet_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC, as time.monotonic()
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local req_a, req_b, start, phase_s

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local json_body = f:read("*all")
  f:close()
  f = assert(io.open(args[2], "rb"))
  local binary_body = f:read("*all")
  f:close()
  req_b = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, json_body)
  req_a = wrk.format("POST", nil, {["Content-Type"] = "application/octet-stream",
                                   ["Inference-Header-Content-Length"] = args[3]}, binary_body)
  start = tonumber(args[4])
  phase_s = tonumber(args[5])
end

local function phase()
  local t = now()
  if t < start then return -1 end
  return math.floor((t - start) / phase_s)
end

function request()
  local k = phase()
  local m = k % 4
  if k >= 0 and (m == 0 or m == 3) then return req_a end
  return req_b
end

ok = {}
other = {}
function response(status, headers, body)
  local k = phase()
  if status >= 200 and status < 300 then
    ok[k] = (ok[k] or 0) + 1
  else
    other[k] = (other[k] or 0) + 1
  end
end

function done(summary, latency, requests)
  local phases = {}
  for _, thread in ipairs(threads) do
    for _, kind in ipairs({"ok", "other"}) do
      local t = thread:get(kind)
      if type(t) == "table" then
        for k, n in pairs(t) do
          phases[k] = phases[k] or {ok = 0, other = 0}
          phases[k][kind] = phases[k][kind] + n
        end
      end
    end
  end
  local parts = {}
  for k, c in pairs(phases) do
    table.insert(parts, string.format('"%d":{"2xx":%d,"other":%d}', k, c.ok, c.other))
  end
  local e = summary.errors
  io.write(string.format('WRK_PHASES {"errors":%d,"phases":{%s}}\n',
    e.connect + e.read + e.write + e.timeout, table.concat(parts, ",")))
end
