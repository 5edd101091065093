-- wrk script for bench/memory.py: every request comes from a new client.
--
--   wrk -t2 -c50 -d120s -s bench/clients.lua URL -- PER_THREAD FIRST_OCTET DONE_PREFIX
--
-- Thread t sends X-Forwarded-For 10.(FIRST_OCTET + t).(i / 256).(i % 256) for
-- i = 0 .. PER_THREAD-1 (at most 65,536 per thread); once it has as many
-- responses it stops and creates the file DONE_PREFIX..t. wrk itself sleeps
-- for its whole -d, so the bench sends it SIGINT when every thread's file
-- exists (wrk then prints its summary at once). The few requests still in
-- flight wrap around to addresses already used, so they add no client.
-- Tollgate must list 127.0.0.1 in clients.trusted_proxies to key each request
-- by that address.

local next_thread = 0

function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end

function init(args)
  per_thread = tonumber(args[1])
  octet = tonumber(args[2]) + tid
  done_file = args[3] .. tid
  sent = 0
  received = 0
end

function request()
  local i = sent % per_thread
  sent = sent + 1
  local address = string.format("10.%d.%d.%d", octet, math.floor(i / 256), i % 256)
  return wrk.format(nil, nil, { ["X-Forwarded-For"] = address })
end

function response(status, headers, body)
  received = received + 1
  if received == per_thread then
    local f = io.open(done_file, "w")
    f:close()
    wrk.thread:stop()
  end
end
