"""Realistic tool and structured-output schemas for the constrained-decoding tests."""

from typing import Any

TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["location"],
        "additionalProperties": False,
    },
    "search_files": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 40},
            "paths": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "max_results": {"type": "integer", "exclusiveMinimum": 0},
            "include_hidden": {"type": "boolean", "default": False},
            "filter": {"$ref": "#/definitions/filter"},
        },
        "required": ["query", "filter"],
        "additionalProperties": False,
        "definitions": {
            "filter": {
                "type": "object",
                "properties": {
                    "extension": {"type": ["string", "null"], "maxLength": 8},
                    "modified_after": {"type": "string", "format": "date"},
                },
                "required": ["extension"],
            }
        },
    },
    "create_event": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "start": {"$ref": "#/$defs/time"},
            "attendees": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "email": {"type": "string", "format": "email", "maxLength": 12},
                        "optional": {"type": "boolean"},
                    },
                    "required": ["email"],
                    "additionalProperties": False,
                },
            },
            "reminder_minutes": {"anyOf": [{"type": "null"}, {"type": "integer", "maximum": 0}]},
        },
        "required": ["title", "start", "attendees"],
        "additionalProperties": False,
        "$defs": {
            "time": {
                "type": "object",
                "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
                "required": ["hour"],
            }
        },
    },
    "run_command": {
        "type": "object",
        "properties": {
            "command": {"type": "string"},
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 600},
            "env": {"type": "object", "description": "free-form"},
        },
        "required": ["command", "timeout"],
    },
    "make_tree": {
        "$ref": "#/$defs/node",
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 6},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["label"],
                "additionalProperties": False,
            }
        },
    },
}

OUTPUTS: list[dict[str, Any]] = [
    {
        "title": "Person",
        "type": "object",
        "properties": {
            "name": {"type": "string", "title": "Name"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "id": {"type": "string", "format": "uuid"},
            "born": {"type": "string", "format": "date"},
        },
        "required": ["name", "age", "id"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "reasons": {
                "type": "array",
                "items": {"type": "string", "maxLength": 20},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["label", "confidence", "reasons"],
        "additionalProperties": False,
    },
    {  # as pydantic writes an Optional field, a discriminated union, a described $ref
        "type": "object",
        "properties": {
            "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]},
            "owner": {
                "anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}],
                "default": None,
            },
            "address": {"allOf": [{"$ref": "#/$defs/Address"}], "description": "home"},
        },
        "required": ["pet", "address"],
        "$defs": {
            "Cat": {
                "type": "object",
                "properties": {
                    "kind": {"const": "cat", "type": "string"},
                    "lives": {"type": "integer"},
                },
                "required": ["kind", "lives"],
            },
            "Dog": {
                "type": "object",
                "properties": {
                    "kind": {"const": "dog", "type": "string"},
                    "good": {"type": "boolean"},
                },
                "required": ["kind"],
            },
            "Address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "zip": {"type": "string", "maxLength": 5},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date-time"},
            "ip": {"type": "string", "format": "ipv4"},
            "level": {"type": "integer", "enum": [1, 2, 3, 4.5, "x"]},
            "ratio": {"type": "number", "exclusiveMinimum": -1.5, "exclusiveMaximum": -1.25},
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": -9, "maximum": 9},
                    "maxItems": 3,
                },
                "maxItems": 3,
            },
        },
        "required": ["when", "level", "ratio", "matrix"],
        "additionalProperties": False,
    },
]
