-- POST one body to two paths in turn, by wall-clock phase, over the same connections, and count the
-- answers of each phase. Print ONE machine-readable line at the end:
--   WRK_PHASES {"errors":n,"phases":{"<k>":{"2xx":n,"other":n},..}}
-- wrk -t2 -c64 -d60s -s benchmarks/lua/alternate.lua URL -- BODY_FILE PATH_A PATH_B START PHASE_S [HEADER_A]
-- START: CLOCK_MONOTONIC seconds (Python's time.monotonic()) at which phase 0 begins; PHASE_S: its length;
-- HEADER_A ("Name: value"): a header only the requests to PATH_A carry (the paths may then be the same).
-- The body is JSON unless -H set a Content-Type (and Inference-Header-Content-Length for binary tensors).
-- Or two bodies of the same request to URL's path, A a binary-tensor body and B a JSON one:
-- wrk ... -s benchmarks/lua/alternate.lua URL -- bodies JSON_FILE BINARY_FILE HEADER_LENGTH START PHASE_S
-- Phase k (k >= 0) goes to A when k % 4 is 0 or 3 and to B otherwise (A B B A A B B A ...: each
-- pair of phases (2j, 2j+1) is AB or BA, so a trend over the run cancels in the pairs); before START, B.
-- An answer counts in the phase it arrives in (a request in flight at a switch is answered in the next phase:
-- at most `connections` of thousands). Parsed by benchmarks/wrk.py (run_alternating, run_alternating_bodies).

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

local function read(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*all")
  f:close()
  return data
end

function init(args)
  if args[1] == "bodies" then
    req_b = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, read(args[2]))
    req_a = wrk.format("POST", nil, {["Content-Type"] = "application/octet-stream",
                                     ["Inference-Header-Content-Length"] = args[4]}, read(args[3]))
    start = tonumber(args[5])
    phase_s = tonumber(args[6])
    return
  end
  local body = read(args[1])
  local headers = {}
  for k, v in pairs(wrk.headers) do headers[k] = v end
  headers["Content-Type"] = headers["Content-Type"] or "application/json"
  req_b = wrk.format("POST", args[3], headers, body)
  if args[6] ~= nil and args[6] ~= "" then
    local name, value = string.match(args[6], "^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  req_a = wrk.format("POST", args[2], headers, body)
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
