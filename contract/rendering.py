"""Prompt rendering and token counting from a model folder, without torch or transformers.

The API process renders and counts a request's prompt with this and the worker decodes it, so
both agree on exactly the ids the model reads: for ordinary text, the ids `transformers`'
`apply_chat_template` would produce for the same folder. Client text never becomes special
tokens (contract.prompt_safety); a template that refuses a conversation raises
`TemplateRejected` with its message (the API answers 400).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from contract.chat_messages import template_input
from contract.conversation import Conversation
from contract.prompt_safety import ContentMarks, MarkedText, SafeEncoder
from contract.template_features import TemplateFeatures, probe_features

# The special tokens transformers hands to chat templates as variables (its `special_tokens_map`).
TEMPLATE_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Appended to a prefilled assistant turn and cut off after rendering, as transformers'
# `continue_final_message` does, so the turn stays open whatever the template appends.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# For base models without a chat template: plain "role: text" turns.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Like transformers: jinja's own tojson escapes HTML characters, which templates don't expect.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, closing a path to CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def compile_template(source: str) -> jinja2.Template:
    """Compiles an (untrusted) chat template in a sandbox set up the way transformers does."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # Older folders store special tokens as serialized AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: the one called "default" is the chat template.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        legacy = folder / "chat_template.json"
        template = _read_json(legacy).get("chat_template")
    return template if isinstance(template, str) else FALLBACK_TEMPLATE


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class TemplateRejected(ValueError):
    """The chat template refused the conversation (a role or an order it does not take)."""


# What a template may raise on a conversation it does not take; anything else is a bug here.
_TEMPLATE_ERRORS = (
    jinja2.exceptions.TemplateError,
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
)


@dataclass(frozen=True)
class Prompt:
    """A rendered conversation: what the model reads."""

    text: str
    ids: list[int]  # client text holds no special-token ids
    content: list[tuple[int, int]]  # [start, end) character ranges of client text in `text`


class PromptRenderer:
    """A model folder's chat template and tokenizer: renders, encodes, counts and decodes."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        special_tokens: dict[str, str],
        generation_eos_ids: list[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._template = compile_template(chat_template)
        # bos_token, eos_token, pad_token, ... -> their text, as the template sees them.
        self.special_tokens = dict(special_tokens)
        self.bos_token_id = self._id_of("bos_token")
        self.pad_token_id = self._id_of("pad_token")
        eos_ids = list(generation_eos_ids or [])
        tokenizer_eos = self._id_of("eos_token")
        if tokenizer_eos is not None and tokenizer_eos not in eos_ids:
            eos_ids.append(tokenizer_eos)
        # Any of these ends an assistant turn (stop_reason end_turn).
        self.eos_token_ids: list[int] = eos_ids

    @classmethod
    def from_folder(cls, path: Path | str) -> "PromptRenderer":
        """Loads tokenizer.json, the chat template and special tokens from a HF model folder."""
        folder = Path(path)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special: dict[str, str] = {}
        for name in TEMPLATE_TOKEN_NAMES:
            text = _token_text(tokenizer_config.get(name)) or _token_text(special_map.get(name))
            if text is not None:
                special[name] = text
        generation_config = _read_json(folder / "generation_config.json")
        eos_ids = _as_id_list(generation_config.get("eos_token_id"))
        if not eos_ids:
            eos_ids = _as_id_list(_read_json(folder / "config.json").get("eos_token_id"))
        return cls(tokenizer, _chat_template(folder, tokenizer_config), special, eos_ids)

    def _id_of(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.tokenizer.token_to_id(text)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @cached_property
    def safe(self) -> SafeEncoder:
        """The encoder of prompts (built on first use: workers only decode)."""
        return SafeEncoder(self.tokenizer)

    @cached_property
    def features(self) -> TemplateFeatures:
        """How tools go into this template's prompts (probed once)."""
        return probe_features(self.chat_template, self._template, self.special_tokens)

    def prompt(self, conversation: Conversation) -> Prompt:
        """The prompt for a conversation, ready for the assistant's next turn.

        A trailing assistant turn is a prefill: it stays open for the model to continue. A
        `system` turn inside the conversation stays where it is if the template renders it
        there, else it joins the system prompt. Raises TemplateRejected.
        """
        marked = self._marked(conversation)
        return Prompt(marked.text, self.safe.encode(marked), marked.content)

    def render_conversation(self, conversation: Conversation) -> str:
        """The prompt's text (what `prompt` encodes)."""
        return self._marked(conversation).text

    def render(self, system: str | None, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt text of a plain-text conversation of (role, text) turns."""
        return self.render_conversation(Conversation.of_text(system, list(messages)))

    def _marked(self, conversation: Conversation) -> MarkedText:
        inner_system = [t.text().strip() for t in conversation.turns if t.role == "system"]
        if inner_system:
            marks = ContentMarks()
            try:
                marked = self._render_marked(conversation, marks, system_in_place=True)
            except TemplateRejected:
                pass
            else:
                if {marks.index(text) for text in inner_system if text} <= marked.seen:
                    return marked
        return self._render_marked(conversation, ContentMarks(), system_in_place=False)

    def _render_marked(
        self, conversation: Conversation, marks: ContentMarks, *, system_in_place: bool
    ) -> MarkedText:
        given = template_input(conversation, self.features, marks, system_in_place=system_in_place)
        chat, tools = given.messages, given.tools
        if not given.prefill:
            return marks.split(self._apply(chat, tools, conversation.thinking, marks, True))
        chat[-1] = {**chat[-1], "content": chat[-1]["content"] + _CONTINUE_TAG}
        rendered = self._apply(chat, tools, conversation.thinking, marks, False)
        tag = _CONTINUE_TAG.strip()
        if tag not in rendered:
            raise TemplateRejected("the chat template dropped the final assistant message")
        cut = rendered.rindex(tag)
        if rendered[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return marks.split(rendered[:cut])
        # The template trimmed the tag's trailing space, so it may trim the message too.
        return marks.split(rendered[:cut].rstrip())

    def _apply(
        self,
        chat: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        thinking: bool,
        marks: ContentMarks,
        add_generation_prompt: bool,
    ) -> str:
        try:
            return self._template.render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=thinking,
                **self.special_tokens,
            )
        except _TEMPLATE_ERRORS as exc:
            raise TemplateRejected(marks.clean(str(exc)) or type(exc).__name__) from None

    def encode(self, text: str) -> list[int]:
        """Token ids of trusted text as it is: special-token text becomes special tokens, none
        are added. Client text goes through `prompt`."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count(self, system: str | None, messages: Sequence[tuple[str, str]]) -> int:
        """Input tokens of a plain-text conversation."""
        return len(self.prompt(Conversation.of_text(system, list(messages))).ids)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        """Text of token ids; special tokens (markers, eos) are left out by default."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@lru_cache(maxsize=8)
def _cached_renderer(resolved: str, mtime_ns: int) -> PromptRenderer:
    return PromptRenderer.from_folder(resolved)


def get_renderer(path: Path | str) -> PromptRenderer:
    """A cached renderer per model folder (reloaded if its tokenizer.json changes)."""
    folder = Path(path).resolve()
    tokenizer_file = folder / "tokenizer.json"
    mtime = tokenizer_file.stat().st_mtime_ns if tokenizer_file.exists() else 0
    return _cached_renderer(str(folder), mtime)
