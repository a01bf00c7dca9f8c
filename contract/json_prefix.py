"""Reading JSON one character at a time: is this still a valid prefix, where do values end.

The tool-call parser streams a call's arguments while they are generated; this scanner tells it
which characters keep the text a valid JSON prefix, where keys and values start and end, and
how to close a prefix cut short into a complete value (keeping only the members that were
complete). Pure Python.
"""

import json
from dataclasses import dataclass

_WHITESPACE = " \t\n\r"
_LITERALS = {"t": "true", "f": "false", "n": "null"}
# Number automaton: state -> {character class -> next state}; the accepting states end a number.
_NUMBER = {
    "start": {"-": "minus", "0": "zero", "1": "int"},
    "minus": {"0": "zero", "1": "int"},
    "zero": {".": "dot", "e": "e"},
    "int": {"0": "int", "1": "int", ".": "dot", "e": "e"},
    "dot": {"0": "frac", "1": "frac"},
    "frac": {"0": "frac", "1": "frac", "e": "e"},
    "e": {"+": "sign", "-": "sign", "0": "exp", "1": "exp"},
    "sign": {"0": "exp", "1": "exp"},
    "exp": {"0": "exp", "1": "exp"},
}
_NUMBER_ENDS = frozenset({"zero", "int", "frac", "exp"})


def _number_class(ch: str) -> str:
    if ch == "0":
        return "0"
    if ch in "123456789":
        return "1"
    return "e" if ch in "eE" else ch


@dataclass(frozen=True)
class ScanEvent:
    """What one character did: a key or value started or ended at nesting `depth` (0: top)."""

    kind: str  # "key_start" | "key_end" | "value_start" | "value_end"
    depth: int
    at: int  # where: index of its first character (start) or just past its last (end)


class JsonScanner:
    """Validates JSON incrementally; `failed` once the text can no longer be JSON."""

    def __init__(self) -> None:
        self.stack: list[str] = []  # open containers, "{" or "["
        self.done = False  # a complete top-level value was read
        self.failed = False
        self._state = "value"  # value, value_or_close, key, key_or_close, colon, after, ...
        self._pending = ""  # rest of a literal being read
        self._number = "start"
        self._is_key = False
        self._hex_left = 0
        self._safe = 0  # characters read up to the last point where closing brackets suffice
        self._safe_closers = ""
        self._read = 0

    @property
    def depth(self) -> int:
        return len(self.stack)

    def push(self, ch: str) -> list[ScanEvent]:
        """Reads one character; returns what it did (nothing, and `failed`, on an error)."""
        if self.failed:
            return []
        events: list[ScanEvent] = []
        if self._state == "number":
            step = _NUMBER[self._number].get(_number_class(ch))
            if step is not None:
                self._number = step
                self._read += 1
                return events
            if self._number not in _NUMBER_ENDS:
                self.failed = True
                return []
            self._end_value(events, offset=0)  # the number ended before this character
        if not self._step(ch, events):
            self.failed = True
            return []
        self._read += 1
        return events

    def _step(self, ch: str, events: list[ScanEvent]) -> bool:
        state = self._state
        if state == "string":
            return self._string_step(ch, events)
        if state == "escape":
            if ch == "u":
                self._state, self._hex_left = "unicode", 4
            elif ch in '"\\/bfnrt':
                self._state = "string"
            else:
                return False
            return True
        if state == "unicode":
            if ch not in "0123456789abcdefABCDEF":
                return False
            self._hex_left -= 1
            self._state = "string" if self._hex_left == 0 else "unicode"
            return True
        if state == "literal":
            if ch != self._pending[0]:
                return False
            self._pending = self._pending[1:]
            if not self._pending:
                self._end_value(events)
            return True
        if ch in _WHITESPACE:
            return True
        return self._structural(ch, events)

    def _string_step(self, ch: str, events: list[ScanEvent]) -> bool:
        if ch == "\\":
            self._state = "escape"
        elif ch == '"':
            if self._is_key:
                self._state = "colon"
                events.append(ScanEvent("key_end", self.depth, self._read + 1))
            else:
                self._end_value(events)
        elif ord(ch) < 0x20:
            return False
        return True

    def _structural(self, ch: str, events: list[ScanEvent]) -> bool:
        state = self._state
        if state in ("key", "key_or_close"):
            if ch == '"':
                self._state, self._is_key = "string", True
                events.append(ScanEvent("key_start", self.depth, self._read))
                return True
            return state == "key_or_close" and ch == "}" and self._close("{", events)
        if state == "colon":
            if ch == ":":
                self._state = "value"
            return ch == ":"
        if state == "after":
            if ch == "," and self.stack:
                self._state = "key" if self.stack[-1] == "{" else "value"
                return True
            return (
                ch in "}]" and bool(self.stack) and self._close("[" if ch == "]" else "{", events)
            )
        if state == "value_or_close" and ch == "]":
            return self._close("[", events)
        if state in ("value", "value_or_close"):
            return self._start_value(ch, events)
        return False  # "end": only whitespace may follow a complete value

    def _start_value(self, ch: str, events: list[ScanEvent]) -> bool:
        events.append(ScanEvent("value_start", self.depth, self._read))
        if ch in "{[":
            self.stack.append(ch)
            self._state = "key_or_close" if ch == "{" else "value_or_close"
            self._mark_safe()
        elif ch == '"':
            self._state, self._is_key = "string", False
        elif ch in _LITERALS:
            self._state, self._pending = "literal", _LITERALS[ch][1:]
        elif _number_class(ch) in _NUMBER["start"]:
            self._state, self._number = "number", _NUMBER["start"][_number_class(ch)]
        else:
            return False
        return True

    def _close(self, opener: str, events: list[ScanEvent]) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self._end_value(events)
        return True

    def _end_value(self, events: list[ScanEvent], offset: int = 1) -> None:
        """A value ended with the current character (offset 1) or just before it (0)."""
        events.append(ScanEvent("value_end", self.depth, self._read + offset))
        if self.stack:
            self._state = "after"
            self._mark_safe(offset)
        else:
            self._state, self.done = "end", True
            self._safe, self._safe_closers = self._read + offset, ""

    def _mark_safe(self, offset: int = 1) -> None:
        # Right after a value or an opening bracket, closing the open brackets completes it.
        self._safe = self._read + offset
        self._safe_closers = "".join("}" if c == "{" else "]" for c in reversed(self.stack))

    def completed(self, text: str) -> object | None:
        """The value of `text` (what this scanner read) cut at the last complete member."""
        if self._safe == 0:
            return None
        parsed: object = json.loads(text[: self._safe] + self._safe_closers)
        return parsed


def complete_prefix(text: str) -> object | None:
    """The value a JSON prefix cut short stands for: its complete members, brackets closed."""
    scanner = JsonScanner()
    for ch in text:
        scanner.push(ch)
        if scanner.failed or scanner.done:
            break
    return scanner.completed(text)
