"""Client text never becomes special tokens: marks around it while rendering, then an encoder
that only lets the template's own text produce special tokens.

A chat template renders client text (messages, system prompts, tool definitions, tool
results) among its own markup. Tokenizing the result in one piece reads a `<|im_end|>` typed
by a user as the control token, so a user could forge turns. Instead the renderer wraps every
client string in marks (`ContentMarks.mark`) before the template sees it, reads the marks back
out of the rendered text (`ContentMarks.split`), and `SafeEncoder` encodes the marked spans with
special-token matching off (the `tokenizers` flag `encode_special_tokens`).

Marks are `[@<nonce>:<k>@[` before and `]@<nonce>:<k>@]` after the k-th distinct string, with a
random nonce per render, so client text cannot contain one. They are printable ASCII without
JSON or HTML specials, so `tojson` and `escape` keep them, and an equal string gets an equal
mark, so templates that compare names (a property in `required`) still match. Leading and
trailing whitespace stays outside the marks, so a template's `trim` acts as on unmarked text.
A template that cuts a marked string (slicing, `split`) leaves one mark alone: the client span
is then the longest prefix (or suffix) of the text beside that mark that matches the string.
Either way client text never escapes its span; at worst some template text near a cut is
encoded as plain text.
"""

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from contract.json_schema_support import ANNOTATIONS, ENFORCED, REFUSED, TYPES

# Any render's marks; a mark with another render's nonce is plain text (client text).
_MARK = re.compile(r"\[@([0-9a-f]+):(\d+)@\[|\]@([0-9a-f]+):(\d+)@\]")

# Keys of a JSON schema that are vocabulary, not client names: left unmarked so templates
# can look them up. Everything else in a tool definition is client text.
SCHEMA_KEYWORDS = ANNOTATIONS | ENFORCED | REFUSED | {"nullable", "discriminator"}


@dataclass(frozen=True)
class MarkedText:
    """Rendered text with its marks removed, and where client text is in it."""

    text: str
    content: list[tuple[int, int]]  # [start, end) character ranges of client text
    seen: frozenset[int] = frozenset()  # indexes of the marked strings that came out


@dataclass
class ContentMarks:
    """The marks of one render."""

    nonce: str = field(default_factory=lambda: secrets.token_hex(6))
    _strings: list[str] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)

    def mark(self, text: str) -> str:
        """`text` with marks around everything but its outer whitespace."""
        core = text.strip()
        if not core:
            return text
        k = self.index(core)
        start = text.index(core)
        opening, closing = f"[@{self.nonce}:{k}@[", f"]@{self.nonce}:{k}@]"
        return text[:start] + opening + core + closing + text[start + len(core) :]

    def index(self, core: str) -> int:
        """The number of a marked string (the same string, the same number)."""
        if core not in self._index:
            self._index[core] = len(self._strings)
            self._strings.append(core)
        return self._index[core]

    def mark_schema(self, value: Any, *, names: bool = False) -> Any:
        """A JSON value with its client strings marked; JSON Schema keywords (and type names
        as `type` values) stay as they are. `names`: the keys are names (under `properties`)."""
        if isinstance(value, str):
            return self.mark(value)
        if isinstance(value, list):
            return [self.mark_schema(v) for v in value]
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "type" and not names and _is_type_name(item):
                out[key] = item
                continue
            plain_key = not names and key in SCHEMA_KEYWORDS
            out[key if plain_key else self.mark(key)] = self.mark_schema(
                item, names=plain_key and key in _NAME_MAPS
            )
        return out

    def clean(self, text: str) -> str:
        """`text` without marks (an error message that quotes client text)."""
        return "".join(text for text, _ in self._segments(text, set()))

    def _marks(self, rendered: str) -> Iterator[tuple[re.Match[str], tuple[bool, int]]]:
        """This render's marks: (match, (is an opening mark, k))."""
        for match in _MARK.finditer(rendered):
            opening = match.group(1) is not None
            nonce, k = match.group(1, 2) if opening else match.group(3, 4)
            if nonce == self.nonce:
                yield match, (opening, int(k))

    def split(self, rendered: str) -> MarkedText:
        """The rendered text without marks, and the ranges of client text in it."""
        out: list[str] = []
        content: list[tuple[int, int]] = []
        seen: set[int] = set()
        length = 0
        for text, is_content in self._segments(rendered, seen):
            if not text:
                continue
            if is_content:
                if content and content[-1][1] == length:
                    content[-1] = (content[-1][0], length + len(text))
                else:
                    content.append((length, length + len(text)))
            out.append(text)
            length += len(text)
        return MarkedText("".join(out), content, frozenset(seen))

    def _segments(self, rendered: str, seen: set[int]) -> Iterator[tuple[str, bool]]:
        # Each stretch between two marks is judged by the marks around it alone.
        left: tuple[bool, int] | None = None  # (is an opening mark, k)
        pos = 0
        for match, right in self._marks(rendered):
            seen.add(right[1])
            yield from self._stretch(rendered[pos : match.start()], left, right)
            pos, left = match.end(), right
        yield from self._stretch(rendered[pos:], left, None)

    def _stretch(
        self, text: str, left: tuple[bool, int] | None, right: tuple[bool, int] | None
    ) -> Iterator[tuple[str, bool]]:
        opened = left is not None and left[0]
        closed = right is not None and not right[0]
        if opened and closed and left is not None and right is not None and left[1] == right[1]:
            yield text, True
            return
        head = _common_prefix(text, self._strings[left[1]]) if opened and left else 0
        rest = text[head:]
        tail = _common_suffix(rest, self._strings[right[1]]) if closed and right else 0
        yield text[:head], True
        yield rest[: len(rest) - tail], False
        yield rest[len(rest) - tail :], True


