-- One rate-limit decision (or a peek) over all of a request's limits, atomically.
--
-- The arithmetic is proxy/limits/algorithms.py ported line for line: same
-- formulas in the same order, same EPS and `_floor`, time in integer
-- microseconds (exact in a Lua double up to 2^53), so this script and the
-- memory store give identical answers at identical instants. Keep the two in
-- step: tests/test_redis_store.py runs both on random sequences and compares.
--
-- KEYS[i]  the state of limit i for its subject
-- ARGV[1]  "acquire" (check, and charge only if every enforced limit allows),
--          "peek", for concurrency slots "release" and "renew", "refund"
--          (undo an acquire made at ARGV[2] that a Cluster decision took back), or
--          "strike": one strike of a penalty, KEYS[1] its strikes (an sw limit whose
--          limit is `after` - 1), KEYS[2] its ban (bn); see `algorithms.strike`
-- ARGV[2]  now in integer microseconds, or "" for the server clock (TIME)
-- ARGV[3]  cost (ignored by peek)
-- ARGV[4]  the request's ticket: the member naming its concurrency slots
-- ARGV[5]  deadline in integer microseconds on the same clock as now, 0 for none:
--          an acquire that runs later (its caller gave up) writes nothing and
--          returns the error "LATE <now>"
-- ARGV[6 + 4(i-1) ..]  limit i: algorithm short code, its two parameters, and
--   "1" for a shadow limit (never refuses; charged only when it allows), else "0"
--   tb: capacity, refill_rate   sw: limit, window_us
--   fw: limit, window_us        lb: rate, queue
--   cc: max, lease_us
--   bn: ban_us, 0  (a penalty's ban: refuses while banned; its state is when
--       the ban ends, written only by "strike", never by a decision)
-- "strike" returns {1, ban end in us} when it starts a ban, else {0, 0}.
-- Otherwise returns 9 integers per limit: allowed (1/0), then remaining, reset,
-- retry_after and delay, each as two integers m, e with the number = m * 2^e
-- exactly (see `put_exact`).
--
-- State is a plain string per key, written only when the request is allowed,
-- with PX = the algorithm's ttl (time until fresh again), so a key vanishes
-- exactly when keeping it would no longer change any answer. A concurrency
-- limit's state is a sorted set of tickets scored by when their lease ends:
-- a slot whose instance died is dropped once its lease is over.

-- Effects replication: lets TIME precede writes on Redis 3.2-4 (a no-op on >= 5).
if redis.replicate_commands then
  redis.replicate_commands()
end

local US = 1000000
local MAX_PX = 2 ^ 53  -- ms; past this a TTL is not exact as an integer and Redis may refuse it
local EPS = 1e-9

local function floor0(x)
  return math.max(0, math.floor(x + EPS))
end

local function fmt(x)
  return string.format('%.17g', x)
end

local function outcome(allowed, remaining, reset, retry_after, delay)
  return {allowed, remaining, reset, retry_after or 0.0, delay or 0.0}
end

-- Python's a // b for non-negative integers held in doubles. a / b can round
-- up to the next integer only once a nears 2^53 (the year 2255 in
-- microseconds), but the correction costs two multiplications.
local function floordiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- Two numbers "x:y": token bucket (tokens, at), leaky bucket (backlog, at),
-- fixed window (index, count).
local function decode_pair(raw)
  local x, y = string.match(raw, '^([^:]+):(.+)$')
  return {tonumber(x), tonumber(y)}
end

local function encode_pair(state)
  return fmt(state[1]) .. ':' .. fmt(state[2])
end

-- Token bucket ---------------------------------------------------------------

