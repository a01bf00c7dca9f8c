"""Tool calls as text: the format the model writes, the prompt that teaches it, a stream parser.

The model writes each call as (the Hermes / Qwen convention):

    <tool_call>
    {"name": "get_weather", "arguments": {"location": "Paris"}}
    </tool_call>

Forced calls are generated under a grammar of exactly this (`workers.constraints`); with
`tool_choice` `auto` the model may write text and calls freely, and `ToolCallParser` splits
what it writes, as it streams, into text and calls. Its policy for what is not a clean call:
- a `<tool_call>` tag whose header (`{"name": "<tool>", "arguments": `) is not valid JSON, or
  names no known tool, stays text;
- once a call has started (its name and the first character of its arguments are out), its
  arguments stream as deltas that are always a valid JSON prefix; if the text stops being
  JSON, or the generation ends inside the call, the call ends with the members that were
  complete (`ToolCallEnd.complete` is False) and the rest up to `</tool_call>` is dropped;
- `"arguments"` given as a string holding a JSON object is accepted; a call without
  arguments has input {};
- whitespace between text and a call, and between calls, is dropped.
Pure Python (no torch): the worker runs it over the generated text.
"""

import json
import secrets
import string
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from contract.json_prefix import JsonScanner, ScanEvent

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
CALL_SUFFIX = "}\n" + TOOL_CALL_CLOSE
_ID_ALPHABET = string.ascii_letters + string.digits


def call_prefix(name: str) -> str:
    """The text of a call up to its arguments (what a forced call's grammar starts with)."""
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


def _same(text: str) -> str:
    return text


def render_tool_call(
    name: str, arguments: Mapping[str, Any], *, quote: Callable[[str], str] = _same
) -> str:
    """An earlier assistant `tool_use` block, written as the model writes calls.

    `quote` wraps the client's parts (the name and the arguments' JSON); the prompt renderer
    marks them with it so they never become special tokens.
    """
    args = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    head = f'{TOOL_CALL_OPEN}\n{{"name": {quote(json.dumps(name))}, "arguments": '
    return head + quote(args) + CALL_SUFFIX


def render_tool_result(
    content: str, *, is_error: bool = False, quote: Callable[[str], str] = _same
) -> str:
    """A user `tool_result` block, as text for the user turn (`quote` wraps the content)."""
    body = f"Error: {quote(content)}" if is_error else quote(content)
    return f"<tool_response>\n{body}\n</tool_response>"


@dataclass(frozen=True)
class ToolSpec:
    """A client tool as the request gives it."""

    name: str
    input_schema: Mapping[str, Any]
    description: str = ""


def render_tools_prompt(tools: Sequence[ToolSpec], *, quote: Callable[[str], str] = _same) -> str:
    """The system-prompt section that describes the tools and the call format (`quote` wraps
    each tool's JSON line)."""
    lines = [
        quote(
            json.dumps(
                {"name": t.name, "description": t.description, "input_schema": t.input_schema},
                ensure_ascii=False,
            )
        )
        for t in tools
    ]
    return (
        "# Tools\n\nYou may call one or more tools to answer the user. The tools are described "
        "by JSON schemas within <tools></tools> tags:\n<tools>\n"
        + "\n".join(lines)
        + "\n</tools>\n\nFor each tool call, write a JSON object with the tool name and its "
        "arguments within <tool_call></tool_call> tags:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": <tool-name>, "arguments": <arguments-json-object>}}\n'
        f"{TOOL_CALL_CLOSE}"
    )


def new_tool_use_id() -> str:
    """A fresh id in Anthropic's shape: toolu_ and 24 base62 characters."""
    return "toolu_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    id: str
    partial_json: str  # concatenated, the deltas of one call are a valid JSON prefix


@dataclass(frozen=True)
class ToolCallEnd:
    id: str
    name: str
    input: dict[str, Any]
    complete: bool = True  # False: cut short (invalid JSON or end of output); members kept


