import itertools
import json

import pytest

from contract.toolcalls import (
    TOOL_CALL_OPEN,
    TextPiece,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallParser,
    ToolCallStart,
    ToolEvent,
    ToolSpec,
    render_tool_call,
    render_tool_result,
    render_tools_prompt,
)

NAMES = {"get_weather", "noop"}
TWO_CALLS = (
    "Let me check.\n"
    + render_tool_call("get_weather", {"location": 'Paris, "FR"', "days": [1, 2.5e1], "x": None})
    + "\n"
    + render_tool_call("noop", {})
)


def parse(chunks: list[str], names: set[str] | None = NAMES) -> list[ToolEvent]:
    ids = (f"toolu_{i}" for i in itertools.count())
    parser = ToolCallParser(names, new_id=lambda: next(ids))
    events: list[ToolEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def merged(events: list[ToolEvent]) -> list[ToolEvent]:
    """Adjacent text pieces and deltas joined: what a client assembles."""
    out: list[ToolEvent] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, TextPiece) and isinstance(last, TextPiece):
            out[-1] = TextPiece(last.text + e.text)
        elif isinstance(e, ToolCallArgsDelta) and isinstance(last, ToolCallArgsDelta):
            out[-1] = ToolCallArgsDelta(e.id, last.partial_json + e.partial_json)
        else:
            out.append(e)
    return out


def test_text_then_two_calls() -> None:
    assert merged(parse([TWO_CALLS])) == [
        TextPiece("Let me check."),
        ToolCallStart("toolu_0", "get_weather"),
        ToolCallArgsDelta("toolu_0", '{"location":"Paris, \\"FR\\"","days":[1,25.0],"x":null}'),
        ToolCallEnd(
            "toolu_0", "get_weather", {"location": 'Paris, "FR"', "days": [1, 25.0], "x": None}
        ),
        ToolCallStart("toolu_1", "noop"),
        ToolCallArgsDelta("toolu_1", "{}"),
        ToolCallEnd("toolu_1", "noop", {}),
    ]


@pytest.mark.parametrize("cut", range(len(TWO_CALLS) + 1))
def test_a_split_anywhere_gives_the_same_result(cut: int) -> None:
    assert merged(parse([TWO_CALLS[:cut], TWO_CALLS[cut:]])) == merged(parse([TWO_CALLS]))


def test_character_by_character_streams_the_arguments_as_they_come() -> None:
    events = parse(list(TWO_CALLS))
    deltas = [e for e in events if isinstance(e, ToolCallArgsDelta) and e.id == "toolu_0"]
    assert len(deltas) > 10
    assert json.loads("".join(d.partial_json for d in deltas))["days"] == [1, 25.0]


def test_plain_text_with_a_lookalike_tag_stays_text() -> None:
    text = "a <tool_cal b <tool_callx> c <tool"
    assert merged(parse(list(text))) == [TextPiece(text)]


def test_an_invalid_header_falls_back_to_text_and_a_later_call_still_parses() -> None:
    text = (
        "<tool_call>oops <tool_call>" + '{"name": "noop", "arguments": {"a": 1}}</tool_call> done'
    )
    events = merged(parse([text]))
    assert events[0] == TextPiece("<tool_call>oops")
    assert events[-2:] == [ToolCallEnd("toolu_0", "noop", {"a": 1}), TextPiece("done")]


def test_an_unknown_tool_is_text() -> None:
    text = render_tool_call("rm_rf", {"path": "/"})
    assert merged(parse([text])) == [TextPiece(text)]


def test_invalid_arguments_end_the_call_with_its_complete_members_and_skip_the_rest() -> None:
    text = '<tool_call>{"name": "noop", "arguments": {"a": [1, 2], "b": tru} oops</tool_call> after'
    events = merged(parse([text]))
    assert events[1] == ToolCallArgsDelta("toolu_0", '{"a": [1, 2], "b": tru')
    assert events[2] == ToolCallEnd("toolu_0", "noop", {"a": [1, 2]}, complete=False)
    assert events[3:] == [TextPiece("after")]


def test_an_unterminated_call_ends_at_finish() -> None:
    text = '<tool_call>\n{"name": "noop", "arguments": {"a": 1, "b": "cut sh'
    events = merged(parse([text]))
    assert events[-1] == ToolCallEnd("toolu_0", "noop", {"a": 1}, complete=False)
    assert "".join(e.partial_json for e in events if isinstance(e, ToolCallArgsDelta)) == (
        '{"a": 1, "b": "cut sh'
    )


def test_an_unterminated_header_is_text() -> None:
    text = '<tool_call>\n{"name": "no'
    assert merged(parse([text])) == [TextPiece(text)]


def test_arguments_as_a_json_string_and_in_either_order() -> None:
    text = '<tool_call>{"arguments": "{\\"q\\": 1}", "name": "noop"}</tool_call>'
    events = merged(parse([text]))
    assert events == [
        ToolCallStart("toolu_0", "noop"),
        ToolCallArgsDelta("toolu_0", '{"q": 1}'),
        ToolCallEnd("toolu_0", "noop", {"q": 1}),
    ]


def test_any_tool_name_is_accepted_without_a_list() -> None:
    events = parse([render_tool_call("anything", {"k": "v"})], names=None)
    assert isinstance(events[-1], ToolCallEnd) and events[-1].name == "anything"


def test_history_and_prompt_rendering() -> None:
    call = render_tool_call("get_weather", {"location": "Zürich"})
    assert call == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"location":"Zürich"}}\n</tool_call>'
    )
    assert render_tool_result("42 C", is_error=True) == (
        "<tool_response>\nError: 42 C\n</tool_response>"
    )
    prompt = render_tools_prompt([ToolSpec("noop", {"type": "object"}, "does nothing")])
    assert (
        '{"name": "noop", "description": "does nothing", "input_schema": {"type": "object"}}'
        in prompt
    )
    assert TOOL_CALL_OPEN in prompt
