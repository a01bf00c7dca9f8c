"""The leaves of constrained JSON as bounded regexes: strings, integers, decimals, formats.

Each lexeme knows the most bytes it can match, so the compiler can keep a whole grammar's
longest output within a byte budget. The regexes use the syntax common to Python's `re` and
Rust's `regex` (what llguidance reads), and contain no `/`, so they sit inside Lark's `/.../`.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

# A string character: printable ASCII but `"` and `\`, a short escape, or any non-ASCII code
# point (2-4 bytes of UTF-8). No `\uXXXX` escapes: every character can be written as itself, and
# this keeps each character at 4 bytes at most. Control characters other than \n \r \t are out.
STRING_CHAR = r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\nrt]|[^\x00-\x7f])'
MAX_CHAR_BYTES = 4
# Digits of a generated decimal's fraction; with the integer part, at most 15 significant digits,
# which a float64 holds exactly, so a parsed value never rounds across a bound.
FRACTION_DIGITS = 6
SIGNIFICANT_DIGITS = 15

_HOUR = r"(?:[01][0-9]|2[0-3])"
_MINUTE = r"[0-5][0-9]"
_TIME = rf"{_HOUR}:{_MINUTE}:{_MINUTE}(?:\.[0-9]{{1,6}})?(?:Z|[+-]{_HOUR}:{_MINUTE})"
# Days 29-31 only in months that have them; never February 29th, which needs a leap year.
_DATE = (
    r"[1-9][0-9]{3}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
    r"|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)"
)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_HEX = "[0-9a-f]"
# format -> (regex of the string's content, fewest characters, most characters)
FORMATS: dict[str, tuple[str, int, int]] = {
    "date": (_DATE, 10, 10),
    "time": (_TIME, 9, 21),
    "date-time": (f"{_DATE}T{_TIME}", 20, 32),
    "uuid": (f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}", 36, 36),
    "ipv4": (rf"{_OCTET}(?:\.{_OCTET}){{3}}", 7, 15),
}


@dataclass(frozen=True)
class Lexeme:
    """A regex (without slashes) and the most bytes a match has."""

    regex: str
    max_bytes: int

    @property
    def lark(self) -> str:
        return f"/{self.regex}/"


def string_lexeme(min_chars: int, max_chars: int) -> Lexeme | None:
    """A JSON string of min..max characters; None if min > max."""
    if min_chars > max_chars:
        return None
    return Lexeme(f'"{STRING_CHAR}{{{min_chars},{max_chars}}}"', 2 + MAX_CHAR_BYTES * max_chars)


def format_lexeme(fmt: object, min_chars: int, max_chars: int) -> Lexeme | None:
    """A JSON string in a known format's shape, if that shape keeps within min..max characters."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        return None
    content, shortest, longest = FORMATS[fmt]
    if shortest < min_chars or longest > max_chars:
        return None
    return Lexeme(f'"{content}"', 2 + longest)  # formats are ASCII


@dataclass(frozen=True)
class Bounds:
    """A numeric range; None is unbounded. Exclusive ends exclude their value."""

    low: Fraction | None = None
    low_exclusive: bool = False
    high: Fraction | None = None
    high_exclusive: bool = False

    def integers(self) -> tuple[int | None, int | None]:
        """The smallest and largest integer inside (None: unbounded)."""
        low = None if self.low is None else _ceil_above(self.low, self.low_exclusive)
        high = None if self.high is None else -_ceil_above(-self.high, self.high_exclusive)
        return low, high

    def mirrored(self) -> "Bounds":
        return Bounds(
            None if self.high is None else -self.high,
            self.high_exclusive,
            None if self.low is None else -self.low,
            self.low_exclusive,
        )

    def contains(self, value: Fraction) -> bool:
        above = (
            self.low is None or value > self.low or (value == self.low and not self.low_exclusive)
        )
        below = (
            self.high is None
            or value < self.high
            or (value == self.high and not self.high_exclusive)
        )
        return above and below


def _ceil_above(value: Fraction, exclusive: bool) -> int:
    return math.floor(value) + 1 if exclusive else math.ceil(value)


def integer_range_regex(low: int, high: int) -> str:
    """A regex matching exactly the decimal integers low..high (no leading zeros, no -0)."""
    if low > high:
        raise ValueError(f"empty range {low}..{high}")
    parts: list[str] = []
    if low < 0:
        negative = _nonnegative_range(max(1, -high), -low)
        parts.append("-" + _group(negative))
    if high >= 0:
        parts.extend(_nonnegative_range(max(0, low), high))
    return _group(parts)


