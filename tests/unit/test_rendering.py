import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest

from contract.conversation import Conversation
from contract.rendering import PromptRenderer, compile_template, get_renderer

Chat = tuple[str | None, list[tuple[str, str]]]

CONVERSATIONS: list[Chat] = [
    (None, [("user", "Hello, world!")]),
    ("You are terse.", [("user", "def f(x):\n    return x * 2\n")]),
    ("sys", [("user", "a"), ("assistant", "b"), ("user", "ünïcödé 🎉 日本語")]),
    (None, [("user", "Finish this:"), ("assistant", "Once upon a time")]),  # prefill
    ("s", [("user", "q"), ("assistant", "trailing  spaces inside , then")]),  # prefill
    (None, [("user", "<|start|> is a marker, <|end_of_turn|> too")]),
]


def hf_chat(system: str | None, messages: list[tuple[str, str]]) -> list[dict[str, Any]]:
    chat = [{"role": role, "content": text} for role, text in messages]
    return ([{"role": "system", "content": system}] if system is not None else []) + chat


@pytest.fixture(scope="module")
def renderer(tiny_model_dir: Path) -> PromptRenderer:
    return PromptRenderer.from_folder(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_render_and_encode_match_transformers(
    renderer: PromptRenderer, hf_tokenizer: Any, conversation: Chat
) -> None:
    system, messages = conversation
    prefill = messages[-1][0] == "assistant"
    kwargs = {"add_generation_prompt": not prefill, "continue_final_message": prefill}
    chat = hf_chat(system, messages)
    expected_text = hf_tokenizer.apply_chat_template(chat, tokenize=False, **kwargs)
    expected_ids = hf_tokenizer.apply_chat_template(chat, **kwargs)["input_ids"]
    text = renderer.render(system, messages)
    assert text == expected_text
    assert renderer.encode(text) == expected_ids
    if "<|" not in str(messages):  # markers in client text are plain text here, not in HF
        assert renderer.count(system, messages) == len(expected_ids)
        assert renderer.prompt(Conversation.of_text(system, messages)).ids == expected_ids


def test_render_shape(renderer: PromptRenderer) -> None:
    assert renderer.render("S", [("user", "hi")]) == (
        "<|begin_of_text|><|start|>system\nS<|end_of_turn|>\n"
        "<|start|>user\nhi<|end_of_turn|>\n<|start|>assistant\n"
    )
    # A prefill stays open: no end of turn after it, no new assistant header.
    assert renderer.render(None, [("user", "hi"), ("assistant", "Sure")]).endswith(
        "<|start|>assistant\nSure"
    )
    # An empty prefill is a fresh assistant turn.
    assert renderer.render(None, [("user", "hi"), ("assistant", "")]) == renderer.render(
        None, [("user", "hi")]
    )


def test_special_token_ids(renderer: PromptRenderer) -> None:
    assert renderer.bos_token_id == renderer.tokenizer.token_to_id("<|begin_of_text|>")
    assert renderer.pad_token_id == renderer.tokenizer.token_to_id("<|pad|>")
    assert renderer.eos_token_ids == [renderer.tokenizer.token_to_id("<|end_of_turn|>")]
    assert (renderer.bos_token, renderer.eos_token) == ("<|begin_of_text|>", "<|end_of_turn|>")


def test_decode_round_trip_and_special_tokens(renderer: PromptRenderer, hf_tokenizer: Any) -> None:
    text = "naïve → café 🎉\n\tdef main():"
    assert renderer.decode(renderer.encode(text)) == text
    ids = renderer.encode(renderer.render(None, [("user", "x")]))
    assert renderer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|start|>" in renderer.decode(ids, skip_special_tokens=False)
    assert "<|start|>" not in renderer.decode(ids)


def test_legacy_template_in_tokenizer_config(
    tiny_model_dir: Path, renderer: PromptRenderer, tmp_path: Path
) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (tiny_model_dir / "chat_template.jinja").read_text()
    # Older folders also spell special tokens as serialized AddedToken objects.
    config["eos_token"] = {"content": config["eos_token"], "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    legacy = PromptRenderer.from_folder(tmp_path)
    for system, messages in CONVERSATIONS:
        assert legacy.render(system, messages) == renderer.render(system, messages)
    assert legacy.eos_token_ids == renderer.eos_token_ids


def test_template_helpers_and_sandbox() -> None:
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system"):
        compile_template("{{ raise_exception('no system') }}").render()
    assert len(compile_template("{{ strftime_now('%Y') }}").render()) == 4
    assert compile_template("{{ x | tojson }}").render(x={"a": "<é>"}) == '{"a": "<é>"}'
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_template("{{ ''.__class__.__mro__[1].__subclasses__() }}").render()


def test_get_renderer_caches_per_folder(tiny_model_dir: Path) -> None:
    assert get_renderer(tiny_model_dir) is get_renderer(str(tiny_model_dir))


def test_import_is_torch_free() -> None:
    code = (
        "import sys, contract.rendering, workers.backends.textstream; "
        "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
