"""Every Redis key and channel name that the API and the workers share (the queue's lanes and
shares are in `contract.queueing`)."""

# Pub/sub channel on which the API announces cancellations; every worker listens.
CANCEL_CHANNEL = "abl:cancel"
# A worker's heartbeat key is this prefix plus its name; it expires when the worker dies.
HEARTBEAT_PREFIX = "abl:worker:"
# The live workers: a sorted set of worker names, each scored with the Redis time (seconds)
# until which its last heartbeat holds (contract/worker_registry.py). Read it, never SCAN.
WORKER_REGISTRY = "abl:workers"


def events_channel(request_id: str) -> str:
    """Redis pub/sub channel on which a request's events are published."""
    return f"abl:req:{request_id}:events"


def cancel_key(request_id: str) -> str:
    """Redis key set when a request is cancelled (for workers that claim it later)."""
    return f"abl:req:{request_id}:cancel"


def lease_key(request_id: str) -> str:
    """Redis key naming the worker running a request; it expires if that worker dies."""
    return f"abl:req:{request_id}:lease"


def heartbeat_key(worker_name: str) -> str:
    """A worker's heartbeat: its name, models and engine stats (JSON), with a TTL."""
    return HEARTBEAT_PREFIX + worker_name