def _group(alternatives: list[str]) -> str:
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def _nonnegative_range(low: int, high: int) -> list[str]:
    out: list[str] = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        first = low if digits == len(str(low)) else 10 ** (digits - 1)
        last = high if digits == len(str(high)) else 10**digits - 1
        out.extend(_same_length(str(first), str(last)))
    return out


def _same_length(low: str, high: str) -> list[str]:
    """Alternatives for the digit strings low..high, both of one length."""
    if low == high:
        return [low]
    if len(low) == 1:
        return [f"[{low}-{high}]"]
    common = 0
    while low[common] == high[common]:
        common += 1
    prefix, low, high = low[:common], low[common:], high[common:]
    rest = len(low) - 1
    if rest == 0:
        return [f"{prefix}[{low}-{high}]"]
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return [f"{prefix}[{low[0]}-{high[0]}][0-9]{{{rest}}}"]
    out = [prefix + low[0] + tail for tail in _same_length(low[1:], "9" * rest)]
    if int(high[0]) - int(low[0]) > 1:
        out.append(f"{prefix}[{int(low[0]) + 1}-{int(high[0]) - 1}][0-9]{{{rest}}}")
    out.extend(prefix + high[0] + tail for tail in _same_length("0" * rest, high[1:]))
    return out


def _clamp(low: int | None, high: int | None, max_len: int, max_digits: int) -> tuple[int, int]:
    """The integers of low..high whose decimal form has at most max_len bytes, max_digits digits."""
    top = 10 ** min(max_len, max_digits) - 1
    bottom = -(10 ** min(max_len - 1, max_digits) - 1)
    return max(bottom, low if low is not None else bottom), min(
        top, high if high is not None else top
    )


def _digit_cap(low: int | None, high: int | None) -> int:
    # Enough digits for the value nearest zero, so a range far from zero is still reachable.
    nearest = low if low is not None and low > 0 else high if high is not None and high < 0 else 0
    return max(SIGNIFICANT_DIGITS, len(str(abs(nearest))))


def integer_lexeme(bounds: Bounds, max_bytes: int) -> Lexeme | None:
    """Integers within `bounds` written in at most `max_bytes` bytes; None if there is none."""
    low, high = bounds.integers()
    first, last = _clamp(low, high, max_bytes, _digit_cap(low, high))
    if first > last:
        return None
    return Lexeme(integer_range_regex(first, last), max(len(str(first)), len(str(last))))


