"""Which JSON Schema keywords grammar-constrained decoding enforces; the check the API runs first.

Forced tool calls (`tool_choice` `any` / `tool`) and structured output (`output_config.format`,
`output_format`) decode under a grammar compiled from the schema (`workers.constraints`). A
schema that uses a keyword the grammar cannot enforce is refused with a 400 that names the
keyword and where it is, before any output. Pure Python and `jsonschema`: the API imports this.

Keyword                          Treatment
-------------------------------  -----------------------------------------------------------------
type (one or a list), enum,      enforced
  const
properties, required             enforced; properties come out in schema order, optional ones
                                 may be left out
additionalProperties             false: enforced. true or a schema: accepted, and no undeclared
                                 key is ever generated (a subset of what the schema allows)
items (one schema), minItems,    enforced
  maxItems
minLength, maxLength             enforced, in characters as JSON Schema counts them
minimum, maximum,                enforced (the numeric forms)
  exclusiveMinimum,
  exclusiveMaximum
format                           date, time, date-time, uuid, ipv4: enforced. Any other format
                                 is an annotation (JSON Schema 2020-12's default): not enforced
anyOf                            enforced
oneOf                            enforced when its branches are provably disjoint: different
                                 types, different const/enum values, or a property required in
                                 both with different const/enum values (discriminated unions);
                                 refused otherwise
allOf                            one subschema (generators wrap a $ref so); refused with more
$ref, $defs, definitions         local references: "#", "#/$defs/x", any JSON pointer
title, description, default,     annotations: accepted and ignored, they do not constrain what
  examples, $comment, $schema,   a valid output is
  $id, $anchor, deprecated,
  readOnly, writeOnly,
  contentMediaType,
  contentEncoding, and keywords
  JSON Schema does not define
  (nullable, discriminator, x-)
uniqueItems: false,              accepted (they constrain nothing)
  minProperties: 0
pattern, patternProperties,      refused with a 400 naming the keyword: they constrain the
  propertyNames, minProperties,  output and the grammar does not enforce them
  maxProperties, multipleOf,
  uniqueItems, contains,
  minContains, maxContains,
  prefixItems, additionalItems,
  items as an array, not, if,
  then, else, dependentRequired,
  dependentSchemas,
  dependencies,
  unevaluatedProperties,
  unevaluatedItems, $dynamicRef,
  $dynamicAnchor, $recursiveRef,
  $recursiveAnchor,
  contentSchema, a remote $ref
anyOf / oneOf / allOf / $ref     refused (an intersection the grammar does not compute);
  beside constraining keywords   annotations beside them are fine

Only what the schema reaches is checked: an unused entry of $defs may use anything.
The schema itself must be valid for its `$schema` draft (2020-12 when absent).
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "$schema",
        "$id",
        "$anchor",
        "$vocabulary",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentMediaType",
        "contentEncoding",
        "$defs",
        "definitions",
    }
)
ENFORCED = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
    }
)
REFUSED = frozenset(
    {
        "pattern",
        "patternProperties",
        "propertyNames",
        "minProperties",
        "maxProperties",
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "prefixItems",
        "additionalItems",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedProperties",
        "unevaluatedItems",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
        "$recursiveAnchor",
        "contentSchema",
    }
)
# Refused keywords whose value here constrains nothing.
HARMLESS_VALUES: dict[str, object] = {"uniqueItems": False, "minProperties": 0}
ENFORCED_FORMATS = frozenset({"date", "time", "date-time", "uuid", "ipv4"})
COMBINATORS = ("anyOf", "oneOf", "allOf", "$ref")
TYPES = frozenset({"null", "boolean", "integer", "number", "string", "array", "object"})


@dataclass(frozen=True)
class SchemaProblem:
    """Why a schema cannot be enforced: the keyword, where (a JSON pointer), and a sentence."""

    keyword: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.message} (keyword '{self.keyword}' at '{self.path or '/'}')"


class UnsupportedSchemaError(ValueError):
    """A schema that grammar-constrained decoding cannot enforce."""

    def __init__(self, problem: SchemaProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def check_schema(schema: object) -> None:
    """Raises UnsupportedSchemaError naming the first problem; returns if the schema is fine."""
    problem = first_problem(schema)
    if problem is not None:
        raise UnsupportedSchemaError(problem)


def first_problem(schema: object) -> SchemaProblem | None:
    """The first reason `schema` cannot be enforced (invalid, or an unsupported keyword)."""
    if not isinstance(schema, dict | bool):
        return SchemaProblem("type", "", "a JSON schema must be an object or a boolean")
    if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
        return SchemaProblem("$schema", "", "'$schema' must be a string (a dialect's URI)")
    invalid = _metaschema_problem(schema)
    if invalid is not None:
        return invalid
    return next(_problems(schema, schema, "", set()), None)


def _metaschema_problem(schema: dict[str, Any] | bool) -> SchemaProblem | None:
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    error = jsonschema.exceptions.best_match(validator(validator.META_SCHEMA).iter_errors(schema))
    if error is None:
        return None
    where = list(error.absolute_path)
    keyword = str(where[-1]) if where else str(error.validator)
    path = "".join(f"/{_escape(str(p))}" for p in where[:-1])
    return SchemaProblem(keyword, path, f"the schema is not valid: {error.message}")


def _problems(
    node: object, root: dict[str, Any] | bool, path: str, seen: set[str]
) -> Iterator[SchemaProblem]:
    """Walks what the schema reaches from `node` (through `$ref`, never unused `$defs`)."""
    if not isinstance(node, dict):
        return  # true / false schemas
    constraining = [k for k in node if k in ENFORCED or k in REFUSED]
    for keyword in constraining:
        if keyword in REFUSED and HARMLESS_VALUES.get(keyword, ...) != node[keyword]:
            yield SchemaProblem(keyword, path, f"'{keyword}' cannot be enforced by the decoder")
            return
    combinators = [k for k in constraining if k in COMBINATORS]
    if combinators and len(constraining) > 1:
        others = sorted(set(constraining) - {combinators[0]})
        yield SchemaProblem(
            combinators[0],
            path,
            f"'{combinators[0]}' beside other constraints ({', '.join(others)}) cannot be enforced",
        )
        return
    yield from _keyword_problems(node, root, path)
    ref = node.get("$ref")
    if isinstance(ref, str) and ref not in seen:
        seen.add(ref)
        yield from _problems(resolve_ref(root, ref), root, unquote(ref[1:]), seen)
    for child, child_path in _subschemas(node, path):
        yield from _problems(child, root, child_path, seen)


def _keyword_problems(
    node: dict[str, Any], root: dict[str, Any] | bool, path: str
) -> Iterator[SchemaProblem]:
    if isinstance(node.get("items"), list):
        yield SchemaProblem("items", path, "'items' as an array (tuple form) cannot be enforced")
    if "allOf" in node and len(node["allOf"]) != 1:
        yield SchemaProblem("allOf", path, "'allOf' with more than one schema cannot be enforced")
    if "$ref" in node and resolve_ref(root, node["$ref"]) is None:
        yield SchemaProblem(
            "$ref", path, f"'$ref' {node['$ref']!r} does not resolve to a place in this schema"
        )
    if "oneOf" in node and not _pairwise_disjoint(node["oneOf"], root):
        yield SchemaProblem(
            "oneOf", path, "'oneOf' branches that may overlap cannot be enforced; use 'anyOf'"
        )


def _subschemas(node: dict[str, Any], path: str) -> Iterator[tuple[object, str]]:
    for name, child in (node.get("properties") or {}).items():
        yield child, f"{path}/properties/{_escape(name)}"
    for keyword in ("anyOf", "oneOf", "allOf"):
        for i, child in enumerate(node.get(keyword) or []):
            yield child, f"{path}/{keyword}/{i}"
    for keyword in ("items", "additionalProperties"):
        if isinstance(node.get(keyword), dict):
            yield node[keyword], f"{path}/{keyword}"


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def resolve_ref(root: object, ref: object) -> object | None:
    """The schema a local `$ref` ("#", "#/$defs/x", any JSON pointer) names; None otherwise."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    pointer = unquote(ref[1:])
    if not pointer:
        return node
    if not pointer.startswith("/"):
        return None  # "#name" anchors are not supported
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _pairwise_disjoint(branches: list[object], root: object) -> bool:
    shapes = [_shape(b, root) for b in branches]
    return all(
        _disjoint(shapes[i], shapes[j])
        for i in range(len(shapes))
        for j in range(i + 1, len(shapes))
    )


