"""JSON Schema to a Lark grammar (llguidance's dialect) whose every output fits a byte budget.

Why bytes: every token of a byte-level BPE vocabulary is at least one byte, and the matcher
allows end-of-sequence only when the grammar is complete. So if the longest string the grammar
accepts has at most `budget` bytes, every sampled path is complete JSON within `budget` tokens:
it cannot grow past the budget, and from any prefix a completion exists within the budget.

How: every unbounded part gets a bound. Strings get a character limit (4 bytes a character:
no `\\u` escapes), numbers a digit limit, arrays an item limit; recursion ends as the budget
left for a nested value drops below the fewest bytes that value needs (below a nesting depth,
values get only their fewest bytes). An object first reserves what its required properties
need, keeps optional ones while their minimum fits, then water-fills the slack: bounded values
take what they can use, unbounded ones share the rest. No whitespace outside strings. Pure
Python; the schema has passed `contract.json_schema_support.check_schema` first.
"""

import json
from dataclasses import dataclass
from typing import Any

import jsonschema.validators

from contract.json_schema_support import resolve_ref
from workers.constraints.lexemes import UNBOUNDED, leaf_appetite, leaf_lexeme, leaf_min_bytes

# Items an array of unbounded items gets when the schema leaves the count open.
DEFAULT_ARRAY_ITEMS = 8
# Deeper than this many objects/arrays, values get only their fewest bytes (ends recursion soon).
MAX_NESTING = 24
_SCALAR: dict[str, Any] = {"type": ["null", "boolean", "number", "string"]}
_ANY: list[tuple[object, str]] = [
    (_SCALAR, "#scalar"),
    ({"const": {}}, "#{}"),
    ({"const": []}, "#[]"),
]
_INFERRED = (
    ("object", ("properties", "required", "additionalProperties")),
    ("array", ("items", "minItems", "maxItems")),
    ("string", ("minLength", "maxLength", "format")),
    ("number", ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")),
)
_ALL_TYPES = ["null", "boolean", "number", "string", "object", "array"]


class GrammarError(ValueError):
    """The schema (with this budget) has no grammar."""


class BudgetTooSmall(GrammarError):
    """Even the smallest valid output is longer than the budget."""

    def __init__(self, needed: int, budget: int) -> None:
        needs = "no finite output" if needed >= UNBOUNDED else f"{needed} bytes"
        super().__init__(f"the smallest output this schema allows needs {needs}; budget {budget}")
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True)
class Piece:
    """A Lark expression and the most bytes it matches."""

    lark: str
    max_bytes: int