local function load_tb()
  local TB = {decode = decode_pair, encode = encode_pair}

  function TB.params(p1, p2)
    return {capacity = p1, rate = p2}
  end

  local function tb_tokens(a, state, now)
    if state == nil then
      return a.capacity
    end
    return math.min(a.capacity, state[1] + (now - state[2]) * a.rate / US)
  end

  function TB.check(a, state, now, cost)
    local tokens = tb_tokens(a, state, now)
    if tokens + EPS >= cost then
      local left = tokens - cost
      return outcome(true, floor0(left), (a.capacity - left) / a.rate), {left, now}
    end
    return outcome(false, floor0(tokens), (a.capacity - tokens) / a.rate,
                   (cost - tokens) / a.rate), state
  end

  function TB.peek(a, state, now)
    local tokens = tb_tokens(a, state, now)
    return outcome(tokens + EPS >= 1, floor0(tokens), (a.capacity - tokens) / a.rate)
  end

  -- Give back `cost` tokens a request of another slot's refusal took (see refund below).
  function TB.refund(a, state, now, cost)
    return {math.min(a.capacity, state[1] + cost), state[2]}
  end

  function TB.ttl(a, state, now)
    return (a.capacity - tb_tokens(a, state, now)) / a.rate
  end
  return TB
end

-- Sliding window: "base;at:cum,at:cum,..." oldest first ------------------------
--
-- `cum` counts the cost admitted up to and including that entry (`base`: up
-- to the first one), so the cost still in the window is last cum - the cum
-- just before the first live entry. A decision then parses only the entries
-- that expired since the last write (plus, when refused, those that must
-- expire for it to pass) and carries the live ones over as one substring:
-- O(1) Lua work instead of O(live), which matters at limits of thousands.
-- Python's log of (at, cost) pairs is the same data: cost = cum - previous cum.

