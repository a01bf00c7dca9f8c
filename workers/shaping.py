"""From generated text to an answer's content blocks.

An engine produces text; the Messages API answers in content blocks (text, tool_use, thinking).
A shaper, one per request, turns the text as it streams into block operations: open a block,
add to it, close it. The delta pump publishes them as `block_start`, `delta` and `block_stop`
events. `TextShaper` makes the whole answer one text block, opened with the first text;
`ToolShaper` splits it into text and `tool_use` blocks as the tool-call parser reads calls out
of it (`contract.toolcalls`). `shaper_for` picks one for a job.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from contract.events import BlockType, DeltaKind, StopReason
from contract.jobs import GenerateJob
from contract.toolcalls import (
    TextPiece,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallParser,
    ToolCallStart,
    ToolEvent,
    new_tool_use_id,
)


@dataclass(frozen=True)
class OpenBlock:
    block: int
    block_type: BlockType
    tool_use_id: str | None = None
    tool_name: str | None = None


@dataclass(frozen=True)
class AddToBlock:
    block: int
    kind: DeltaKind
    text: str


@dataclass(frozen=True)
class CloseBlock:
    block: int


BlockOp = OpenBlock | AddToBlock | CloseBlock


class Shaper(Protocol):
    def feed(self, text: str) -> list[BlockOp]:
        """The operations new text makes (it may hold text back until it knows more)."""

    def finish(self) -> list[BlockOp]:
        """The generation ended: what was held back, and the open block closed."""

    def stop_reason(self, reason: StopReason | None) -> StopReason | None:
        """The answer's stop reason, given the engine's (after `finish`)."""


class TextShaper:
    """The whole answer is one text block."""

    def __init__(self) -> None:
        self._open = False

    def stop_reason(self, reason: StopReason | None) -> StopReason | None:
        return reason

    def feed(self, text: str) -> list[BlockOp]:
        if not text:
            return []
        ops: list[BlockOp] = []
        if not self._open:
            self._open = True
            ops.append(OpenBlock(0, "text"))
        ops.append(AddToBlock(0, "text", text))
        return ops

    def finish(self) -> list[BlockOp]:
        return [CloseBlock(0)] if self._open else []


class ToolShaper:
    """Text blocks and `tool_use` blocks, in the order the model writes them.

    Each call the parser reads becomes a `tool_use` block: opened with its `toolu_` id and name
    once its name and the start of its arguments are out, its arguments streamed as
    `input_json` deltas (together a valid JSON prefix; the whole object for a complete call),
    closed when the call ends. Text around calls goes into text blocks. With `parallel` False
    (`disable_parallel_tool_use`) only the first call counts: what follows it is dropped. An
    answer that made a complete call and ended by itself stops with `tool_use`.
    """

    def __init__(
        self,
        tool_names: list[str],
        *,
        parallel: bool = True,
        new_id: Callable[[], str] = new_tool_use_id,
    ) -> None:
        self._parser = ToolCallParser(tool_names, new_id)
        self._parallel = parallel
        self._blocks = 0  # blocks opened so far
        self._open: int | None = None  # the open block's number
        self._open_type: BlockType | None = None
        self._calls = 0  # complete calls made
        self._closed = False  # only one call allowed, and it was made: the rest is dropped

    def feed(self, text: str) -> list[BlockOp]:
        return self._shape(self._parser.feed(text)) if text else []

    def finish(self) -> list[BlockOp]:
        ops = self._shape(self._parser.finish())
        if self._open is not None:
            ops.append(CloseBlock(self._open))
            self._open = None
        return ops

    def stop_reason(self, reason: StopReason | None) -> StopReason | None:
        if not self._calls:
            return reason
        if reason == "end_turn" or (self._closed and reason == "max_tokens"):
            return "tool_use"
        return reason

    def _shape(self, events: list[ToolEvent]) -> list[BlockOp]:
        ops: list[BlockOp] = []
        for event in events:
            if self._closed:
                break
            if isinstance(event, TextPiece):
                if self._open_type != "text":
                    self._start(ops, "text")
                assert self._open is not None
                ops.append(AddToBlock(self._open, "text", event.text))
            elif isinstance(event, ToolCallStart):
                self._start(ops, "tool_use", event.id, event.name)
            elif isinstance(event, ToolCallArgsDelta):
                assert self._open is not None
                ops.append(AddToBlock(self._open, "input_json", event.partial_json))
            elif isinstance(event, ToolCallEnd):
                assert self._open is not None
                ops.append(CloseBlock(self._open))
                self._open, self._open_type = None, None
                self._calls += event.complete
                self._closed = not self._parallel
        return ops

    def _start(
        self,
        ops: list[BlockOp],
        block_type: BlockType,
        tool_use_id: str | None = None,
        tool_name: str | None = None,
    ) -> None:
        if self._open is not None:
            ops.append(CloseBlock(self._open))
        self._open, self._open_type = self._blocks, block_type
        self._blocks += 1
        ops.append(OpenBlock(self._open, block_type, tool_use_id, tool_name))


def shaper_for(job: GenerateJob) -> Shaper:
    """Tool calls are read out of the answer when the job has tools the model may call."""
    tools = job.tool_use
    if tools is None or tools.choice == "none" or not tools.tools:
        return TextShaper()
    if job.output_schema is not None and tools.choice == "auto":
        return TextShaper()  # the answer is the structured output's JSON, never a call
    return ToolShaper([t.name for t in tools.tools], parallel=tools.parallel)


def coalesced(ops: list[BlockOp]) -> list[BlockOp]:
    """Consecutive additions to the same block joined into one."""
    out: list[BlockOp] = []
    for op in ops:
        last = out[-1] if out else None
        if (
            isinstance(op, AddToBlock)
            and isinstance(last, AddToBlock)
            and (last.block, last.kind) == (op.block, op.kind)
        ):
            out[-1] = AddToBlock(op.block, op.kind, last.text + op.text)
        else:
            out.append(op)
    return out
