"""The registry of live workers: one sorted set in Redis, read without scanning the keyspace.

On every heartbeat a worker scores its name in `WORKER_REGISTRY` with the time until which the
beat holds (three beats), and writes its payload (name, models, engine stats) to its own key
(`heartbeat_key`) with the same lifetime; it removes both when it stops. Readers drop the members
whose time has passed and read the payloads of the others: O(live workers), however many other
keys Redis holds. Times are Redis's own clock (`TIME`), so skewed host clocks do not matter, and
each worker's lifetime is its own (workers with different heartbeat intervals mix).

The scripts are plain Lua text: the API (redis.asyncio), the workers and the benchmarks (redis)
each register them with their own client. They write after `TIME`, so Redis >= 5 (effects
replication) is required.
"""

import json
from collections.abc import Sequence
from typing import Any

from contract.keys import HEARTBEAT_PREFIX, WORKER_REGISTRY, heartbeat_key

# KEYS: the registry, the worker's payload key. ARGV: name, payload (JSON), lifetime in ms.
HEARTBEAT_SCRIPT = """
local now = redis.call('TIME')
local until_s = tonumber(now[1]) + tonumber(now[2]) / 1000000 + tonumber(ARGV[3]) / 1000
redis.call('ZADD', KEYS[1], string.format('%.6f', until_s), ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: the registry. ARGV: the payload key prefix. Prunes the members whose heartbeat ran out;
# returns {names, payloads} of the others (a payload is false where its key already expired).
LIVE_WORKERS_SCRIPT = """
local now = redis.call('TIME')
local now_s = string.format('%.6f', tonumber(now[1]) + tonumber(now[2]) / 1000000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_s)
local names = redis.call('ZRANGE', KEYS[1], 0, -1)
if #names == 0 then return {{}, {}} end
local keys = {}
for i, name in ipairs(names) do keys[i] = ARGV[1] .. name end
return {names, redis.call('MGET', unpack(keys))}
"""


def heartbeat_call(name: str, payload: dict[str, Any], lifetime_s: float) -> dict[str, Any]:
    """The `keys` and `args` of one heartbeat (`script(**heartbeat_call(...))`)."""
    return {
        "keys": [WORKER_REGISTRY, heartbeat_key(name)],
        "args": [name, json.dumps(payload), max(1, int(lifetime_s * 1000))],
    }


LIVE_WORKERS_CALL: dict[str, Any] = {"keys": [WORKER_REGISTRY], "args": [HEARTBEAT_PREFIX]}
"""The `keys` and `args` of a registry read (`script(**LIVE_WORKERS_CALL)`)."""


def live_names(reply: Sequence[Any]) -> set[str]:
    """The names of the live workers in a `LIVE_WORKERS_SCRIPT` reply."""
    names = reply[0] if reply else []
    return {n.decode() if isinstance(n, bytes) else str(n) for n in names}


def live_payloads(reply: Sequence[Any]) -> list[dict[str, Any]]:
    """The heartbeat payloads in a `LIVE_WORKERS_SCRIPT` reply (expired ones left out)."""
    payloads = reply[1] if len(reply) > 1 else []
    return [json.loads(raw) for raw in payloads if raw]
