"""From a validated request to a queued job: model, prompt, limits, price, reservation."""

from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool

from api.anthropic.convert import sampling_params
from api.anthropic.protocol import CountTokensRequest, MessagesRequest
from api.auth import Principal
from api.errors import BillingError, InvalidRequestError, NotFoundError, PermissionDeniedError
from api.ids import new_message_id
from api.platform import Platform
from db.ledger import AccountUnavailable, InsufficientCredits, NewRequest, open_request
from db.pricing import cost_usd, credits_for
from db.session import transaction
from workers.catalog import ModelSpec
from workers.protocol import GenerateJob


@dataclass(frozen=True)
class Admitted:
    request_id: str
    message_id: str
    spec: ModelSpec
    job: GenerateJob
    input_tokens: int
    credits_reserved: int


def resolve_model(platform: Platform, model_id: str) -> ModelSpec:
    spec = platform.catalog.get(model_id)
    if spec is None:
        raise NotFoundError(f"model: {model_id}")
    return spec


def tokenize(platform: Platform, spec: ModelSpec, body: CountTokensRequest) -> list[int]:
    renderer = platform.renderer(spec)
    return renderer.encode(renderer.render(body.system_text(), body.conversation()))


def decide_max_tokens(platform: Platform, spec: ModelSpec, body: MessagesRequest, n_in: int) -> int:
    room = spec.context_window - n_in
    if room < 1:
        raise InvalidRequestError(
            f"prompt is too long: {n_in} tokens > {spec.context_window - 1} maximum"
        )
    if body.max_tokens is None:
        return min(platform.settings.default_max_tokens, spec.max_output_tokens, room)
    if body.max_tokens > spec.max_output_tokens:
        raise InvalidRequestError(
            f"max_tokens: {body.max_tokens} > {spec.max_output_tokens}, which is the maximum"
            f" allowed number of output tokens for {spec.id}"
        )
    if body.max_tokens > room:
        raise InvalidRequestError(
            f"prompt is too long: {n_in} input tokens + max_tokens {body.max_tokens}"
            f" > {spec.context_window}, the context window of {spec.id}"
        )
    return body.max_tokens


async def admit(
    platform: Platform, principal: Principal, body: MessagesRequest, request_id: str
) -> Admitted:
    """Validate against the model, then persist the request and reserve its worst case."""
    spec = resolve_model(platform, body.model)
    input_ids = await run_in_threadpool(tokenize, platform, spec, body)
    max_tokens = decide_max_tokens(platform, spec, body, len(input_ids))
    worst = cost_usd(
        len(input_ids), max_tokens, spec.input_price_per_mtok, spec.output_price_per_mtok
    )
    reserve = credits_for(worst, platform.credit_price)
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
    )
    await run_in_threadpool(_open, platform.database_url, new)
    job = GenerateJob(
        request_id=request_id,
        model=spec.id,
        input_ids=input_ids,
        sampling=sampling_params(body, max_tokens),
    )
    return Admitted(request_id, message_id, spec, job, len(input_ids), reserve)


def _open(database_url: str, new: NewRequest) -> None:
    try:
        with transaction(database_url) as session:
            open_request(session, new)
    except InsufficientCredits as exc:
        raise BillingError(
            f"insufficient credits: this request may cost up to {exc.needed} credits,"
            f" available {exc.available}"
        ) from None
    except AccountUnavailable:
        raise PermissionDeniedError("this account is disabled") from None
