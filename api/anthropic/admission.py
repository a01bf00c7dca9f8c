"""From a validated request to a queued job: model, prompt, limits, price, reservation.

Order: model (404) -> tokenize -> max_tokens and context checks (400) -> rate limits (429, one
Redis script) -> credit reservation (402, one Postgres transaction). A request refused after the
rate-limit step gets its budget and concurrency slot back at once; an admitted one gives back its
slot, and the output tokens it did not produce, in `finish()`.
"""

import logging
from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from api.anthropic.caching import cacheable_tokens
from api.anthropic.convert import conversation_of, sampling_params, thinking_budget, tool_use
from api.anthropic.protocol import ConversationRequest, MessagesRequest
from api.credentials import Principal
from api.errors import (
    ApiError,
    BillingError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from api.ids import new_message_id
from api.platform import Platform
from api.ratelimit import SHARED, Budget, Cost, Limits, RateLimiter, Ticket
from api.response_headers import ResponseHeaders
from api.settings import ApiSettings
from contract.catalog import ModelSpec
from contract.conversation import Conversation
from contract.jobs import GenerateJob
from contract.rendering import TemplateRejected
from db.ledger import AccountUnavailable, InsufficientCredits, NewRequest, open_request
from db.pricing import Prices
from db.session import in_autocommit

log = logging.getLogger("abl.admission")


@dataclass(frozen=True)
class Admitted:
    request_id: str
    message_id: str
    spec: ModelSpec
    job: GenerateJob
    input_tokens: int
    credits_reserved: int
    principal: Principal
    # The rate-limit claim that finish() settles.
    ticket: Ticket | None = None


def resolve_model(platform: Platform, model_id: str) -> ModelSpec:
    """The served model for a client's model id (an id or one of its aliases), else a 404."""
    spec = platform.catalog.resolve(model_id)
    if spec is None:
        raise NotFoundError(f"model: {model_id}")
    return spec


def tokenize(platform: Platform, spec: ModelSpec, conversation: Conversation) -> list[int]:
    """The prompt's token ids, exactly what the worker decodes; 400 if the template refuses."""
    try:
        return platform.renderer(spec).prompt(conversation).ids
    except TemplateRejected as exc:
        raise InvalidRequestError(
            f"messages: the chat template of {spec.id} does not take this conversation: {exc}"
        ) from None


# A prompt up to this many characters is tokenized on the event loop (about 0.5 ms at most
# here), where the hop to a worker thread and back took 2-3 ms under load
# (docs/benchmarks.md); a longer one, one with tools or tool calls (JSON), or a model's first,
# whose tokenizer loads from disk, in a worker thread.
INLINE_TOKENIZE_CHARS = 2048


async def tokenize_async(
    platform: Platform, spec: ModelSpec, body: ConversationRequest
) -> list[int]:
    conversation = conversation_of(body)
    small = not conversation.has_json() and conversation.chars() <= INLINE_TOKENIZE_CHARS
    if spec.id in platform.loaded_tokenizers and small:
        return tokenize(platform, spec, conversation)
    ids = await run_in_threadpool(tokenize, platform, spec, conversation)
    platform.loaded_tokenizers.add(spec.id)
    return ids


# Sent whenever a request's max_tokens was lowered to fit (the clamp policy): the value used.
MAX_TOKENS_HEADER = "abl-max-tokens"


def decide_max_tokens(platform: Platform, spec: ModelSpec, body: MessagesRequest, n_in: int) -> int:
    """The request's max_tokens as it runs (and is reserved): the default when it sends none;
    what it sends when that fits the model; otherwise lowered to what fits (`clamp`, the
    default policy) or refused with Anthropic's 400 (`reject`)."""
    room = spec.context_window - n_in
    if room < 1:
        raise InvalidRequestError(
            f"prompt is too long: {n_in} tokens > {spec.context_window - 1} maximum"
        )
    fits = min(spec.max_output_tokens, room)
    if body.max_tokens is None:
        return min(platform.settings.default_max_tokens, fits)
    if body.max_tokens <= fits:
        return body.max_tokens
    if spec.max_tokens_policy == "clamp":
        return fits
    if body.max_tokens > spec.max_output_tokens:
        raise InvalidRequestError(
            f"max_tokens: {body.max_tokens} > {spec.max_output_tokens}, which is the maximum"
            f" allowed number of output tokens for {spec.id}"
        )
    raise InvalidRequestError(
        f"input length and max_tokens exceed context limit: {n_in} + {body.max_tokens}"
        f" > {spec.context_window}, decrease input length or max_tokens and try again"
    )


def budgets(principal: Principal, settings: ApiSettings) -> list[Budget]:
    """What a request spends: its API key's budget (all the account's JWTs share one), and the
    account's shared budget when it sets one."""
    own = Budget(
        principal.account_id,
        principal.api_key_id or "jwt",
        Limits.resolve(principal.rate_limits, settings),
    )
    if not principal.shared_limits:
        return [own]
    return [own, Budget(principal.account_id, SHARED, Limits.shared(principal.shared_limits))]


async def spend_count(platform: Platform, principal: Principal) -> dict[str, str]:
    """Token counting spends one request from the request rates (no slot, no tokens); its
    rate-limit headers, or RateLimitError (429)."""
    limiter = RateLimiter(platform.redis, platform.settings)
    decision = await limiter.spend(budgets(principal, platform.settings), Cost(1, 0, 0))
    return decision.headers()


async def admit(
    platform: Platform,
    principal: Principal,
    body: MessagesRequest,
    request_id: str,
    headers: ResponseHeaders,
) -> Admitted:
    """Check against the model, rate-limit, then persist the request and reserve its worst case.

    The caller's rate-limit headers, as they stand after each step, go to `headers`.
    """
    limiter = RateLimiter(platform.redis, platform.settings)
    spec = resolve_model(platform, body.model)
    input_ids = await tokenize_async(platform, spec, body)
    max_tokens = decide_max_tokens(platform, spec, body, len(input_ids))
    if body.max_tokens is not None and max_tokens < body.max_tokens:
        headers.update({MAX_TOKENS_HEADER: str(max_tokens)})
    cacheable = await cacheable_tokens(platform, spec, body, input_ids)
    cost = Cost(requests=1, input_tokens=len(input_ids), output_tokens=max_tokens)
    ticket, decision = await limiter.acquire(
        budgets(principal, platform.settings), cost, request_id
    )
    headers.update(decision.headers())
    # The prices in force now go on the request's row: its settlement charges them.
    prices = Prices(
        spec.input_price_per_mtok,
        spec.output_price_per_mtok,
        platform.credit_price,
        cache_read_multiplier=spec.cache_read_multiplier,
        cache_write_multiplier=spec.cache_write_multiplier,
    )
    # The worst case: every cacheable token at the dearest of input, cache read, cache write.
    reserve = prices.hold(len(input_ids), max_tokens, cacheable)
    message_id = new_message_id()
    new = NewRequest(
        id=request_id,
        message_id=message_id,
        account_id=principal.account_id,
        api_key_id=principal.api_key_id,
        model=spec.id,
        stream=body.stream,
        max_tokens=max_tokens,
        input_tokens=len(input_ids),
        credits_reserved=reserve,
        prices=prices,
    )
    try:
        await run_in_threadpool(_open, platform.database_url, new)
    except ApiError:
        headers.update(await _give_back(limiter, ticket, decision.headers()))
        raise
    except BaseException:
        # Cancelled or the database failed: this task may not await any more; release anyway.
        platform.spawn(_release_logged(limiter, ticket, ticket.cost))
        raise
    job = GenerateJob(
        request_id=request_id,
        model=spec.id,
        input_ids=input_ids,
        sampling=sampling_params(body, max_tokens, spec),
        tool_use=tool_use(body),
        output_schema=body.output_format_schema(),
        thinking_budget=thinking_budget(body, max_tokens),
        cache_prefix_tokens=cacheable,
        account_id=principal.account_id,
        key_prefix=principal.key_prefix,
    )
    return Admitted(
        request_id,
        message_id,
        spec,
        job,
        len(input_ids),
        reserve,
        principal,
        ticket=ticket,
    )


async def finish(platform: Platform, admitted: Admitted, output_tokens: int | None) -> None:
    """Called once when a request admitted above ends, however it ends (None: unknown).

    Frees the concurrency slot and gives back the output tokens reserved as `max_tokens` but
    not produced. Unknown output keeps the whole `max_tokens` counted.
    """
    ticket = admitted.ticket
    if ticket is None:
        return
    unused = 0 if output_tokens is None else max(0, ticket.cost.output_tokens - output_tokens)
    limiter = RateLimiter(platform.redis, platform.settings)
    await _release_logged(limiter, ticket, Cost(0, 0, unused))


async def current_limit_headers(platform: Platform, principal: Principal) -> dict[str, str]:
    """The caller's rate-limit headers as they stand, charging nothing ({} if Redis is down)."""
    limiter = RateLimiter(platform.redis, platform.settings)
    try:
        return (await limiter.peek(budgets(principal, platform.settings))).headers()
    except ApiError:
        return {}


async def _give_back(
    limiter: RateLimiter, ticket: Ticket, headers: dict[str, str]
) -> dict[str, str]:
    """Undo a claim whose request was refused later; the headers as they are afterwards."""
    try:
        return (await limiter.release(ticket, ticket.cost)).headers()
    except ApiError:
        log.warning("could not give back %s's rate-limit claim", ticket.request_id)
        return headers


async def _release_logged(limiter: RateLimiter, ticket: Ticket, refund: Cost) -> None:
    try:
        await limiter.release(ticket, refund)
    except ApiError:
        # The slot's lease expires by itself (request timeout + a minute).
        log.warning("could not release %s's rate-limit slot", ticket.request_id)


def _open(database_url: str, new: NewRequest) -> None:
    in_autocommit(database_url, lambda conn: open_admitted(conn, new))


def open_admitted(session: Session | Connection, new: NewRequest) -> None:
    """Opens the request's row and holds its credits; a hold the account cannot make is the
    client's error (interactive requests and batch items alike)."""
    try:
        open_request(session, new)
    except InsufficientCredits as exc:
        raise BillingError(
            f"insufficient credits: this request may cost up to {exc.needed} credits,"
            f" available {exc.available}"
        ) from None
    except AccountUnavailable:
        raise PermissionDeniedError("this account is disabled") from None
