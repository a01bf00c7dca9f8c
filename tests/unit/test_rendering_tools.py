"""Rendering conversations with tools: through a template that takes them, and the fallback;
mid-conversation system turns; templates that refuse a conversation."""

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from contract.conversation import Conversation, ToolCall, ToolResult, Turn
from contract.rendering import PromptRenderer, TemplateRejected
from contract.template_features import TemplateFeatures
from contract.toolcalls import ToolSpec, render_tool_call, render_tools_prompt

TEMPLATES = Path(__file__).parent.parent / "fixtures" / "templates"

# A ChatML template with tools in the Hermes / Qwen 2.5 style, written for these tests.
HERMES = (TEMPLATES / "hermes.jinja").read_text()
# Takes tools, but writes calls as bare JSON (as Llama 3.1 does): not the platform's format.
BARE_JSON_CALLS = (TEMPLATES / "bare_json_calls.jinja").read_text()
# Refuses a system message anywhere but first (as Mistral's templates do).
SYSTEM_FIRST_ONLY = (TEMPLATES / "system_first_only.jinja").read_text()
# Prints only user and assistant turns after the first message (drops the rest silently).
DROPS_INNER_SYSTEM = (TEMPLATES / "drops_inner_system.jinja").read_text()
THINKING = (TEMPLATES / "thinking.jinja").read_text()

WEATHER = ToolSpec(
    "get_weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "The weather now",
)
TOOL_CONVERSATION = Conversation(
    system="Be brief.",
    turns=[
        Turn("user", ["Weather in Paris?"]),
        Turn("assistant", ["Checking.", ToolCall("toolu_1", "get_weather", {"city": "Paris"})]),
        Turn("user", [ToolResult("toolu_1", "18 C", name="get_weather")]),
    ],
    tools=[WEATHER],
)


