"""Admission shares the batch between owners (accounts): waiting requests are taken least-served
owner first, and a full batch still takes the first request of an owner with nothing running."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_for
from tests.unit.test_engine import collect, greedy, prompt_ids
from workers.backends.seam import Generation, Submission
from workers.backends.transformers.engine import TransformersEngine


@pytest.fixture
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    made = TransformersEngine(tiny_model_dir, max_batch=4)
    yield made
    made.stop()


def submit(engine: TransformersEngine, owners: list[str], max_tokens: int) -> list[Generation]:
    ids = prompt_ids(engine, "Tell me about lists.")
    return [
        engine.submit(Submission(f"{owner}{i}", ids, greedy(max_tokens), owner=owner))
        for i, owner in enumerate(owners)
    ]


def test_waiting_requests_are_taken_least_served_owner_first(
    engine: TransformersEngine,
) -> None:
    """Submitted before the stepping thread starts, all wait for the first admission: b's and
    c's go before a's second."""
    order: list[str] = []
    admit = engine._admit

    def recording(cancels: set[str]):  # type: ignore[no-untyped-def]
        admitted = admit(cancels)
        order.extend(s.owner for s in admitted)
        return admitted

    engine._admit = recording  # type: ignore[method-assign]
    generations = submit(engine, ["a", "a", "a", "a", "b", "a", "c"], max_tokens=4)
    engine.start()
    for generation in generations:
        collect(generation)
    assert order[:4] == ["a", "b", "c", "a"]
    assert sorted(order) == sorted(["a", "a", "a", "a", "b", "a", "c"])


def test_a_full_batch_takes_another_owners_first_request(engine: TransformersEngine) -> None:
    flood = submit(engine, ["a"] * 6, max_tokens=400)
    engine.start()
    wait_for(lambda: engine.stats.active == 4, timeout=30, interval=0.01)
    late = submit(engine, ["b"], max_tokens=4)
    # hard_max_batch = 4 + 1: one row more than the batch, for an owner with nothing running.
    wait_for(lambda: engine.stats.active == 5, timeout=30, interval=0.01, what="b joining")
    assert engine.stats.waiting == 2  # a's fifth and sixth still wait
    collect(late[0])
    for generation in flood:
        engine.cancel(generation.request_id)
        collect(generation)
    assert engine.stats.max_batch_seen == 5


def test_one_owner_alone_never_goes_past_the_batch(engine: TransformersEngine) -> None:
    generations = submit(engine, ["a"] * 7, max_tokens=6)
    engine.start()
    for generation in generations:
        collect(generation)
    assert engine.stats.max_batch_seen == 4
