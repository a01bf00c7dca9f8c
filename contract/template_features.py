"""What a chat template can render, found by rendering small probe conversations once.

- native tools: the template reads a `tools` variable, prints the tools it is given, and writes
  an earlier call in the platform's call format (`<tool_call>` + JSON, contract.toolcalls), the
  format the worker parses and forced calls are generated in. A template that writes calls
  another way would teach the model a format the worker cannot read, so it gets the fallback.
- tool role: the template names a `tool` role and prints a `tool` message's content (a template
  that prints any role generically, as `<|start|>{role}`, does not count: the model never saw it).
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta

from contract.toolcalls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass(frozen=True)
class TemplateFeatures:
    """How tools go into a prompt for one chat template (contract.chat_messages)."""

    native_tools: bool = False  # takes `tools`, writes calls in the platform's format
    tool_role: bool = False  # renders `tool` role messages (tool results)


_PROBE_TOOL = "probe_tool_7f3a"
_PROBE_VALUE = "probe_value_5c1e"
_PROBE_RESULT = "probe_result_9b2d"
_TOOL_ROLE_LITERAL = re.compile(r"""["']tool["']""")


def probe_features(
    source: str, template: jinja2.Template, variables: Mapping[str, Any]
) -> TemplateFeatures:
    """The features of `template` (compiled from `source`); `variables` are its special tokens."""
    env = template.environment
    takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
    native = takes_tools and _writes_platform_calls(template, variables)
    tool_role = bool(_TOOL_ROLE_LITERAL.search(source)) and _prints_tool_results(
        template, variables, native
    )
    return TemplateFeatures(native_tools=native, tool_role=tool_role)


def _tools() -> list[dict[str, Any]]:
    schema = {"type": "object", "properties": {"arg": {"type": "string"}}}
    function = {"name": _PROBE_TOOL, "description": "probe", "parameters": schema}
    return [{"type": "function", "function": function}]


def _call() -> dict[str, Any]:
    function = {"name": _PROBE_TOOL, "arguments": {"arg": _PROBE_VALUE}}
    return {"id": "call_probe", "type": "function", "function": function}


def _render(template: jinja2.Template, variables: Mapping[str, Any], **kwargs: Any) -> str | None:
    try:
        return template.render(documents=None, **variables, **kwargs)
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError):
        return None


def _writes_platform_calls(template: jinja2.Template, variables: Mapping[str, Any]) -> bool:
    messages = [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "", "tool_calls": [_call()]},
    ]
    described = _render(
        template, variables, messages=messages[:1], tools=_tools(), add_generation_prompt=True
    )
    called = _render(
        template, variables, messages=messages, tools=_tools(), add_generation_prompt=False
    )
    if not described or not called or _PROBE_TOOL not in described:
        return False
    start = called.rfind(TOOL_CALL_OPEN)  # the call, after any instructions that show the tags
    end = called.find(TOOL_CALL_CLOSE, start)
    call = called[start:end] if start >= 0 and end > start else ""
    return _PROBE_TOOL in call and _PROBE_VALUE in call


def _prints_tool_results(
    template: jinja2.Template, variables: Mapping[str, Any], native: bool
) -> bool:
    call: dict[str, Any] = {"role": "assistant", "content": "calling"}
    if native:
        call = {"role": "assistant", "content": "", "tool_calls": [_call()]}
    result = {
        "role": "tool",
        "content": _PROBE_RESULT,
        "tool_call_id": "call_probe",
        "name": _PROBE_TOOL,
    }
    messages = [{"role": "user", "content": "question"}, call, result]
    rendered = _render(
        template,
        variables,
        messages=messages,
        tools=_tools() if native else None,
        add_generation_prompt=True,
    )
    return rendered is not None and _PROBE_RESULT in rendered
