"""The worker's view of liveness: a heartbeat missing for a whole grace period means dead."""

import pytest
import redis

from workers.sweeper import HeartbeatWatch


class FakeRegistry:
    """The live-worker registry's names, as the sweeper reads them."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.down = False

    def __call__(self) -> set[str]:
        if self.down:
            raise redis.ConnectionError("down")
        return self.keys


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch() -> tuple[HeartbeatWatch, FakeRegistry, Clock]:
    client, clock = FakeRegistry(), Clock()
    alive = HeartbeatWatch(client, grace_s=6.0, clock=clock)
    return alive, client, clock


def test_a_beating_worker_is_alive() -> None:
    alive, client, _ = watch()
    client.keys.add("w1")
    assert alive("w1")


def test_a_missing_heartbeat_is_dead_only_after_the_grace_period() -> None:
    alive, _, clock = watch()
    assert alive("w1")  # first seen missing: maybe Redis just restarted
    clock.now += 5.9
    assert alive("w1")
    clock.now += 0.2
    assert not alive("w1")


def test_a_heartbeat_coming_back_resets_the_count() -> None:
    alive, client, clock = watch()
    assert alive("w1")
    clock.now += 5
    client.keys.add("w1")
    assert alive("w1")
    client.keys.clear()
    clock.now += 5
    assert alive("w1")  # missing again, counted afresh
    clock.now += 6
    assert not alive("w1")


def test_an_old_sighting_does_not_count() -> None:
    alive, _, clock = watch()
    assert alive("w1")
    clock.now += 60  # not asked about for a long while: start counting again
    assert alive("w1")


def test_redis_down_is_not_a_dead_worker() -> None:
    alive, client, _ = watch()
    client.down = True
    with pytest.raises(redis.ConnectionError):
        alive("w1")
