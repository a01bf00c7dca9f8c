"""From generated text to content blocks: text and tool_use blocks, streamed in any chunking."""

import json
import random

import pytest

from contract.jobs import GenerateJob, SamplingParams, ToolSpec, ToolUse
from contract.toolcalls import call_prefix
from workers.backends.seam import Finished
from workers.pump import _with_stop_reason
from workers.runtime import constraint_of
from workers.shaping import (
    AddToBlock,
    BlockOp,
    CloseBlock,
    OpenBlock,
    Shaper,
    TextShaper,
    ToolShaper,
    coalesced,
    shaper_for,
)

CALL = call_prefix("get_weather") + '{"city": "Paris", "unit": "celsius"}}\n</tool_call>'


def ids() -> object:
    count = iter(range(100))
    return lambda: f"toolu_{next(count):024d}"


def shape(shaper: Shaper, text: str, seed: int) -> list[BlockOp]:
    """Feeds `text` in random pieces, as an engine's steps would."""
    rng = random.Random(seed)
    ops: list[BlockOp] = []
    at = 0
    while at < len(text):
        step = rng.randint(1, 6)
        ops += shaper.feed(text[at : at + step])
        at += step
    return coalesced(ops + shaper.finish())


def blocks(ops: list[BlockOp]) -> list[tuple[str, str, str | None]]:
    """(type, content, tool name) per block, checking each opens, grows and closes in order."""
    out: dict[int, list[str]] = {}
    kinds: dict[int, tuple[str, str | None]] = {}
    closed: set[int] = set()
    for op in ops:
        if isinstance(op, OpenBlock):
            assert op.block == len(kinds) and not (set(kinds) - closed)
            kinds[op.block] = (op.block_type, op.tool_name)
            out[op.block] = []
            if op.block_type == "tool_use":
                assert op.tool_use_id and op.tool_use_id.startswith("toolu_")
        elif isinstance(op, AddToBlock):
            assert op.block in kinds and op.block not in closed
            expected = "input_json" if kinds[op.block][0] == "tool_use" else "text"
            assert op.kind == expected
            out[op.block].append(op.text)
        else:
            assert isinstance(op, CloseBlock) and op.block not in closed
            closed.add(op.block)
    assert closed == set(kinds)
    return [(kinds[b][0], "".join(out[b]), kinds[b][1]) for b in sorted(kinds)]


@pytest.mark.parametrize("seed", range(5))
def test_a_call_alone_is_one_tool_use_block(seed: int) -> None:
    shaper = ToolShaper(["get_weather"], new_id=ids())  # type: ignore[arg-type]
    result = blocks(shape(shaper, CALL, seed))
    assert result == [("tool_use", '{"city": "Paris", "unit": "celsius"}', "get_weather")]
    assert shaper.stop_reason("end_turn") == "tool_use"


@pytest.mark.parametrize("seed", range(5))
def test_text_then_calls_are_blocks_in_order(seed: int) -> None:
    text = "Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo") + "\nDone."
    shaper = ToolShaper(["get_weather"])
    result = blocks(shape(shaper, text, seed))
    assert [(kind, name) for kind, _, name in result] == [
        ("text", None),
        ("tool_use", "get_weather"),
        ("tool_use", "get_weather"),
        ("text", None),
    ]
    assert result[0][1] == "Let me check."
    assert json.loads(result[2][1]) == {"city": "Oslo", "unit": "celsius"}
    assert result[3][1] == "Done."


def test_without_parallel_calls_only_the_first_call_counts() -> None:
    text = CALL + "\n" + CALL.replace("Paris", "Oslo") + "\nmore"
    shaper = ToolShaper(["get_weather"], parallel=False)
    result = blocks(shape(shaper, text, 0))
    assert [kind for kind, _, _ in result] == ["tool_use"]
    assert json.loads(result[0][1])["city"] == "Paris"
    assert shaper.stop_reason("max_tokens") == "tool_use"


def test_an_unknown_tool_or_plain_text_stays_text() -> None:
    text = call_prefix("rm_rf") + "{}}\n</tool_call>"
    shaper = ToolShaper(["get_weather"])
    result = blocks(shape(shaper, text, 1))
    assert [kind for kind, _, _ in result] == ["text"]
    assert shaper.stop_reason("end_turn") == "end_turn"


def test_a_call_cut_by_max_tokens_keeps_max_tokens() -> None:
    shaper = ToolShaper(["get_weather"])
    result = blocks(shape(shaper, CALL[: CALL.index("Paris") + 2], 2))
    assert result[0][0] == "tool_use"
    assert shaper.stop_reason("max_tokens") == "max_tokens"


def test_the_pump_reports_tool_use_for_an_answer_that_called() -> None:
    shaper = ToolShaper(["get_weather"])
    shape(shaper, CALL, 0)
    final = _with_stop_reason(Finished("end_turn", None, 30), shaper)
    assert isinstance(final, Finished) and final.stop_reason == "tool_use"
    plain = _with_stop_reason(Finished("end_turn", None, 3), TextShaper())
    assert isinstance(plain, Finished) and plain.stop_reason == "end_turn"
    cancelled = _with_stop_reason(Finished(None, None, 3, cancelled=True), shaper)
    assert isinstance(cancelled, Finished) and cancelled.stop_reason is None


def job(choice: str | None, schema: dict | None = None) -> GenerateJob:
    tools = None
    if choice is not None:
        tools = ToolUse(
            tools=[ToolSpec(name="get_weather", input_schema={"type": "object"})],
            choice=choice,  # type: ignore[arg-type]
            name="get_weather" if choice == "tool" else None,
        )
    return GenerateJob(
        request_id="req_1",
        model="m",
        input_ids=[1],
        sampling=SamplingParams(max_tokens=10),
        tool_use=tools,
        output_schema=schema,
    )


def test_each_job_gets_its_shaper_and_constraint() -> None:
    schema = {"type": "object"}
    assert isinstance(shaper_for(job(None)), TextShaper)
    assert isinstance(shaper_for(job("none")), TextShaper)
    assert isinstance(shaper_for(job("auto")), ToolShaper)
    assert isinstance(shaper_for(job("any")), ToolShaper)
    assert isinstance(shaper_for(job("none", schema)), TextShaper)
    assert constraint_of(job(None)) is None
    assert constraint_of(job("auto")) is None
    forced = constraint_of(job("tool"))
    assert forced is not None and (forced.kind, forced.name) == ("tool_call", "get_weather")
    anyone = constraint_of(job("any"))
    assert anyone is not None and anyone.kind == "tool_call" and anyone.name is None
    output = constraint_of(job("none", schema))
    assert output is not None and (output.kind, output.schema) == ("json", schema)
