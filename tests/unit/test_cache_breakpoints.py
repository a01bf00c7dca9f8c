"""Which prefix a request's cache_control breakpoints cover (api/anthropic/caching.py)."""

from typing import Any

import pytest
from pydantic import ValidationError

from api.anthropic.caching import common_prefix, truncated
from api.anthropic.protocol import Breakpoint, MessagesRequest

MARK = {"type": "ephemeral"}
TOOL = {"name": "t", "input_schema": {"type": "object"}}


def request(**fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_breakpoints_in_prompt_order() -> None:
    body = request(
        system=[
            {"type": "text", "text": "a"},
            {"type": "text", "text": "b", "cache_control": MARK},
        ],
        tools=[{**TOOL, "cache_control": MARK}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": MARK}]},
            {"role": "assistant", "content": "a"},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "x",
                        "content": [{"type": "text", "text": "r", "cache_control": MARK}],
                    }
                ],
            },
        ],
    )
    assert body.cache_breakpoints() == [
        Breakpoint("tools", 0),
        Breakpoint("system", 1),
        Breakpoint("messages", 0, 0),
        Breakpoint("messages", 2, 0),
    ]
    assert request(cache_control=MARK).cache_breakpoints() == [Breakpoint("end", 0)]
    assert request().cache_breakpoints() == []


def test_more_than_four_are_refused_and_only_ephemeral_is_taken() -> None:
    five = [{"type": "text", "text": str(i), "cache_control": MARK} for i in range(5)]
    with pytest.raises(ValidationError, match="A maximum of 4 blocks with cache_control"):
        request(system=five)
    with pytest.raises(ValidationError, match="ephemeral"):
        request(system=[{"type": "text", "text": "a", "cache_control": {"type": "forever"}}])


def test_truncation_keeps_what_the_breakpoint_covers() -> None:
    body = request(
        system="s",
        tools=[TOOL, {**TOOL, "name": "u", "cache_control": MARK}],
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "q"}, {"type": "text", "text": "r"}],
            },
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "z"},
        ],
    )
    cut = truncated(body, Breakpoint("messages", 0, 0))
    assert cut is not None and len(cut.messages) == 1 and len(cut.messages[0].content) == 1
    assert cut.system == body.system and cut.tools == body.tools
    cut = truncated(body, Breakpoint("tools", 1))
    assert (
        cut is not None and cut.system is None and [t.name for t in cut.tools or []] == ["t", "u"]
    )
    assert truncated(body, Breakpoint("end", 0)) is None


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