@dataclass(frozen=True)
class _Shape:
    """What a branch is known to allow: its types, its literal values, its discriminators."""

    types: frozenset[str] | None  # None: any type
    literals: tuple[str, ...] | None  # canonical JSON of const/enum values; None: not a literal
    tags: dict[str, tuple[str, ...]]  # required property -> its const/enum values (JSON)


def _shape(branch: object, root: object, depth: int = 0) -> _Shape:
    while isinstance(branch, dict) and depth < 16:
        inner = branch.get("$ref") or (branch.get("allOf") or [None])[0]
        if inner is None:
            break
        branch = resolve_ref(root, inner) if isinstance(inner, str) else inner
        depth += 1
    if not isinstance(branch, dict):
        return _Shape(None, None, {})
    literals = _literals(branch)
    types = _types(branch)
    if types is None and literals is not None:
        types = frozenset(_json_type(v) for v in _literal_values(branch))
    tags: dict[str, tuple[str, ...]] = {}
    props = branch.get("properties") or {}
    for name in branch.get("required") or []:
        child = props.get(name)
        if isinstance(child, dict):
            values = _literals(_shape_target(child, root))
            if values is not None:
                tags[name] = values
    return _Shape(types, literals, tags)


def _shape_target(node: dict[str, Any], root: object) -> dict[str, Any]:
    target = resolve_ref(root, node["$ref"]) if "$ref" in node else node
    return target if isinstance(target, dict) else {}


def _types(node: dict[str, Any]) -> frozenset[str] | None:
    declared = node.get("type")
    if declared is None:
        return None
    names = {declared} if isinstance(declared, str) else set(declared)
    if "number" in names:
        names.add("integer")  # every integer is a number
    return frozenset(names)


def _literal_values(node: dict[str, Any]) -> list[object]:
    if "const" in node:
        return [node["const"]]
    return list(node.get("enum") or [])


def _literals(node: dict[str, Any]) -> tuple[str, ...] | None:
    if "const" not in node and "enum" not in node:
        return None
    return tuple(canonical_json(v) for v in _literal_values(node))


def canonical_json(value: object) -> str:
    """Compact JSON with sorted keys, so equal values compare equal (1 and 1.0 too)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _disjoint(a: _Shape, b: _Shape) -> bool:
    if a.types is not None and b.types is not None and not (a.types & b.types):
        return True
    if a.literals is not None and b.literals is not None and not set(a.literals) & set(b.literals):
        return True
    return any(
        name in b.tags and not set(values) & set(b.tags[name]) for name, values in a.tags.items()
    )
