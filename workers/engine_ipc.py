"""The messages between a worker and its engine's child process (pickled over one socket).

worker -> child: `Submit`, `Cancel`, `Stop`. child -> worker: `Ready` once the model is loaded,
then `Events` after every engine step that produced any: each request's new events, and the
backend's stats as they are after that step.
"""

from dataclasses import dataclass, field

from workers.backends.seam import EngineEvent, EngineStats, Submission


@dataclass(frozen=True)
class Submit:
    submission: Submission


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    stats: EngineStats


@dataclass(frozen=True)
class RequestEvents:
    request_id: str
    events: list[EngineEvent]  # in order; a terminal event is the last one there will be


@dataclass(frozen=True)
class Events:
    requests: list[RequestEvents]
    stats: EngineStats
    # Prompt-cache blocks (hash-chain keys) evicted and stored since the last message: the
    # worker announces what its engine holds (contract/prefix_routing.py).
    prefix_left: list[bytes] = field(default_factory=list)
    prefix_arrived: list[bytes] = field(default_factory=list)


ToEngine = Submit | Cancel | Stop
FromEngine = Ready | Events
