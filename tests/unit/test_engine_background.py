"""Background (Message Batch) requests: started only when no interactive request runs or waits,
and never into the batch's last `background_reserve` rows."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_for
from tests.unit.test_engine import collect, greedy, prompt_ids
from workers.backends.seam import BackendOptions, Generation, Submission
from workers.backends.transformers.engine import TransformersEngine


@pytest.fixture
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    made = TransformersEngine(tiny_model_dir, max_batch=4, background_reserve=1)
    yield made
    made.stop()


def submit(
    engine: TransformersEngine, name: str, count: int, max_tokens: int, background: bool
) -> list[Generation]:
    ids = prompt_ids(engine, "Tell me about lists.")
    return [
        engine.submit(
            Submission(f"{name}{i}", ids, greedy(max_tokens), owner=name, background=background)
        )
        for i in range(count)
    ]


def test_background_requests_leave_the_reserve_free(engine: TransformersEngine) -> None:
    batch = submit(engine, "batch", 6, max_tokens=400, background=True)
    engine.start()
    wait_for(lambda: engine.stats.active == 3, timeout=30, interval=0.01)
    assert engine.stats.waiting == 3  # the fourth row stays free for interactive requests
    (interactive,) = submit(engine, "user", 1, max_tokens=4, background=False)
    wait_for(lambda: engine.stats.active == 4, timeout=30, interval=0.01, what="user joining")
    collect(interactive)
    for generation in batch:
        engine.cancel(generation.request_id)
        collect(generation)
    assert engine.stats.max_batch_seen == 4


def test_interactive_requests_go_before_waiting_background_ones(
    engine: TransformersEngine,
) -> None:
    order: list[bool] = []
    admit = engine._admit

    def recording(cancels: set[str]):  # type: ignore[no-untyped-def]
        admitted = admit(cancels)
        order.extend(s.background for s in admitted)
        return admitted

    engine._admit = recording  # type: ignore[method-assign]
    generations = submit(engine, "batch", 3, max_tokens=4, background=True)
    generations += submit(engine, "user", 3, max_tokens=4, background=False)
    engine.start()
    for generation in generations:
        collect(generation)
    assert order[:3] == [False, False, False]


def test_the_reserve_defaults_to_a_quarter_of_the_batch() -> None:
    assert BackendOptions(max_batch=16).reserve_rows() == 4
    assert BackendOptions(max_batch=2).reserve_rows() == 1
    assert BackendOptions(max_batch=1).reserve_rows() == 0
    assert BackendOptions(max_batch=8, background_reserve=20).reserve_rows() == 7


def test_background_requests_wait_while_an_interactive_one_runs(
    engine: TransformersEngine,
) -> None:
    (interactive,) = submit(engine, "user", 1, max_tokens=400, background=False)
    engine.start()
    wait_for(lambda: engine.stats.active == 1, timeout=30, interval=0.01)
    batch = submit(engine, "batch", 2, max_tokens=4, background=True)
    steps = engine.stats.steps
    wait_for(lambda: engine.stats.steps >= steps + 5, timeout=30, interval=0.01)
    assert (engine.stats.active, engine.stats.waiting) == (1, 2)
    engine.cancel(interactive.request_id)
    collect(interactive)
    for generation in batch:  # idle again: they run
        collect(generation)
    assert engine.stats.finished >= 2