ToolEvent = TextPiece | ToolCallStart | ToolCallArgsDelta | ToolCallEnd


@dataclass
class _Call:
    """A call being read: the text after `<tool_call>`, scanned as JSON."""

    scanner: JsonScanner = field(default_factory=JsonScanner)
    raw: str = ""
    lead: int = 0  # whitespace before the call's object
    key: str | None = None
    key_start: int = 0
    value_start: int = 0
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    streamed: int = 0  # end of the arguments text already sent as deltas
    id: str | None = None  # set when ToolCallStart went out


class ToolCallParser:
    """Splits streamed model text into text pieces and tool calls (see the module policy)."""

    def __init__(
        self,
        tool_names: Collection[str] | None = None,
        new_id: Callable[[], str] = new_tool_use_id,
    ) -> None:
        self._names = tool_names
        self._new_id = new_id
        self._mode = "text"  # text | call | close (expect </tool_call>) | skip (drop up to it)
        self._held = ""  # text that may still turn out to be (whitespace before) a tag
        self._after_call = False  # drop the whitespace that follows a call
        self._call = _Call()
        self._out: list[ToolEvent] = []

    def feed(self, text: str) -> list[ToolEvent]:
        """Reads more generated text; returns the events it completes."""
        self._consume(text)
        return self._take()

    def _consume(self, text: str) -> None:
        while text:
            if self._mode == "text":
                text = self._read_text(text)
            elif self._mode == "call":
                text = self._read_call(text)
            else:
                text = self._read_close(text)

    def finish(self) -> list[ToolEvent]:
        """The generation ended: flushes held text, ends an unterminated call."""
        if self._mode == "call":
            if self._call.id is not None:
                self._end_call(complete=False)
            else:
                self._consume(self._fall_back())
        if self._mode == "text" and self._held:
            held, self._held = self._held, ""
            self._text(held)
        return self._take()

    def _take(self) -> list[ToolEvent]:
        out, self._out = _coalesced(self._out), []
        return out

    def _text(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        if text:
            self._out.append(TextPiece(text))

    def _read_text(self, text: str) -> str:
        buffer = self._held + text
        self._held = ""
        at = buffer.find(TOOL_CALL_OPEN)
        if at >= 0:
            self._text(buffer[:at].rstrip())
            self._mode, self._call = "call", _Call()
            return buffer[at + len(TOOL_CALL_OPEN) :]
        cut = len(buffer) - _tag_prefix_length(buffer, TOOL_CALL_OPEN)
        body = buffer[:cut].rstrip()
        self._held = buffer[len(body) :]
        self._text(body)
        return ""

    def _read_close(self, text: str) -> str:
        buffer = self._held + text
        self._held = ""
        if self._mode == "skip":
            at = buffer.find(TOOL_CALL_CLOSE)
            if at < 0:
                self._held = buffer[len(buffer) - _tag_prefix_length(buffer, TOOL_CALL_CLOSE) :]
                return ""
            self._mode = "text"
            return buffer[at + len(TOOL_CALL_CLOSE) :]
        stripped = buffer.lstrip()
        if stripped.startswith(TOOL_CALL_CLOSE):
            self._mode = "text"
            return stripped[len(TOOL_CALL_CLOSE) :]
        if TOOL_CALL_CLOSE.startswith(stripped):
            self._held = stripped  # empty, or a closing tag still arriving
            return ""
        self._mode = "text"  # no closing tag: what follows is text again
        return stripped

    def _read_call(self, text: str) -> str:
        call = self._call
        for i, ch in enumerate(text):
            call.raw += ch
            if call.raw.isspace():
                call.lead += 1  # whitespace before the call's object
                continue
            events = call.scanner.push(ch)
            if call.scanner.failed or not all(self._on_scan(e) for e in events):
                if call.id is None:
                    return self._fall_back() + text[i + 1 :]
                call.raw = call.raw[:-1]  # everything before this character was valid
                self._stream_args()
                self._end_call(complete=False)
                return text[i + 1 :]
            if call.scanner.done:
                if not self._end_call(complete=True):
                    return self._fall_back() + text[i + 1 :]
                return text[i + 1 :]
        self._stream_args()
        return ""

    def _on_scan(self, event: ScanEvent) -> bool:
        """Follows the members of the call's object; False if it cannot be a valid call."""
        call = self._call
        at = call.lead + event.at
        if event.depth == 0:
            return event.kind != "value_start" or call.raw[at] == "{"
        if event.depth > 1:
            return True
        if event.kind == "key_start":
            call.key_start = at
        elif event.kind == "key_end":
            call.key = json.loads(call.raw[call.key_start : at])
        elif event.kind == "value_start":
            call.value_start = at
            if call.key == "arguments" and call.args_start is None:
                call.args_start = at
                self._stream_args()  # the call starts here, however the text was chunked
        elif call.key == "name" and call.name is None:
            name = json.loads(call.raw[call.value_start : at])
            if not isinstance(name, str) or (self._names is not None and name not in self._names):
                return False
            call.name = name
            self._stream_args()
        elif call.key == "arguments" and call.args_end is None and at > (call.args_start or 0):
            call.args_end = at
        return True

    def _stream_args(self) -> None:
        """Sends the arguments read so far once the name is known (object arguments only)."""
        call = self._call
        if call.name is None or call.args_start is None or call.raw[call.args_start] != "{":
            return
        if call.id is None:
            call.id = self._new_id()
            self._out.append(ToolCallStart(call.id, call.name))
            call.streamed = call.args_start
        end = call.args_end if call.args_end is not None else len(call.raw)
        if end > call.streamed:
            self._out.append(ToolCallArgsDelta(call.id, call.raw[call.streamed : end]))
            call.streamed = end

    def _end_call(self, *, complete: bool) -> bool:
        """Emits the call's end; False if it was no valid call (nothing was emitted then)."""
        call = self._call
        value: object = {}
        if call.args_start is not None:
            end = call.args_end if call.args_end is not None else len(call.raw)
            value = _arguments(call.raw[call.args_start : end])
        if call.name is None or not isinstance(value, dict):
            return False
        if call.id is None:  # arguments that were no object, or none: sent whole now
            call.id = self._new_id()
            self._out.append(ToolCallStart(call.id, call.name))
            self._out.append(ToolCallArgsDelta(call.id, json.dumps(value, ensure_ascii=False)))
        elif complete:
            self._stream_args()
        self._out.append(ToolCallEnd(call.id, call.name, value, complete))
        self._mode, self._after_call = ("close" if complete else "skip"), True
        return True

    def _fall_back(self) -> str:
        """Not a call after all: the tag becomes text; returns what followed it, to read again."""
        raw = self._call.raw
        self._mode, self._call = "text", _Call()
        self._text(TOOL_CALL_OPEN)
        return raw


def _arguments(text: str) -> object:
    """The arguments' value; cut short, its complete members. A string holding JSON is read."""
    scanner = JsonScanner()
    for ch in text:
        scanner.push(ch)
        if scanner.failed:
            break
    value = json.loads(text) if scanner.done and not scanner.failed else scanner.completed(text)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _tag_prefix_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a start of `tag` (a tag split in two)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _coalesced(events: list[ToolEvent]) -> list[ToolEvent]:
    out: list[ToolEvent] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, TextPiece) and isinstance(last, TextPiece):
            out[-1] = TextPiece(last.text + event.text)
        elif isinstance(event, ToolCallArgsDelta) and isinstance(last, ToolCallArgsDelta):
            out[-1] = ToolCallArgsDelta(event.id, last.partial_json + event.partial_json)
        else:
            out.append(event)
    return out
