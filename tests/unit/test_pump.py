"""The delta pump: one thread relaying every request's text, coalesced, in one pipeline per pass."""

import threading
from typing import Any

import pytest
import redis

from tests.support import wait_for
from workers.backends.seam import Finished, Generation, TextChunk
from workers.pump import DeltaPump
from workers.shaping import AddToBlock, OpenBlock


class FakePipeline:
    def __init__(self, client: "FakeRedis") -> None:
        self.client = client
        self.queued: list[tuple[str, str]] = []

    def publish(self, channel: str, message: str) -> None:
        self.queued.append((channel, message))

    def execute(self) -> list[Any]:
        if self.client.down:
            raise redis.ConnectionError("down")
        self.client.executed.append(self.queued)
        return [1] * len(self.queued)


class FakeRedis:
    def __init__(self) -> None:
        self.executed: list[list[tuple[str, str]]] = []
        self.down = False

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePublisher:
    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.next_index = 0

    def block_op(self, op: Any, output_tokens: int, via: Any) -> None:
        """Deltas as `index:text:tokens`, block openings and closings as `index:<`/`index:>`."""
        if isinstance(op, AddToBlock):
            via.publish(self.channel, f"{self.next_index}:{op.text}:{output_tokens}")
        else:
            mark = "<" if isinstance(op, OpenBlock) else ">"
            via.publish(self.channel, f"{self.next_index}:{mark}")
        self.next_index += 1


def start(client: FakeRedis, interval_s: float, muted: set[str], errors: list[str]) -> DeltaPump:
    pump = DeltaPump(
        client,  # type: ignore[arg-type]
        muted=muted.__contains__,
        on_publish_error=errors.append,
        min_interval_s=interval_s,
    )
    pump.start()
    return pump


class Ended:
    """Waits like a thread would for the terminal event the pump hands over."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.finals: list[Any] = []

    def __call__(self, final: Any) -> None:
        self.finals.append(final)
        self.event.set()

    def join(self, timeout: float = 5.0) -> None:
        assert self.event.wait(timeout), "the pump did not end the stream"


def watch(pump: DeltaPump, generation: Generation, publisher: FakePublisher) -> list[Any]:
    ended = Ended()
    pump.watch(generation, publisher, ended)
    return [ended, ended.finals]


def test_first_text_goes_at_once_then_coalesces_until_the_end() -> None:
    client, errors = FakeRedis(), []
    pump = start(client, interval_s=3600, muted=set(), errors=errors)
    generation, publisher = Generation("a"), FakePublisher("a")
    thread, result = watch(pump, generation, publisher)
    generation._put(TextChunk("Hel", 1))
    pump.notify()
    wait_for(lambda: len(client.executed) == 1, timeout=5.0, interval=0.005)
    for text, count in (("lo", 2), (" wor", 3), ("ld", 4)):
        generation._put(TextChunk(text, count))
        pump.notify()
    final = Finished("max_tokens", None, 4)
    generation._put(final)
    pump.notify()
    thread.join(5)
    pump.stop()
    assert result == [final]
    sent = [message for batch in client.executed for _, message in batch]
    # The rest was held (the interval had not passed) and went out with the end, as one delta.
    assert sent == ["0:<", "1:Hel:1", "2:lo world:4", "3:>"]
    assert errors == []


def test_muted_requests_publish_nothing_but_still_end() -> None:
    client, errors = FakeRedis(), []
    pump = start(client, interval_s=0, muted={"b"}, errors=errors)
    generation, publisher = Generation("b"), FakePublisher("b")
    thread, result = watch(pump, generation, publisher)
    generation._put(TextChunk("secret", 1))
    generation._put(Finished(None, None, 1, cancelled=True))
    pump.notify()
    thread.join(5)
    pump.stop()
    assert result[0].cancelled
    assert client.executed == [] and publisher.next_index == 0


@pytest.mark.parametrize("interval_s", [0.0, 3600.0])
def test_an_unreachable_redis_is_reported_and_numbers_are_not_lost(interval_s: float) -> None:
    client, errors = FakeRedis(), []
    client.down = True
    pump = start(client, interval_s=interval_s, muted=set(), errors=errors)
    generation, publisher = Generation("c"), FakePublisher("c")
    thread, result = watch(pump, generation, publisher)
    generation._put(TextChunk("x", 1))
    generation._put(Finished("end_turn", None, 1))
    pump.notify()
    thread.join(5)
    pump.stop()
    assert result[0].stop_reason == "end_turn"
    assert errors == ["c"]
    assert (
        publisher.next_index == 0
    )  # the next event (the terminal one) reuses the undelivered number
