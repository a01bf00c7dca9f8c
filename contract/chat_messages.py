"""A Conversation as a chat template takes it: `messages` (and `tools`) in transformers' shape.

Two ways to put tools into a prompt, chosen per template (`TemplateFeatures`):
- native: the template takes a `tools` variable and writes tool calls in the platform's call
  format (`contract.toolcalls`, Hermes / Qwen style). Tools go to it as
  `{"type": "function", "function": {"name", "description", "parameters"}}`, earlier calls as
  the assistant message's `tool_calls`.
- fallback (every other template): the tools are described in the system turn
  (`render_tools_prompt`) and earlier calls are written into the assistant's text as the model
  writes them (`render_tool_call`).
Tool results go as `tool` role messages where the template has that role, else as
`<tool_response>` text in the user turn. A `system` turn inside the conversation stays at its
position when `system_in_place` (the renderer tries that first), else it is appended to the
system prompt. Every client string goes through `marks` (contract.prompt_safety).
"""

import itertools
from dataclasses import dataclass
from typing import Any

from contract.conversation import BLOCK_SEPARATOR, Conversation, ToolCall, ToolResult, Turn
from contract.prompt_safety import ContentMarks
from contract.template_features import TemplateFeatures
from contract.toolcalls import render_tool_call, render_tool_result, render_tools_prompt

Message = dict[str, Any]


@dataclass(frozen=True)
class TemplateInput:
    """The template's variables for one conversation."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    prefill: bool  # the last message is an assistant turn to continue


def template_input(
    conversation: Conversation,
    features: TemplateFeatures,
    marks: ContentMarks,
    *,
    system_in_place: bool,
) -> TemplateInput:
    """The template's `messages` and `tools`, client text marked."""
    turns = _without_empty_last_turn(conversation.turns)
    system = _system_prompt(conversation, features, marks, system_in_place=system_in_place)
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        if turn.role == "system":
            if system_in_place:
                messages.append({"role": "system", "content": marks.mark(turn.text())})
        elif turn.role == "assistant":
            messages.append(_assistant(turn, features, marks))
        else:
            messages.extend(_user(turn, features, marks))
    tools = None
    if conversation.tools and features.native_tools:
        tools = [
            {
                "type": "function",
                "function": {
                    "name": marks.mark(tool.name),
                    "description": marks.mark(tool.description),
                    "parameters": marks.mark_schema(dict(tool.input_schema)),
                },
            }
            for tool in conversation.tools
        ]
    prefill = bool(turns) and turns[-1].role == "assistant"
    return TemplateInput(messages, tools, prefill)


def _without_empty_last_turn(turns: list[Turn]) -> list[Turn]:
    # An empty prefill is the same as a fresh assistant turn.
    last = turns[-1] if turns else None
    if last is not None and last.role == "assistant" and not last.text().strip():
        return turns if last.calls() else turns[:-1]
    return turns


def _system_prompt(
    conversation: Conversation,
    features: TemplateFeatures,
    marks: ContentMarks,
    *,
    system_in_place: bool,
) -> str:
    parts = [marks.mark(conversation.system)] if conversation.system else []
    if not system_in_place:
        parts.extend(marks.mark(t.text()) for t in conversation.turns if t.role == "system")
    if conversation.tools and not features.native_tools:
        parts.append(render_tools_prompt(conversation.tools, quote=marks.mark))
    return BLOCK_SEPARATOR.join(p for p in parts if p)


def _assistant(turn: Turn, features: TemplateFeatures, marks: ContentMarks) -> Message:
    if features.native_tools:
        message: Message = {"role": "assistant", "content": marks.mark(turn.text())}
        if turn.calls():
            message["tool_calls"] = [_native_call(call, marks) for call in turn.calls()]
        return message
    # Fallback: calls written into the text where they were, as the model writes them.
    pieces: list[str] = []
    for part in turn.parts:
        if isinstance(part, ToolCall):
            pieces.append(render_tool_call(part.name, part.arguments, quote=marks.mark))
        elif isinstance(part, str) and part:
            pieces.append(marks.mark(part))
    separator = "\n" if turn.calls() else BLOCK_SEPARATOR
    return {"role": "assistant", "content": separator.join(pieces)}


def _native_call(call: ToolCall, marks: ContentMarks) -> dict[str, Any]:
    return {
        "id": marks.mark(call.id),
        "type": "function",
        "function": {"name": marks.mark(call.name), "arguments": _mark_json(call.arguments, marks)},
    }


def _mark_json(value: Any, marks: ContentMarks) -> Any:
    if isinstance(value, str):
        return marks.mark(value)
    if isinstance(value, list):
        return [_mark_json(v, marks) for v in value]
    if isinstance(value, dict):
        return {marks.mark(k): _mark_json(v, marks) for k, v in value.items()}
    return value


def _user(turn: Turn, features: TemplateFeatures, marks: ContentMarks) -> list[Message]:
    """The user turn; with a tool role, its results become `tool` messages where they were."""
    messages: list[Message] = []
    pending: list[tuple[bool, str]] = []  # (is a tool result, text) of the user message

    def flush() -> None:
        if pending:
            messages.append({"role": "user", "content": _join_user(pending)})
            pending.clear()

    for part in turn.parts:
        if isinstance(part, ToolResult) and features.tool_role:
            flush()
            messages.append(_tool_message(part, marks))
        elif isinstance(part, ToolResult):
            text = render_tool_result(part.content, is_error=part.is_error, quote=marks.mark)
            pending.append((True, text))
        elif isinstance(part, str) and part:
            pending.append((False, marks.mark(part)))
    flush()
    return messages


def _join_user(pieces: list[tuple[bool, str]]) -> str:
    # Tool results one per line (as Hermes / Qwen templates write them), text a paragraph apart.
    out = pieces[0][1]
    for (was_result, _), (is_result, text) in itertools.pairwise(pieces):
        out += ("\n" if was_result and is_result else BLOCK_SEPARATOR) + text
    return out


def _tool_message(result: ToolResult, marks: ContentMarks) -> Message:
    content = marks.mark(result.content)
    message: Message = {
        "role": "tool",
        "content": f"Error: {content}" if result.is_error else content,
        "tool_call_id": marks.mark(result.tool_use_id),
    }
    if result.name is not None:
        message["name"] = marks.mark(result.name)
    return message