def chatml_tokenizer(tiny_model_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tokenizer


def make_renderer(tiny_model_dir: Path, template: str) -> PromptRenderer:
    return PromptRenderer(chatml_tokenizer(tiny_model_dir), template, {"eos_token": "<|im_end|>"})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> PromptRenderer:
    return PromptRenderer.from_folder(tiny_model_dir)


@pytest.fixture(scope="module")
def hermes(tiny_model_dir: Path) -> PromptRenderer:
    return make_renderer(tiny_model_dir, HERMES)


def test_features_are_probed_from_the_template(
    tiny: PromptRenderer, hermes: PromptRenderer, tiny_model_dir: Path
) -> None:
    assert hermes.features == TemplateFeatures(native_tools=True, tool_role=True)
    # Renders any role generically and takes no tools: everything goes the fallback way.
    assert tiny.features == TemplateFeatures(native_tools=False, tool_role=False)
    bare = make_renderer(tiny_model_dir, BARE_JSON_CALLS)
    assert bare.features == TemplateFeatures(native_tools=False, tool_role=False)


def test_native_tools_render_as_transformers_does(
    hermes: PromptRenderer, tiny_model_dir: Path
) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=chatml_tokenizer(tiny_model_dir),
        chat_template=HERMES,
        eos_token="<|im_end|>",
    )
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    chat: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"id": "toolu_1", "type": "function", "function": call}],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "toolu_1", "name": "get_weather"},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather now",
                "parameters": dict(WEATHER.input_schema),
            },
        }
    ]
    kwargs = {"tools": tools, "add_generation_prompt": True}
    expected = hf.apply_chat_template(chat, tokenize=False, **kwargs)
    prompt = hermes.prompt(TOOL_CONVERSATION)
    assert prompt.text == expected
    assert prompt.ids == hf.apply_chat_template(chat, **kwargs)["input_ids"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt.text
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>" in prompt.text


def test_fallback_puts_tools_in_the_system_turn_and_calls_in_the_text(
    tiny: PromptRenderer,
) -> None:
    prompt = tiny.prompt(TOOL_CONVERSATION)
    call = render_tool_call("get_weather", {"city": "Paris"})
    assert prompt.text == (
        "<|begin_of_text|><|start|>system\nBe brief.\n\n"
        + render_tools_prompt([WEATHER])
        + "<|end_of_turn|>\n<|start|>user\nWeather in Paris?<|end_of_turn|>\n"
        + f"<|start|>assistant\nChecking.\n{call}<|end_of_turn|>\n"
        + "<|start|>user\n<tool_response>\n18 C\n</tool_response><|end_of_turn|>\n"
        + "<|start|>assistant\n"
    )
    assert prompt.ids == tiny.encode(prompt.text)


def test_fallback_results_and_text_in_one_user_turn(tiny: PromptRenderer) -> None:
    turns = [
        Turn("user", ["q"]),
        Turn("assistant", [ToolCall("a", "f", {}), ToolCall("b", "f", {"x": 1})]),
        Turn("user", [ToolResult("a", "one"), ToolResult("b", "two", is_error=True), "and?"]),
    ]
    text = tiny.render_conversation(Conversation(turns=turns))
    assert (
        "<|start|>assistant\n"
        + render_tool_call("f", {})
        + "\n"
        + render_tool_call("f", {"x": 1})
        + "<|end_of_turn|>"
    ) in text
    assert (
        "<|start|>user\n<tool_response>\none\n</tool_response>\n"
        "<tool_response>\nError: two\n</tool_response>\n\nand?<|end_of_turn|>"
    ) in text


def test_tool_role_splits_a_user_turn_where_the_results_are(hermes: PromptRenderer) -> None:
    turns = [
        Turn("user", ["q"]),
        Turn("assistant", [ToolCall("a", "f", {})]),
        Turn("user", [ToolResult("a", "one", is_error=True), "thanks"]),
    ]
    text = hermes.render_conversation(Conversation(turns=turns))
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nError: one\n</tool_response><|im_end|>\n"
        "<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tools_count_exactly_what_generation_sees(tiny: PromptRenderer) -> None:
    without = Conversation(system="Be brief.", turns=[Turn("user", ["Weather?"])])
    with_tools = Conversation(system="Be brief.", turns=[Turn("user", ["Weather?"])])
    with_tools.tools = [WEATHER]
    counted = len(tiny.prompt(with_tools).ids)
    assert counted == len(tiny.encode(tiny.render_conversation(with_tools)))
    assert counted - len(tiny.prompt(without).ids) >= len(
        tiny.encode(json.dumps(WEATHER.input_schema))
    )


def test_inner_system_turn_stays_in_place_where_the_template_takes_it(
    tiny: PromptRenderer,
) -> None:
    turns = [Turn("user", ["a"]), Turn("system", ["note"]), Turn("user", ["b"])]
    text = tiny.render_conversation(Conversation(system="S", turns=turns))
    assert text == (
        "<|begin_of_text|><|start|>system\nS<|end_of_turn|>\n<|start|>user\na<|end_of_turn|>\n"
        "<|start|>system\nnote<|end_of_turn|>\n<|start|>user\nb<|end_of_turn|>\n"
        "<|start|>assistant\n"
    )


@pytest.mark.parametrize("template", [SYSTEM_FIRST_ONLY, DROPS_INNER_SYSTEM])
def test_inner_system_turn_joins_the_system_prompt_otherwise(
    tiny_model_dir: Path, template: str
) -> None:
    renderer = make_renderer(tiny_model_dir, template)
    turns = [Turn("user", ["a"]), Turn("system", ["note"]), Turn("user", ["b"])]
    text = renderer.render_conversation(Conversation(system="S", turns=turns))
    assert text == (
        "<|im_start|>system\nS\n\nnote<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_errors_are_rejections_with_the_templates_message(
    tiny_model_dir: Path,
) -> None:
    renderer = make_renderer(tiny_model_dir, "{{ raise_exception('Only user roles') }}")
    with pytest.raises(TemplateRejected, match=r"^Only user roles$"):
        renderer.prompt(Conversation.of_text(None, [("user", "x")]))
    quoting = make_renderer(tiny_model_dir, "{{ raise_exception('bad: ' + messages[0].content) }}")
    with pytest.raises(TemplateRejected, match=r"^bad: secret <x>$"):  # no marks in the message
        quoting.prompt(Conversation.of_text(None, [("user", "secret <x>")]))
    broken = make_renderer(tiny_model_dir, "{{ messages[0].content.nope() }}")
    with pytest.raises(TemplateRejected):
        broken.prompt(Conversation.of_text(None, [("user", "x")]))


def test_prefill_with_marks_stays_open(tiny: PromptRenderer) -> None:
    text = tiny.render(None, [("user", "hi"), ("assistant", "  Sure, <|start|>  ")])
    assert text.endswith("<|start|>assistant\n  Sure, <|start|>  ")
    ids = tiny.prompt(Conversation.of_text(None, [("user", "hi"), ("assistant", "Sure")])).ids
    assert ids[-1] not in tiny.eos_token_ids


def test_thinking_reaches_the_template(tiny_model_dir: Path) -> None:
    renderer = make_renderer(tiny_model_dir, THINKING)
    on = Conversation(turns=[Turn("user", ["q"])], thinking=True)
    off = Conversation(turns=[Turn("user", ["q"])], thinking=False)
    assert renderer.render_conversation(on) == "user: q\nassistant: "
    assert renderer.render_conversation(off) == "user: q\nassistant: <think></think>"
