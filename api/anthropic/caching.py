"""Prompt caching at admission: how many of a prompt's tokens may be cached (docs/caching.md).

A request marks `cache_control` breakpoints on tools, system blocks and message blocks (or at
the top level: the whole prompt). As in Anthropic's API, the prompt is ordered tools, system,
messages, and a breakpoint caches everything before the end of its block; the last one covers
every earlier one. Its length in tokens is where the prompt rendered up to that block and the
full prompt stop agreeing: the longest common prefix of their token ids, which includes the
template's tokens around the block when both render them alike, and never a token the full
prompt does not start with. A prefix shorter than the model's `min_cacheable_tokens` is not
cached. With `ABL_AUTO_PROMPT_CACHE`, a request without breakpoints is cached whole.

The worker reads and writes its prompt cache only within this prefix, and says in `claimed`
how much it read and wrote; settlement charges what it said.
"""

from fastapi.concurrency import run_in_threadpool

from api.anthropic.convert import conversation_of
from api.anthropic.protocol import Breakpoint, ConversationRequest, MessageParam
from api.errors import ApiError
from api.platform import Platform
from contract.catalog import ModelSpec
from contract.rendering import TemplateRejected


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _stand_in() -> MessageParam:
    # Where a truncated prompt needs a message to render: the full prompt's own first message
    # never matches it beyond its role header.
    return MessageParam.model_validate({"role": "user", "content": "\u2063"})


def truncated(body: ConversationRequest, mark: Breakpoint) -> ConversationRequest | None:
    """The request cut after the block `mark` names (None: the whole request)."""
    if mark.section == "end":
        return None
    if mark.section == "messages":
        message = body.messages[mark.index]
        cut = message.model_copy(update={"content": message.content[: mark.block + 1]})
        return body.model_copy(update={"messages": [*body.messages[: mark.index], cut]})
    if mark.section == "system":
        system = (body.system or [])[: mark.index + 1]
        return body.model_copy(update={"system": system, "messages": [_stand_in()]})
    tools = (body.tools or [])[: mark.index + 1]
    return body.model_copy(update={"tools": tools, "system": None, "messages": [_stand_in()]})


def _prefix_tokens(
    platform: Platform,
    spec: ModelSpec,
    body: ConversationRequest,
    ids: list[int],
    marks: list[Breakpoint],
) -> int:
    cut = truncated(body, marks[-1]) if marks else None
    if cut is None:  # a top-level mark, or automatic caching: the whole prompt
        return len(ids)
    try:
        cut_ids = platform.renderer(spec).prompt(conversation_of(cut)).ids
    except (TemplateRejected, ApiError):  # the template needs more than the cut: no caching
        return 0
    return common_prefix(ids, cut_ids)


async def cacheable_tokens(
    platform: Platform, spec: ModelSpec, body: ConversationRequest, ids: list[int]
) -> int:
    """The prompt's first tokens that may be read from and written to the prompt cache."""
    marks = body.cache_breakpoints()
    if not marks and not platform.settings.auto_prompt_cache:
        return 0
    if marks and marks[-1].section != "end":  # one more render and tokenization
        prefix = await run_in_threadpool(_prefix_tokens, platform, spec, body, ids, marks)
    else:
        prefix = _prefix_tokens(platform, spec, body, ids, marks)
    return prefix if prefix >= spec.min_cacheable_tokens else 0
