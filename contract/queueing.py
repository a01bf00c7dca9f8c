"""A model's queue, shared fairly (ARCHITECTURE.md, "Queueing"): lanes and shares in Redis.

Each model's interactive jobs go to one of its lanes, chosen by a hash of the account; workers
consume every lane round-robin (kombu rotates the queues it waits on after each delivery), so one
account's backlog in its lane does not hold back the jobs of accounts in the others. The API
enqueues with `PUSH_FAIR`, which also keeps each account's waiting jobs (a sorted set per
account) and the accounts waiting (a sorted set per model); the worker that takes a job runs
`TAKE`. Entries older than a stale age (twice the queue timeout) are dropped on the next push,
so a worker that dies between taking a job and counting it out costs nothing for long.
"""

import zlib


def interactive_lanes(queue: str, count: int) -> list[str]:
    """The broker queues interactive jobs of a model go to; lane 0 keeps the model's queue
    name. Workers consume them round-robin, so one account's backlog in its lane does not
    hold back the jobs of accounts hashed onto the others."""
    return [queue] + [f"{queue}.lane{i}" for i in range(1, count)]


def batch_lane(queue: str) -> str:
    """The model's batch lane: Message Batch jobs, a few at a time (the API's dispatcher keeps
    a bounded number in flight), consumed with a prefetch of their own so they never take the
    room of interactive jobs (workers/dispatch.py, docs/batches.md)."""
    return f"{queue}.batch"


def lane_for(queue: str, account_id: str, count: int) -> str:
    """An account's lane: a stable hash, the same in every API process."""
    index = zlib.crc32(account_id.encode()) % count
    return queue if index == 0 else f"{queue}.lane{index}"


def queued_accounts_key(queue: str) -> str:
    """Sorted set of the accounts with jobs waiting in the model's lanes (score: last enqueue)."""
    return f"abl:queue:{queue}:accounts"


def queued_jobs_key(queue: str, account_id: str) -> str:
    """Sorted set of one account's waiting jobs (member: request id, score: enqueue time);
    the worker that takes a job removes it."""
    return f"abl:queue:{queue}:account:{account_id}"


# Enqueue one job on its account's lane, within the account's share of the model's queue.
# KEYS[1]: the lane; KEYS[2]: the accounts with waiting jobs (zset); KEYS[3]: this account's
# waiting jobs (zset); KEYS[4..]: every lane of the model.
# ARGV: message, cap, account id, request id, now, stale-before, ttl (seconds).
# Work-conserving shares: below `cap` waiting jobs anyone may enqueue; from `cap` on, only an
# account holding fewer than cap / (accounts with waiting jobs) may, up to twice `cap`.
# Returns the backlog before the push, or -1 - backlog when refused (nothing pushed).
PUSH_FAIR = """
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
local backlog = 0
for i = 4, #KEYS do
    backlog = backlog + redis.call('LLEN', KEYS[i])
end
local cap = tonumber(ARGV[2])
local mine = redis.call('ZCARD', KEYS[3])
local accounts = redis.call('ZCARD', KEYS[2])
if not redis.call('ZSCORE', KEYS[2], ARGV[3]) then
    accounts = accounts + 1
end
local share = math.ceil(cap / accounts)
if backlog >= 2 * cap or (backlog >= cap and mine >= share) then
    return -1 - backlog
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return backlog
"""

# A job left its account's waiting jobs; the account leaves the waiting accounts with its last.
TAKE = """
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[2])
end
"""