def number_lexeme(bounds: Bounds, max_bytes: int) -> Lexeme | None:
    """Integers and decimals (no exponent) within `bounds`, in at most `max_bytes` bytes."""
    alternatives: list[Lexeme] = []
    whole = integer_lexeme(bounds, max_bytes)
    if whole is not None:
        alternatives.append(whole)
    fraction = min(FRACTION_DIGITS, max(1, (max_bytes - 2) // 2))
    for sign, side in (("", bounds), ("-", bounds.mirrored())):
        part = _decimal_part(side, max_bytes - len(sign), fraction)
        if part is not None:
            alternatives.append(Lexeme(sign + part.regex, len(sign) + part.max_bytes))
    if not alternatives:
        return _number_literal(bounds, max_bytes)
    regex = _group([a.regex for a in alternatives])
    return Lexeme(regex, max(a.max_bytes for a in alternatives))


def _decimal_part(bounds: Bounds, max_bytes: int, fraction: int) -> Lexeme | None:
    """`i.ddd` with i >= 0 such that every value in [i, i + 1) lies within `bounds`."""
    low, _ = bounds.integers()
    first = max(0, low if low is not None else 0)
    last_limit = None if bounds.high is None else math.floor(bounds.high) - 1
    digits = min(max_bytes - 1 - fraction, SIGNIFICANT_DIGITS - fraction)
    if digits < 1:
        return None
    last = 10**digits - 1 if last_limit is None else min(last_limit, 10**digits - 1)
    if first > last:
        return None
    regex = f"{integer_range_regex(first, last)}\\.[0-9]{{1,{fraction}}}"
    return Lexeme(regex, len(str(last)) + 1 + fraction)


def _number_literal(bounds: Bounds, max_bytes: int) -> Lexeme | None:
    """For a range holding no integer and no whole unit interval: a short float inside it."""
    if bounds.low is None or bounds.high is None:
        return None
    middle = float((bounds.low + bounds.high) / 2)
    for precision in range(1, 18):
        text = f"{middle:.{precision}g}"
        if "e" in text or len(text) > max_bytes:
            continue
        if bounds.contains(Fraction(float(text))):
            return Lexeme(text.replace(".", "\\."), len(text))
    return None


def numeric_lexeme(bounds: Bounds, integer: bool, max_bytes: int) -> Lexeme | None:
    """An integer or number lexeme within `bounds` in at most `max_bytes` bytes."""
    if integer:
        return integer_lexeme(bounds, max_bytes)
    return number_lexeme(bounds, max_bytes)


def numeric_min_bytes(bounds: Bounds, integer: bool, limit: int = 400) -> int | None:
    """The fewest bytes that hold such a lexeme; None if none fits in `limit` bytes.

    More bytes never take a value away, so the first budget that works is the answer; it is
    the length of the value nearest zero, a few bytes for most ranges.
    """
    for budget in range(1, limit + 1):
        if numeric_lexeme(bounds, integer, budget) is not None:
            return budget
    return None


# From a schema node of one scalar type ("null", "boolean", "string", "integer", "number").

UNBOUNDED = 1 << 40  # "no finite size": larger than any budget
_NUMBER_PROBE_BYTES = 64  # more than any natural number needs (digits are capped below it)


def leaf_lexeme(node: dict[str, Any], kind: str, max_bytes: int) -> Lexeme | None:
    """The lexeme of a scalar node whose matches fit in `max_bytes`; None if none fits."""
    if kind == "null":
        return Lexeme("null", 4) if max_bytes >= 4 else None
    if kind == "boolean":
        return Lexeme("(?:true|false)" if max_bytes >= 5 else "true", min(5, max_bytes))
    if kind != "string":
        return numeric_lexeme(bounds_of(node), kind == "integer", max_bytes)
    least = int(node.get("minLength", 0))
    longest = int(node.get("maxLength", UNBOUNDED))
    shaped = format_lexeme(node.get("format"), least, longest)
    if shaped is not None:  # an enforced format is never dropped for a plain string
        return shaped if shaped.max_bytes <= max_bytes else None
    return string_lexeme(least, min(longest, (max_bytes - 2) // MAX_CHAR_BYTES))


def leaf_min_bytes(node: dict[str, Any], kind: str) -> int:
    """The smallest budget `leaf_lexeme` yields a lexeme for (UNBOUNDED: none)."""
    if kind in ("null", "boolean"):
        return 4
    if kind == "string":
        least = int(node.get("minLength", 0))
        longest = int(node.get("maxLength", UNBOUNDED))
        if least > longest:
            return UNBOUNDED
        shaped = format_lexeme(node.get("format"), least, longest)
        return 2 + MAX_CHAR_BYTES * least if shaped is None else shaped.max_bytes
    needed = numeric_min_bytes(bounds_of(node), kind == "integer")
    return UNBOUNDED if needed is None else needed


def leaf_appetite(node: dict[str, Any], kind: str) -> int:
    """The most bytes a scalar node can use (UNBOUNDED for a string without maxLength)."""
    if kind == "string":
        least = int(node.get("minLength", 0))
        shaped = format_lexeme(node.get("format"), least, int(node.get("maxLength", UNBOUNDED)))
        if shaped is not None:
            return shaped.max_bytes
        if "maxLength" not in node:
            return UNBOUNDED
        return 2 + MAX_CHAR_BYTES * int(node["maxLength"])
    lexeme = leaf_lexeme(node, kind, _NUMBER_PROBE_BYTES)
    return 0 if lexeme is None else lexeme.max_bytes


def bounds_of(node: dict[str, Any]) -> Bounds:
    """The numeric range of a schema node (the tighter of inclusive and exclusive bounds)."""

    def exact(name: str) -> Fraction | None:
        value = node.get(name)
        return None if value is None or isinstance(value, bool) else Fraction(value)

    low, high = exact("minimum"), exact("maximum")
    low_ex, high_ex = exact("exclusiveMinimum"), exact("exclusiveMaximum")
    low_exclusive = low_ex is not None and (low is None or low_ex >= low)
    high_exclusive = high_ex is not None and (high is None or high_ex <= high)
    return Bounds(
        low_ex if low_exclusive else low,
        low_exclusive,
        high_ex if high_exclusive else high,
        high_exclusive,
    )
