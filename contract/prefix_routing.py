"""Cache-aware routing (docs/caching.md): a request goes to the worker that holds its prefix.

The prompt cache of a worker's engine keeps prompt KV in blocks of `PREFIX_BLOCK_TOKENS`
tokens, each keyed by a hash chain of the token ids up to its end (`block_keys`: the API and
the engine compute the same keys). A worker announces every block it holds as one Redis key,
`prefix_owner_key`, holding its name, with a TTL it refreshes while it holds the block (and
deletes when it evicts it). Besides the model's shared lanes, each worker consumes an
affinity lane of its own (`affinity_lane`).

At enqueue, the API runs `ROUTE`: the longest of the request's block keys that some worker
announced names the preferred worker; the job goes to that worker's affinity lane when the
worker is live (in the registry) and its lane holds fewer than the bound, else to the shared
lanes, as every job did before. A dead worker's affinity lane is emptied into the shared lane
by the other workers (`RESCUE`), so nothing waits on a worker that is gone.
"""

import hashlib

# Tokens per prompt-cache block (the engine's default block size: keys must agree).
PREFIX_BLOCK_TOKENS = 64
_ROOT = b"abl-prefix-v1"


def block_keys(ids: list[int], upto: int, block_tokens: int = PREFIX_BLOCK_TOKENS) -> list[bytes]:
    """The hash-chain keys of the full blocks within `ids[:upto]`: key i names tokens
    0 .. (i + 1) x block_tokens, so two prompts share a key exactly when they share them."""
    keys: list[bytes] = []
    parent = _ROOT
    for start in range(0, (min(upto, len(ids)) // block_tokens) * block_tokens, block_tokens):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(b"".join(t.to_bytes(4, "little") for t in ids[start : start + block_tokens]))
        parent = digest.digest()
        keys.append(parent)
    return keys


def routable_keys(ids: list[int], cacheable: int) -> list[bytes]:
    """The keys a worker's cache could hold for this prompt (one token is always prefilled)."""
    return block_keys(ids, min(cacheable, len(ids) - 1))


def prefix_owner_key(queue: str, key: bytes) -> str:
    """Names the worker that holds this block of the model's prompt cache (with a TTL)."""
    return f"abl:prefix:{queue}:{key.hex()}"


def affinity_lane(queue: str, worker: str) -> str:
    """The broker queue of jobs routed to one worker for its prompt cache."""
    return f"{queue}.w.{worker}"


def affinity_workers_key(queue: str) -> str:
    """Set of the workers with an affinity lane for this model (for `RESCUE`)."""
    return f"abl:queue:{queue}:affinity"


# KEYS[1]: the worker registry; KEYS[2..]: the request's prefix owner keys, longest first.
# ARGV: the affinity lane prefix ("<queue>.w."), the most jobs a preferred worker's lane may
# hold. Returns {decision, worker}: "taken" (route to the worker's lane), "busy" (its lane is
# full), "dead" (not in the registry), or "none" (no worker holds any of the blocks).
ROUTE = """
for i = 2, #KEYS do
    local worker = redis.call('GET', KEYS[i])
    if worker then
        local until_s = redis.call('ZSCORE', KEYS[1], worker)
        local now = redis.call('TIME')
        if (not until_s) or tonumber(until_s) < tonumber(now[1]) then
            return {'dead', worker}
        end
        if redis.call('LLEN', ARGV[1] .. worker) >= tonumber(ARGV[2]) then
            return {'busy', worker}
        end
        return {'taken', worker}
    end
end
return {'none', ''}
"""

# KEYS[1]: the worker registry; KEYS[2]: the model's affinity workers (set); KEYS[3]: the
# shared lane jobs are moved to. ARGV: the affinity lane prefix, this worker's name.
# Moves every job of a dead worker's affinity lane to the shared lane; returns jobs moved.
RESCUE = """
local now = redis.call('TIME')
local moved = 0
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local until_s = redis.call('ZSCORE', KEYS[1], worker)
    if worker ~= ARGV[2] and ((not until_s) or tonumber(until_s) < tonumber(now[1])) then
        local lane = ARGV[1] .. worker
        while redis.call('RPOPLPUSH', lane, KEYS[3]) do
            moved = moved + 1
        end
        redis.call('SREM', KEYS[2], worker)
    end
end
return moved
"""

# KEYS: owner keys of blocks this worker evicted. ARGV[1]: its name. Deletes those it owns.
FORGET = """
for i = 1, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[1] then
        redis.call('DEL', KEYS[i])
    end
end
return 1
"""
