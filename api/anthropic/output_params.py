"""Request fields that shape the answer: tools, tool_choice, thinking, structured output.

Custom tools (name, description, input_schema) are served; server tools (`web_search_*`,
`code_execution_*`, `computer_*`, `text_editor_*`, `bash_*`, ...) are refused naming their
type. A schema the decoder must enforce (a tool a call is forced to, a `strict` tool, a
structured-output schema) is checked with `contract.json_schema_support.check_schema` first:
a keyword it cannot enforce is a 400 naming the keyword and where it is. Schemas of tools the
model calls freely (`tool_choice` auto) are only prompt text and are not checked.
"""

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator
from pydantic_core import PydanticCustomError

from api.anthropic.blocks import CacheControlParam, JsonObject, Text, WireModel
from contract.json_schema_support import UnsupportedSchemaError, check_schema

TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,128}$"


def _custom_tool(value: Any) -> Any:
    if not isinstance(value, dict):
        raise PydanticCustomError("tool_type", "tools must be JSON objects")
    tool_type = value.get("type")
    if tool_type is not None and tool_type != "custom":
        raise PydanticCustomError(
            "unsupported_tool",
            'tool type "{tool_type}" is not supported: server tools (web search, web fetch,'
            " code execution, computer use, text editor, bash, memory, tool search) do not run"
            " on this platform; define a custom tool with name, description and input_schema",
            {"tool_type": str(tool_type)},
        )
    return value


class CustomToolParam(WireModel):
    """A client tool (`input_examples`, `defer_loading`, ... are ignored)."""

    type: Literal["custom"] | None = None
    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]
    description: Text | None = None
    input_schema: JsonObject
    # The call's input must match the schema exactly: honoured when the call is forced.
    strict: bool | None = None
    # A prompt-cache breakpoint after this tool's definition (docs/caching.md).
    cache_control: CacheControlParam | None = None

    @field_validator("input_schema")
    @classmethod
    def _object_input(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type", "object") != "object":
            raise PydanticCustomError(
                "input_schema_type", 'a tool\'s input is a JSON object: type must be "object"'
            )
        return schema


ToolParam = Annotated[CustomToolParam, BeforeValidator(_custom_tool)]


class ToolChoiceParam(WireModel):
    """auto: the model decides; any: it calls one; tool: it calls `name`; none: it calls none."""

    type: Literal["auto", "any", "tool", "none"]
    name: Text | None = None
    disable_parallel_tool_use: bool = False


class ThinkingParam(WireModel):
    """enabled (with a budget), adaptive (the model decides) or disabled; `display` ignored."""

    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = Field(default=None, ge=1024)

    @property
    def on(self) -> bool:
        return self.type != "disabled"


class JsonSchemaFormat(WireModel):
    """`{"type": "json_schema", "schema": {...}}`: the answer is JSON valid against it."""

    type: Literal["json_schema"]
    json_schema: JsonObject = Field(alias="schema")


class OutputConfigParam(WireModel):
    """`format` is honoured (structured output); `effort` is accepted as a hint."""

    format: JsonSchemaFormat | None = None
    effort: str | None = None


def forced_tools(tools: list[CustomToolParam], choice: ToolChoiceParam | None) -> set[str]:
    """Names of the tools whose calls are generated under their schema."""
    if choice is None or choice.type in ("auto", "none"):
        return set()
    if choice.type == "tool":
        return {choice.name} if choice.name else set()
    return {t.name for t in tools}


def tools_problem(tools: list[CustomToolParam], choice: ToolChoiceParam | None) -> str | None:
    """Why `tools` and `tool_choice` cannot be served together, or None."""
    names = [t.name for t in tools]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated is not None:
        return f'tools: tool names must be unique ("{repeated}" appears more than once)'
    if choice is not None and choice.type in ("any", "tool") and not tools:
        return f'tool_choice: type "{choice.type}" needs tools to choose from'
    if choice is not None and choice.type == "tool":
        if not choice.name:
            return 'tool_choice.name: Field required (tool_choice type "tool" names the tool)'
        if choice.name not in names:
            return f'tool_choice.name: there is no tool named "{choice.name}" in tools'
    forced = forced_tools(tools, choice)
    for index, tool in enumerate(tools):
        if tool.strict and tool.name not in forced:
            return (
                f"tools.{index}.strict: a strict tool's input is enforced only when tool_choice"
                f' forces its call ("any", or "tool" naming it); "{tool.name}" may be called'
                " freely here"
            )
        if tool.name in forced:
            problem = schema_problem(tool.input_schema)
            if problem is not None:
                return f"tools.{index}.input_schema: {problem}"
    return None


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why the decoder cannot enforce `schema`, or None."""
    try:
        check_schema(schema)
    except UnsupportedSchemaError as exc:
        return str(exc)
    return None