local function load_sw()
  local SW = {}
  local SW_ENTRY = '^(%d+):(%d+),?'

  function SW.params(p1, p2)
    return {limit = p1, window_us = p2}
  end

  -- A log: the raw string `s`, where its entries start (`body`), `base`, and its
  -- newest entry (`last_at`, `last_cum`, nil when empty).
  local function sw_log(s, body, base)
    local log = {s = s, body = body, base = base}
    if #s >= body then
      -- The newest entry is at most 2 x 17 digits + ':' from the end.
      local _, _, at, cum = string.find(s, '(%d+):(%d+)$', math.max(body, #s - 40))
      log.last_at, log.last_cum = tonumber(at), tonumber(cum)
    end
    return log
  end

  function SW.decode(raw)
    local semi = string.find(raw, ';', 1, true)
    return sw_log(raw, semi + 1, tonumber(string.sub(raw, 1, semi - 1)))
  end

  function SW.encode(log)
    return log.s
  end

  -- Where the first live entry starts (nil: none) and the cum just before it.
  local function sw_live(a, log, now)
    local horizon = now - a.window_us
    if log == nil or log.last_at == nil or log.last_at <= horizon then
      return nil, 0
    end
    local pos, before = log.body, log.base
    while true do
      local _, stop, at, cum = string.find(log.s, SW_ENTRY, pos)
      if tonumber(at) > horizon then
        return pos, before
      end
      pos, before = stop + 1, tonumber(cum)
    end
  end

  local function sw_used(log, first, before)
    if first == nil then
      return 0
    end
    return log.last_cum - before
  end

  local function sw_reset(a, log, first, now)
    if first == nil then
      return 0.0
    end
    return (log.last_at + a.window_us - now) / US
  end

  -- The live entries plus this admission; one at the same microsecond merges.
  local function sw_admit(log, first, before, now, cost)
    if first == nil then
      return sw_log('0;' .. fmt(now) .. ':' .. fmt(cost), 3, 0)
    end
    local head = fmt(before) .. ';'
    local kept
    if log.last_at == now then
      kept = string.sub(log.s, first, #log.s - #(fmt(log.last_at) .. ':' .. fmt(log.last_cum)))
    else
      kept = string.sub(log.s, first) .. ','
    end
    return sw_log(head .. kept .. fmt(now) .. ':' .. fmt(log.last_cum + cost), #head + 1, before)
  end

  function SW.check(a, log, now, cost)
    local first, before = sw_live(a, log, now)
    local used = sw_used(log, first, before)
    if used + cost <= a.limit then
      return outcome(true, a.limit - used - cost, a.window_us / US), sw_admit(log, first, before, now, cost)
    end
    local need, pos, retry_at = used + cost - a.limit, first, now
    while pos ~= nil and pos <= #log.s do
      local _, stop, at, cum = string.find(log.s, SW_ENTRY, pos)
      retry_at = tonumber(at) + a.window_us
      if tonumber(cum) - before >= need then
        break
      end
      pos = stop + 1
    end
    return outcome(false, a.limit - used, sw_reset(a, log, first, now), (retry_at - now) / US), log
  end

  function SW.peek(a, log, now)
    local first, before = sw_live(a, log, now)
    local left = a.limit - sw_used(log, first, before)
    return outcome(left >= 1, left, sw_reset(a, log, first, now))
  end

  -- Take `cost` back from the entry admitted at `now` (and the cums after it);
  -- an entry left with no cost of its own goes. nil: the log is empty.
  function SW.refund(a, log, now, cost)
    local parts, prev, pos = {}, log.base, log.body
    while pos <= #log.s do
      local _, stop, at, cum = string.find(log.s, SW_ENTRY, pos)
      at, cum = tonumber(at), tonumber(cum)
      if at >= now then
        cum = cum - cost
      end
      if cum > prev then
        parts[#parts + 1] = fmt(at) .. ':' .. fmt(cum)
        prev = cum
      end
      pos = stop + 1
    end
    if #parts == 0 then
      return nil
    end
    local head = fmt(log.base) .. ';'
    return sw_log(head .. table.concat(parts, ','), #head + 1, log.base)
  end

  function SW.ttl(a, log, now)
    return sw_reset(a, log, sw_live(a, log, now), now)
  end
  return SW
end

-- Fixed window, aligned to the Unix epoch --------------------------------------

local function load_fw()
  local FW = {decode = decode_pair, encode = encode_pair}

  function FW.params(p1, p2)
    return {limit = p1, window_us = p2}
  end

  -- index, count, to_end
  local function fw_count(a, state, now)
    local index = floordiv(now, a.window_us)
    local to_end = ((index + 1) * a.window_us - now) / US
    local count = 0
    if state ~= nil and state[1] == index then
      count = state[2]
    end
    return index, count, to_end
  end

  function FW.check(a, state, now, cost)
    local index, count, to_end = fw_count(a, state, now)
    if count + cost <= a.limit then
      return outcome(true, a.limit - count - cost, to_end), {index, count + cost}
    end
    local reset = 0.0
    if count ~= 0 then
      reset = to_end
    end
    return outcome(false, a.limit - count, reset, to_end), state
  end

  function FW.peek(a, state, now)
    local _, count, to_end = fw_count(a, state, now)
    local reset = 0.0
    if count ~= 0 then
      reset = to_end
    end
    return outcome(count < a.limit, a.limit - count, reset)
  end

  function FW.refund(a, state, now, cost)
    if state[1] ~= floordiv(now, a.window_us) then
      return state  -- a new window since: nothing of the request is left to give back
    end
    return {state[1], math.max(0, state[2] - cost)}
  end

  function FW.ttl(a, state, now)
    local _, count, to_end = fw_count(a, state, now)
    if count ~= 0 then
      return to_end
    end
    return 0.0
  end
  return FW
end

-- Leaky bucket -----------------------------------------------------------------

local function load_lb()
  local LB = {decode = decode_pair, encode = encode_pair}

  function LB.params(p1, p2)
    return {rate = p1, queue = p2}
  end

  local function lb_backlog(a, state, now)
    if state == nil then
      return 0.0
    end
    return math.max(0.0, state[1] - (now - state[2]) * a.rate / US)
  end

  -- free places, reset; the unit leaving now holds no place
  local function lb_report(a, backlog)
    local waiting = math.max(0.0, backlog - 1)
    return math.min(a.queue, floor0(a.queue - waiting)), waiting / a.rate
  end

  function LB.check(a, state, now, cost)
    local backlog = lb_backlog(a, state, now)
    if backlog > EPS and backlog - 1 + cost > a.queue + EPS then
      local free, reset = lb_report(a, backlog)
      local retry = (backlog - (a.queue + 1 - cost)) / a.rate
      return outcome(false, free, reset, retry), state
    end
    local free, reset = lb_report(a, backlog + cost)
    return outcome(true, free, reset, 0.0, backlog / a.rate), {backlog + cost, now}
  end

  function LB.peek(a, state, now)
    local backlog = lb_backlog(a, state, now)
    local free, reset = lb_report(a, backlog)
    return outcome(backlog <= EPS or backlog <= a.queue + EPS, free, reset)
  end

  function LB.refund(a, state, now, cost)
    return {math.max(0.0, state[1] - cost), state[2]}
  end

  function LB.ttl(a, state, now)
    return lb_backlog(a, state, now) / a.rate
  end
  return LB
end

-- Concurrency: a sorted set of (ticket, lease end) ----------------------------------

local function load_cc()
  local CC = {}

  function CC.params(p1, p2)
    return {max = p1, lease_us = p2}
  end

  function CC.read(key, now)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    return redis.call('ZCARD', key)
  end

  function CC.check(a, held, now, cost)
    if held < a.max then
      return outcome(true, a.max - held - 1, 0.0), held + 1
    end
    return outcome(false, 0, 0.0, 1.0), held
  end

  function CC.peek(a, held, now)
    return outcome(held < a.max, a.max - held, 0.0)
  end

  function CC.write(key, a, held, now, ticket)
    redis.call('ZADD', key, now + a.lease_us, ticket)
    redis.call('PEXPIRE', key, math.ceil(a.lease_us / 1000))
  end
  return CC
end

-- Ban: "the ban ends at <us>"; a decision only reads it ---------------------------

local function load_bn()
  local BN = {}

  function BN.params(p1, p2)
    return {ban_us = p1}
  end

  function BN.read(key, now)
    return tonumber(redis.call('GET', key))
  end

  function BN.check(a, state, now, cost)
    if state ~= nil and state > now then
      local left = (state - now) / US
      return outcome(false, 0, left, left), state
    end
    return outcome(true, 1, 0.0), state
  end

  BN.peek = BN.check

  function BN.write(key, a, state, now, ticket)
  end
  return BN
end

-- The decision -------------------------------------------------------------------

-- Each algorithm's functions are made only when a limit uses it: every call
-- runs this whole chunk, and building all four's closures cost more Redis CPU
-- (about 4 us a call, INFO commandstats) than a token bucket's arithmetic.
local LOADERS = {tb = load_tb, sw = load_sw, fw = load_fw, lb = load_lb, cc = load_cc, bn = load_bn}
local ALGORITHMS = {}

local mode = ARGV[1]
if mode ~= 'acquire' and mode ~= 'peek' and mode ~= 'release' and mode ~= 'renew' and mode ~= 'refund'
    and mode ~= 'strike' then
  return redis.error_reply('unknown mode ' .. tostring(mode))
end
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * US + tonumber(t[2])
else
  now = tonumber(ARGV[2])
end
local cost = tonumber(ARGV[3])
local ticket = ARGV[4]
local deadline = tonumber(ARGV[5])
if mode == 'acquire' and deadline > 0 and now > deadline then
  return redis.error_reply(string.format('LATE %d', now))
end

local algs, params, shadow = {}, {}, {}
for i = 1, #KEYS do
  local base = 6 + 4 * (i - 1)
  local code = ARGV[base]
  local alg = ALGORITHMS[code]
  if alg == nil then
    local load = LOADERS[code]
    if load == nil then
      return redis.error_reply('unknown algorithm ' .. tostring(code))
    end
    alg = load()
    ALGORITHMS[code] = alg
  end
  algs[i] = alg
  params[i] = alg.params(tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]))
  shadow[i] = ARGV[base + 3] == '1'
end

if mode == 'release' or mode == 'renew' then
  -- A request's slots end with its exchange (release), or live on while an
  -- upgraded connection stays open (renew); other limits are untouched.
  for i = 1, #KEYS do
    if algs[i].write ~= nil then
      if mode == 'release' then
        redis.call('ZREM', KEYS[i], ticket)
      elseif redis.call('ZSCORE', KEYS[i], ticket) then
        algs[i].write(KEYS[i], params[i], nil, now, ticket)
      end
    end
  end
  return {}
end

local states = {}
for i = 1, #KEYS do
  if algs[i].read ~= nil then
    states[i] = algs[i].read(KEYS[i], now)
  else
    local raw = redis.call('GET', KEYS[i])
    if raw then
      states[i] = algs[i].decode(raw)
    end
  end
end

local function save(i, state)
  local alg = algs[i]
  if alg.write ~= nil then
    alg.write(KEYS[i], params[i], state, now, ticket)
    return
  end
  local ms = math.ceil(alg.ttl(params[i], state, now) * 1000)
  if ms > MAX_PX then
    -- fresh again only in 285,000 years or more (a tiny rate): Redis
    -- refuses such a PX, and keeping the key for good is the same thing
    redis.call('SET', KEYS[i], alg.encode(state))
  elseif ms > 0 then
    redis.call('SET', KEYS[i], alg.encode(state), 'PX', string.format('%d', ms))
  else
    redis.call('DEL', KEYS[i])
  end
end

if mode == 'refund' then
  -- Undo an acquire of this slot's keys made at `now` (ARGV[2], explicit here)
  -- whose request another slot refused: a Cluster decision over several slots
  -- (RedisStore._decide_across_slots). Concurrency gives its ticket back.
  for i = 1, #KEYS do
    if algs[i].write ~= nil then
      redis.call('ZREM', KEYS[i], ticket)
    elseif states[i] ~= nil and algs[i].refund ~= nil then  -- a ban check wrote nothing to undo
      local state = algs[i].refund(params[i], states[i], now, cost)
      if state == nil then
        redis.call('DEL', KEYS[i])
      else
        save(i, state)
      end
    end
  end
  return {}
end

if mode == 'strike' then
  -- algorithms.strike: no change while banned; the strike that the window
  -- refuses (the `after`-th) bans and starts the count over.
  if states[2] ~= nil and states[2] > now then
    return {0, 0}
  end
  local o, kept = algs[1].check(params[1], states[1], now, 1)
  if o[1] then
    save(1, kept)
    return {0, 0}
  end
  redis.call('DEL', KEYS[1])
  local ends = now + params[2].ban_us
  redis.call('SET', KEYS[2], fmt(ends), 'PX', string.format('%d', math.ceil(params[2].ban_us / 1000)))
  return {1, ends}
end

local outcomes = {}
if mode == 'peek' then
  for i = 1, #KEYS do
    outcomes[i] = algs[i].peek(params[i], states[i], now)
  end
else
  local new_states, all_allowed = {}, true
  for i = 1, #KEYS do
    outcomes[i], new_states[i] = algs[i].check(params[i], states[i], now, cost)
    if not outcomes[i][1] and not shadow[i] then
      all_allowed = false
    end
  end
  if all_allowed then
    for i = 1, #KEYS do
      if outcomes[i][1] then  -- a shadow limit that would refuse keeps its state
        save(i, new_states[i])
      end
    end
  else
    -- Nothing is charged: the limits that would have allowed report as they stand.
    for i = 1, #KEYS do
      if outcomes[i][1] then
        outcomes[i] = algs[i].peek(params[i], states[i], now)
        outcomes[i][1] = true
      end
    end
  end
end

-- Each number goes back as m, e with x == m * 2^e exactly (math.frexp, |m| <
-- 2^53): integer replies are the cheapest for hiredis to parse, and Python's
-- math.ldexp rebuilds the very same double, where parsing '%.17g' text took
-- dtoa's bignum path, 3k instructions a decision (bench/instructions.py).
local TWO_53 = 9007199254740992
local reply, n = {}, 0
local function put_exact(x)
  local m, e = math.frexp(x)
  reply[n + 1], reply[n + 2] = m * TWO_53, e - 53
  n = n + 2
end
for _, o in ipairs(outcomes) do
  n = n + 1
  reply[n] = o[1] and 1 or 0
  put_exact(o[2])
  put_exact(o[3])
  put_exact(o[4])
  put_exact(o[5])
end
return reply