# Keywords whose value maps names (property names, definition names) to schemas.
_NAME_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def _is_type_name(value: object) -> bool:
    if isinstance(value, str):
        return value in TYPES
    return isinstance(value, list) and all(isinstance(v, str) and v in TYPES for v in value)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: str, b: str) -> int:
    return _common_prefix(a[::-1], b[::-1])


class SafeEncoder:
    """Token ids of rendered text in which only text outside client ranges becomes special
    tokens; elsewhere exactly what the tokenizer gives for the whole text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # A second instance, so the flag never changes under a concurrent encode.
        self.plain = Tokenizer.from_str(tokenizer.to_str())
        self.plain.encode_special_tokens = True
        special = {i: t for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset(special)
        texts = sorted({t.content for t in special.values()}, key=len, reverse=True)
        self._texts = re.compile("|".join(map(re.escape, texts))) if texts else None
        self._longest = max(map(len, texts), default=0)
        # A special token matched after normalization (NFKC, lowercasing) may not show in
        # the raw text: then every encoding is checked token by token.
        normalized = any(t.normalized for t in special.values())
        self._raw_text_shows = tokenizer.normalizer is None or not normalized

    def encode(self, marked: MarkedText) -> list[int]:
        encoding = self.tokenizer.encode(marked.text, add_special_tokens=False)
        ids: list[int] = encoding.ids
        if self._raw_text_shows and not self._may_hold_special(marked):
            return list(ids)  # the common case, found without looking at every token
        specials = [
            (i, start, end)
            for i, (token, (start, end)) in enumerate(zip(ids, encoding.offsets, strict=True))
            if token in self.special_ids
        ]
        if not any(_overlaps(start, end, marked.content) for _, start, end in specials):
            return list(ids)  # the common case: no client text looks like a special token
        # Cut at the template's special tokens only; encode the text between as plain text.
        out: list[int] = []
        pos = 0
        for i, start, end in specials:
            if _overlaps(start, end, marked.content):
                continue
            out.extend(self.encode_plain(marked.text[pos:start]))
            out.append(ids[i])
            pos = end
        out.extend(self.encode_plain(marked.text[pos:]))
        return out

    def _may_hold_special(self, marked: MarkedText) -> bool:
        """Whether special-token text is in or across the edge of a client range."""
        if self._texts is None:
            return False
        reach = self._longest - 1
        for start, end in marked.content:
            near = self._texts.finditer(marked.text, max(0, start - reach), end + reach)
            if any(m.start() < end and start < m.end() for m in near):
                return True
        return False

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens in them."""
        if not text:
            return []
        return list(self.plain.encode(text, add_special_tokens=False).ids)


def _overlaps(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start < r_end and r_start < end for r_start, r_end in ranges)
