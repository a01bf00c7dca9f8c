"""`abl up`'s supervision loop (infra/launcher/supervise.py), on stand-ins for child processes."""

from dataclasses import dataclass, field
from typing import Any

import pytest

from infra.launcher import supervise as cli


@dataclass
class Child:
    name: str
    alive: bool = True
    returncode: int | None = None

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} log"


@dataclass
class FakeStack:
    api: Child
    workers: list[Child]
    started: list[tuple[float, int]] = field(default_factory=list)
    clock: Any = None

    def start_worker(self, i: int) -> Child:
        self.started.append((self.clock.now, i))
        self.workers[i].alive, self.workers[i].returncode = True, None
        self.api.alive = False  # ends the loop once a worker has come back
        self.api.returncode = 0
        return self.workers[i]


class Clock:
    now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def test_a_dead_worker_is_restarted_after_the_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(cli, "time", clock)
    stack = FakeStack(Child("api"), [Child("worker-0"), Child("worker-1", False, -9)], clock=clock)
    assert cli.supervise(stack) == 1  # type: ignore[arg-type]
    ((at, index),) = stack.started
    assert index == 1
    assert cli.WORKER_RESTART_DELAY_S <= at <= cli.WORKER_RESTART_DELAY_S + 2


def test_a_dead_api_ends_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(cli, "time", clock)
    stack = FakeStack(Child("api", False, 1), [Child("worker-0")], clock=clock)
    assert cli.supervise(stack) == 1  # type: ignore[arg-type]
    assert stack.started == []
