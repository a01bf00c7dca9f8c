"""From generated text to an answer's content blocks.

An engine produces text; the Messages API answers in content blocks (text, tool_use, thinking).
A shaper, one per request, turns the text as it streams into block operations: open a block,
add to it, close it. The delta pump publishes them as `block_start`, `delta` and `block_stop`
events. `TextShaper` makes the whole answer one text block, opened with the first text.
"""

from dataclasses import dataclass
from typing import Protocol

from contract.events import BlockType, DeltaKind


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


class TextShaper:
    """The whole answer is one text block."""

    def __init__(self) -> None:
        self._open = False

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
