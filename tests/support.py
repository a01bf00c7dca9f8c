"""What many tests need: the model the test stack serves, waiting for a condition, and reading a
server-sent event stream."""

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from contract.catalog import TEST_MODEL, TEST_MODEL_ID

# The model the test stack's workers serve: the random-weight test model, fast on 2 cores. Only
# tests/model asks the default model (SmolLM2) anything.
STACK_MODEL = TEST_MODEL_ID
STACK_MODEL_SPEC = TEST_MODEL

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, what: str = ""
) -> T:
    """The first truthy value of `predicate()`, polled every `interval` s; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or 'a condition'}")
        time.sleep(interval)


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, decoded data) for every event of a stream, from its lines."""
    name = ""
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])