def lark_string(text: str) -> str:
    """A Lark string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


def quantize(budget: int) -> int:
    """`budget` rounded down to 5 significant bits (< 6.25% less), so budgets share rules."""
    shift = max(0, budget.bit_length() - 5)
    return (budget >> shift) << shift


class LarkRules:
    """The rules of one grammar, named in order of creation; equal bodies share a name."""

    def __init__(self) -> None:
        self.bodies: dict[str, str] = {}  # body -> name

    def add(self, body: str) -> str:
        if body not in self.bodies:
            self.bodies[body] = f"r{len(self.bodies)}"
        return self.bodies[body]

    def text(self, start: str) -> str:
        lines = [f"start: {start}"] + [f"{name}: {body}" for body, name in self.bodies.items()]
        return "\n".join(lines) + "\n"


class SchemaCompiler:
    """Compiles one schema document (the root of its `$ref`s) into rules of a LarkRules."""

    def __init__(self, root: object, rules: LarkRules) -> None:
        self.root = root
        self.rules = rules
        validator = jsonschema.validators.validator_for(
            root, default=jsonschema.Draft202012Validator
        )
        self._validator = validator(root if isinstance(root, dict | bool) else {})
        self._min: dict[str, int] = {}
        self._settled = False
        self._appetite: dict[str, int] = {}
        self._pieces: dict[tuple[str, int], Piece | None] = {}
        self._kinds: dict[str, tuple[str, Any]] = {}
        self._depth = 0
        while True:  # a fixpoint: a `$ref` cycle sees its own estimate, first UNBOUNDED
            before = dict(self._min)
            self._min_of(root, "#", set())
            if before == self._min:
                break
        self._settled = True

    def min_bytes(self) -> int:
        """Fewest bytes of a valid output (UNBOUNDED: no output is finite)."""
        return self._min["#"]

    def compile(self, budget: int) -> Piece:
        """The root's rule, with every output within `budget` bytes."""
        if self.min_bytes() > budget:
            raise BudgetTooSmall(self.min_bytes(), budget)
        piece = self._piece(self.root, "#", budget)
        assert piece is not None and piece.max_bytes <= budget
        return piece

    def _classify(self, node: Any, path: str) -> tuple[str, Any]:
        """What a schema node is: ref, union, literal, or one of the JSON types."""
        if path not in self._kinds:
            self._kinds[path] = self._classify_uncached(node, path)
        return self._kinds[path]

    def _classify_uncached(self, node: Any, path: str) -> tuple[str, Any]:
        if node is True or node is None or node == {}:
            return "union", _ANY
        if not isinstance(node, dict):
            return "union", []  # `false`: nothing is valid
        if "$ref" in node:
            return "ref", (resolve_ref(self.root, node["$ref"]), node["$ref"])
        if "allOf" in node:
            return "ref", (node["allOf"][0], f"{path}/allOf/0")
        for keyword in ("anyOf", "oneOf"):
            if keyword in node:
                return "union", [(b, f"{path}/{keyword}/{i}") for i, b in enumerate(node[keyword])]
        if "const" in node or "enum" in node:
            values = [node["const"]] if "const" in node else node["enum"]
            checker = self._validator.evolve(schema=node)
            texts = [_compact(v) for v in values if checker.is_valid(v)]
            return "literal", list(dict.fromkeys(texts))
        types = _types(node)
        if len(types) == 1:
            return types[0], None
        return "union", [({**node, "type": t}, f"{path}/type/{t}") for t in types]

    # Fewest bytes.

    def _min_of(self, node: Any, path: str, stack: set[str]) -> int:
        if path in stack or (self._settled and path in self._min):
            return self._min.get(path, UNBOUNDED)
        stack.add(path)
        try:
            value = min(UNBOUNDED, self._min_uncached(node, path, stack))
        finally:
            stack.discard(path)
        self._min[path] = value
        return value

    def _min_uncached(self, node: Any, path: str, stack: set[str]) -> int:
        kind, payload = self._classify(node, path)
        if kind == "ref":
            ref_node, ref_path = payload
            return self._min_of(ref_node, ref_path, stack)
        if kind == "union":
            return min([self._min_of(n, p, stack) for n, p in payload], default=UNBOUNDED)
        if kind == "literal":
            return min((len(text.encode()) for text in payload), default=UNBOUNDED)
        if kind == "object":
            # Every entry is visited, so that all that is reachable is settled.
            entries = [
                (self._min_of(n, p, stack) + _key_bytes(k), r)
                for k, n, p, r in _entries(node, path)
            ]
            required = [size for size, r in entries if r]
            return 2 + sum(required) + max(0, len(required) - 1)
        if kind == "array":
            item = self._min_of(*_items(node, path), stack)
            count = int(node.get("minItems", 0))
            return 2 if count == 0 else 1 + count * (item + 1)
        return leaf_min_bytes(node, kind)

    # Natural size: how much of a budget a value can use (UNBOUNDED if it has no bound).

    def _appetite_of(self, node: Any, path: str, stack: set[str]) -> int:
        if path in self._appetite:
            return self._appetite[path]
        if path in stack:
            return UNBOUNDED  # recursive: as deep as the budget allows
        stack.add(path)
        try:
            value = min(UNBOUNDED, self._appetite_uncached(node, path, stack))
        finally:
            stack.discard(path)
        self._appetite[path] = value
        return value

    def _appetite_uncached(self, node: Any, path: str, stack: set[str]) -> int:
        kind, payload = self._classify(node, path)
        if kind == "ref":
            ref_node, ref_path = payload
            return self._appetite_of(ref_node, ref_path, stack)
        if kind == "union":
            return max([self._appetite_of(n, p, stack) for n, p in payload], default=0)
        if kind == "literal":
            return max((len(text.encode()) for text in payload), default=0)
        if kind == "object":
            sizes = [
                self._appetite_of(n, p, stack) + _key_bytes(k)
                for k, n, p, _ in _entries(node, path)
            ]
            return 2 + sum(sizes) + max(0, len(sizes) - 1)
        if kind == "array":
            if "maxItems" not in node:
                return UNBOUNDED
            count = int(node["maxItems"])
            item = self._appetite_of(*_items(node, path), stack)
            return 2 if count == 0 else 1 + count * (item + 1)
        return leaf_appetite(node, kind)

    # Compiling with a budget.

    def _piece(self, node: Any, path: str, budget: int) -> Piece | None:
        """The rule for `node` within `budget` bytes; None if nothing valid fits."""
        least = self._min_of(node, path, set())
        if least > budget:
            return None
        budget = least if self._depth >= MAX_NESTING else max(least, quantize(budget))
        key = (path, budget)
        if key not in self._pieces:
            self._pieces[key] = None  # a union that names itself adds nothing
            self._pieces[key] = self._build(node, path, budget)
        return self._pieces[key]

    def _build(self, node: Any, path: str, budget: int) -> Piece | None:
        kind, payload = self._classify(node, path)
        if kind == "ref":
            ref_node, ref_path = payload
            return self._piece(ref_node, ref_path, budget)
        if kind == "union":
            branches = [self._piece(n, p, budget) for n, p in payload]
            return self._alternatives([b for b in branches if b is not None])
        if kind == "literal":
            fitting = [t for t in payload if len(t.encode()) <= budget]
            return self._alternatives([Piece(lark_string(t), len(t.encode())) for t in fitting])
        if kind in ("object", "array"):
            self._depth += 1
            try:
                return (
                    self._object(node, path, budget)
                    if kind == "object"
                    else self._array(node, path, budget)
                )
            finally:
                self._depth -= 1
        lexeme = leaf_lexeme(node, kind, budget)
        return None if lexeme is None else Piece(lexeme.lark, lexeme.max_bytes)

    def _alternatives(self, pieces: list[Piece]) -> Piece | None:
        if not pieces:
            return None
        unique = list(dict.fromkeys(p.lark for p in pieces))
        longest = max(p.max_bytes for p in pieces)
        if len(unique) == 1:
            return Piece(unique[0], longest)
        return Piece(self.rules.add(" | ".join(unique)), longest)

    def _object(self, node: dict[str, Any], path: str, budget: int) -> Piece:
        entries = _entries(node, path)
        mins = [self._min_of(n, p, set()) + _key_bytes(k) for k, n, p, _ in entries]
        used = 1 + sum(size + 1 for size, entry in zip(mins, entries, strict=True) if entry[3])
        chosen: list[int] = []
        for i, entry in enumerate(entries):
            if not entry[3] and used + mins[i] + 1 <= budget:
                used += mins[i] + 1
            elif not entry[3]:
                continue  # an optional property that does not fit is never generated
            chosen.append(i)
        wants = [
            self._appetite_of(entries[i][1], entries[i][2], set())
            + _key_bytes(entries[i][0])
            - mins[i]
            for i in chosen
        ]
        shares = water_fill(max(0, budget - max(2, used)), [max(0, w) for w in wants])
        parts: list[tuple[str, int, bool]] = []
        for i, share in zip(chosen, shares, strict=True):
            key, child, child_path, required = entries[i]
            piece = self._piece(child, child_path, mins[i] - _key_bytes(key) + share)
            assert piece is not None
            label = lark_string(json.dumps(key, ensure_ascii=False) + ":")
            parts.append(
                (
                    self.rules.add(f"{label} {piece.lark}"),
                    _key_bytes(key) + piece.max_bytes,
                    required,
                )
            )
        longest = 2 + sum(size for _, size, _ in parts) + max(0, len(parts) - 1)
        return Piece(self.rules.add(f'"{{" {self._entry_sequence(parts)} "}}"'), longest)

    def _entry_sequence(self, parts: list[tuple[str, int, bool]]) -> str:
        """Entries in order, optional ones may be left out, commas only between entries."""
        after = ""  # the entries from here on when one was written before them
        first = ""  # the same when none was written yet
        for entry, _, required in reversed(parts):
            if required:
                first, after = _join(entry, after), _join('","', entry, after)
            else:
                present = _join(entry, after)
                first = f"({present} | {self.rules.add(first)})" if first else f"({present})?"
                after = _join(f'("," {entry})?', after)
            after = self.rules.add(after) if after else ""
        return first

    def _array(self, node: dict[str, Any], path: str, budget: int) -> Piece | None:
        items, items_path = _items(node, path)
        least, most = int(node.get("minItems", 0)), int(node.get("maxItems", UNBOUNDED))
        item_min = self._min_of(items, items_path, set())
        appetite = self._appetite_of(items, items_path, set())
        if appetite < UNBOUNDED and (budget - 1) // (appetite + 1) >= least:
            count = min(most, (budget - 1) // (appetite + 1))
        else:
            fits = (budget - 1) // (item_min + 1) if item_min < UNBOUNDED else 0
            count = min(most, fits, max(least, DEFAULT_ARRAY_ITEMS))
        if count == 0:
            return Piece('"[]"', 2) if least == 0 else None
        item = self._piece(items, items_path, (budget - 1) // count - 1)
        assert item is not None
        more = f'("," {item.lark}){{{max(0, least - 1)},{count - 1}}}' if count > 1 else ""
        inner = _join(item.lark, more)
        body = f'"[" {inner} "]"' if least > 0 else f'"[" ({inner})? "]"'
        return Piece(self.rules.add(body), 1 + count * (item.max_bytes + 1))


def water_fill(slack: int, wants: list[int]) -> list[int]:
    """Shares of `slack` (summing to at most it): small wants in full, the rest split evenly."""
    shares = [0] * len(wants)
    left, open_count = slack, len(wants)
    for i in sorted(range(len(wants)), key=lambda i: wants[i]):
        shares[i] = min(wants[i], left // open_count)
        left -= shares[i]
        open_count -= 1
    return shares


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _entries(node: dict[str, Any], path: str) -> list[tuple[str, object, str, bool]]:
    """(key, schema, path, required) per property generated, in schema order."""
    properties: dict[str, Any] = node.get("properties") or {}
    required = list(dict.fromkeys(node.get("required") or []))
    entries = [
        (k, s, f"{path}/properties/{_escape(k)}", k in required) for k, s in properties.items()
    ]
    extra = node.get("additionalProperties", True)
    for key in required:
        if key not in properties:  # required but undeclared: its value follows additionalProperties
            entries.append((key, extra, f"{path}/additionalProperties", True))
    return entries


def _types(node: dict[str, Any]) -> list[str]:
    declared = node.get("type")
    if declared is not None:
        names = [declared] if isinstance(declared, str) else list(dict.fromkeys(declared))
        if "number" in names and "integer" in names:
            names.remove("integer")  # every integer is a number
        return names
    inferred = [kind for kind, keywords in _INFERRED if any(k in node for k in keywords)]
    return inferred or _ALL_TYPES


def _items(node: dict[str, Any], path: str) -> tuple[object, str]:
    items = node.get("items")
    if items is None or items is True or items == {}:
        return _SCALAR, "#scalar"  # any item: scalars, so "an array of anything" cannot nest
    return items, f"{path}/items"


def _key_bytes(key: str) -> int:
    return len(json.dumps(key, ensure_ascii=False).encode()) + 1  # with the colon


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
