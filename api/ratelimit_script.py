"""The rate limiter's Redis script (GCRA over several budgets, all or nothing), and its SHA-1.

`api/ratelimit.py` runs it and reads its reply; the algorithm is described there.
"""

import hashlib

# For each budget b (1..n): KEYS[2b-1], its hash of theoretical arrival times (ms) per rate
# dimension; KEYS[2b], its zset of in-flight request ids scored by lease expiry (ms).
# ARGV: mode (acquire | spend | release | peek), burst (ms), request id, lease (ms), clock
# override (ms, "" = Redis TIME), the concurrency retry (ms), the epoch (ms), the cost in
# requests, input and output, then per budget its concurrency limit and its three per-minute
# limits. Times are kept relative to the epoch so that doubles stay precise to a few
# nanoseconds, far below one unit of any limit. `spend` takes the cost without a slot (token
# counting); release passes negative costs (a refund) and frees the request's slots.
# Every budget must admit the request, or none is charged (all or nothing).
# Returns: blocked (4 bits per budget, budget b from bit 4(b-1): 1 requests, 2 input, 4 output,
# 8 in flight; 0 = admitted), wait (ms), now (ms), then per budget: in flight, and remaining
# and reset (ms) per dimension.
LUA = """
local epoch = tonumber(ARGV[7])
local now = tonumber(ARGV[5])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
now = now - epoch
local mode, burst, rid, lease = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local cost = {tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])}
local fields = {'requests', 'input', 'output'}
local checking = mode == 'acquire' or mode == 'spend'
local blocked, wait = 0, 0
local budgets = {}
for b = 1, #KEYS / 2 do
  local base, bit = 10 + 4 * (b - 1), 4 * (b - 1)
  local stored = redis.call('HMGET', KEYS[2 * b - 1], 'requests', 'input', 'output')
  redis.call('ZREMRANGEBYSCORE', KEYS[2 * b], '-inf', now)
  local budget = {inflight = redis.call('ZCARD', KEYS[2 * b]), interval = {}, current = {},
                  after = {}}
  for i = 1, 3 do
    budget.interval[i] = 60000 / tonumber(ARGV[base + 1 + i])
    budget.current[i] = math.max(tonumber(stored[i]) or now, now)
    budget.after[i] = budget.current[i] + cost[i] * budget.interval[i]
    -- A full bucket (current == now) admits any single request, leaving it in debt.
    if checking and budget.after[i] - now > burst and budget.current[i] > now then
      blocked = blocked + 2 ^ (bit + i - 1)
      wait = math.max(wait, math.min(budget.after[i] - burst, budget.current[i]) - now)
    end
  end
  if mode == 'acquire' and budget.inflight >= tonumber(ARGV[base + 1]) then
    blocked = blocked + 2 ^ (bit + 3)
    wait = math.max(wait, tonumber(ARGV[6]))
  end
  budgets[b] = budget
end
local out = {blocked, math.ceil(wait), now + epoch}
for b, budget in ipairs(budgets) do
  local rates, slots = KEYS[2 * b - 1], KEYS[2 * b]
  local state = budget.current
  if blocked == 0 and mode ~= 'peek' then
    state = budget.after
    local horizon = 0
    for i = 1, 3 do
      redis.call('HSET', rates, fields[i], string.format('%.3f', budget.after[i]))
      horizon = math.max(horizon, budget.after[i] - now)
    end
    redis.call('PEXPIRE', rates, math.floor(horizon) + 1000)
    if mode == 'acquire' then
      redis.call('ZADD', slots, now + lease, rid)
      redis.call('PEXPIRE', slots, lease + 1000)
      budget.inflight = budget.inflight + 1
    elseif mode == 'release' then
      budget.inflight = budget.inflight - redis.call('ZREM', slots, rid)
    end
  end
  out[#out + 1] = budget.inflight
  for i = 1, 3 do
    local level = (burst - (math.max(state[i], now) - now)) / budget.interval[i]
    out[#out + 1] = math.max(0, math.floor(level + 1e-3))
    out[#out + 1] = math.ceil(math.max(state[i], now)) + epoch
  end
end
return out
"""
LUA_SHA = hashlib.sha1(LUA.encode()).hexdigest()
