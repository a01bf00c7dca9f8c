"""A conversation as the prompt renderer takes it: turns of text, tool calls and tool results.

The API builds it from a Messages request (api/anthropic/convert.py); `contract.rendering`
turns it into the prompt's text and token ids. Everything in it that came from a client is
untrusted text: the renderer keeps it out of special tokens.
"""

from dataclasses import dataclass, field
from typing import Any, Literal, cast

from contract.toolcalls import ToolSpec

TurnRole = Literal["system", "user", "assistant"]
# Joins the text blocks of one turn, and consecutive messages of one role.
BLOCK_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class ToolCall:
    """An earlier `tool_use` block of an assistant turn."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    """A `tool_result` block of a user turn, its content already flattened to text."""

    tool_use_id: str
    content: str
    is_error: bool = False
    name: str | None = None  # the called tool, when an earlier turn holds the call


TurnPart = str | ToolCall | ToolResult


@dataclass
class Turn:
    """One turn, its parts in the order the client sent them (text, calls, results)."""

    role: TurnRole
    parts: list[TurnPart] = field(default_factory=list)

    def text(self) -> str:
        """The turn's text parts joined (tool calls and results left out)."""
        return BLOCK_SEPARATOR.join(p for p in self.parts if isinstance(p, str) and p)

    def calls(self) -> list[ToolCall]:
        return [p for p in self.parts if isinstance(p, ToolCall)]

    def results(self) -> list[ToolResult]:
        return [p for p in self.parts if isinstance(p, ToolResult)]


@dataclass
class Conversation:
    """What a prompt is rendered from."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    tools: list[ToolSpec] = field(default_factory=list)
    # Whether the model may think before it answers; passed to templates as `enable_thinking`.
    thinking: bool = False

    @classmethod
    def of_text(
        cls, system: str | None, messages: list[tuple[str, str]] | tuple[tuple[str, str], ...]
    ) -> "Conversation":
        """A plain-text conversation: (role, text) turns."""
        turns = [Turn(_role(role), [text]) for role, text in messages]
        return cls(system=system, turns=turns)

    def chars(self) -> int:
        """Characters of client text in it; JSON (tool definitions, call arguments) is not
        counted, see `has_json`."""
        total = len(self.system or "")
        for turn in self.turns:
            for part in turn.parts:
                if isinstance(part, str):
                    total += len(part)
                elif isinstance(part, ToolResult):
                    total += len(part.content)
        return total

    def has_json(self) -> bool:
        """Whether it holds tool definitions or tool calls (JSON of any size and depth)."""
        return bool(self.tools) or any(t.calls() for t in self.turns)


def _role(role: str) -> TurnRole:
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"unknown role {role!r}")
    return cast(TurnRole, role)
