import re

import pytest

from contract.json_schema_support import (
    UnsupportedSchemaError,
    check_schema,
    first_problem,
)
from tests.unit.grammar_schemas import OUTPUTS, TOOLS


@pytest.mark.parametrize("schema", [*TOOLS.values(), *OUTPUTS], ids=lambda s: str(s)[:40])
def test_the_test_schemas_are_supported(schema: dict) -> None:
    assert first_problem(schema) is None


@pytest.mark.parametrize(
    ("schema", "keyword", "path"),
    [
        (
            {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]+$"}}},
            "pattern",
            "/properties/zip",
        ),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems", ""),
        ({"type": "number", "multipleOf": 0.5}, "multipleOf", ""),
        ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if", ""),
        ({"not": {"type": "null"}}, "not", ""),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", ""),
        ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties", ""),
        ({"type": "array", "prefixItems": [{"type": "string"}]}, "prefixItems", ""),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf", ""),
        ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "oneOf", ""),
        ({"anyOf": [{"type": "string"}], "maxLength": 3}, "anyOf", ""),
        ({"$ref": "https://example.com/schema.json"}, "$ref", ""),
        ({"$ref": "#/$defs/missing"}, "$ref", ""),
        ({"type": "strin"}, "type", ""),
        ({"type": "object", "properties": {"a": {"minLength": -1}}}, "minLength", "/properties/a"),
    ],
)
def test_unsupported_or_invalid_schemas_name_the_keyword_and_where(
    schema: dict, keyword: str, path: str
) -> None:
    problem = first_problem(schema)
    assert problem is not None
    assert (problem.keyword, problem.path) == (keyword, path)
    with pytest.raises(UnsupportedSchemaError, match=re.escape(keyword)):
        check_schema(schema)


def test_draft7_tuple_items_are_refused_under_draft7() -> None:
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "string"}]}
    problem = first_problem(schema)
    assert problem is not None and problem.keyword == "items"


def test_annotations_and_harmless_values_are_accepted() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://example.com/x",
        "title": "T",
        "description": "d",
        "type": "object",
        "properties": {
            "a": {"type": "string", "format": "email", "examples": ["x@y"], "default": "x@y"},
            "b": {"type": "array", "uniqueItems": False, "deprecated": True},
            "c": {"nullable": True, "x-vendor": 1, "type": "integer", "readOnly": True},
        },
        "minProperties": 0,
        "$comment": "c",
    }
    assert first_problem(schema) is None


def test_only_what_the_schema_reaches_is_checked() -> None:
    schema = {
        "$defs": {"used": {"type": "string"}, "unused": {"type": "string", "pattern": "x"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/used"}},
    }
    assert first_problem(schema) is None
    schema["properties"]["b"] = {"$ref": "#/$defs/unused"}
    problem = first_problem(schema)
    assert problem is not None and (problem.keyword, problem.path) == ("pattern", "/$defs/unused")


def test_a_discriminated_union_is_disjoint_but_an_optional_tag_is_not() -> None:
    cat = {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}
    dog = {"type": "object", "properties": {"kind": {"const": "dog"}}, "required": ["kind"]}
    assert first_problem({"oneOf": [cat, dog]}) is None
    loose_dog = {**dog, "required": []}
    problem = first_problem({"oneOf": [cat, loose_dog]})
    assert problem is not None and problem.keyword == "oneOf"


def test_recursive_references_terminate() -> None:
    schema = {"type": "object", "properties": {"next": {"$ref": "#"}, "p": {"pattern": "a"}}}
    problem = first_problem(schema)
    assert problem is not None and problem.path == "/properties/p"
