"""The body of `POST /v1/messages/batches`, parsed into the batch's requests (off the loop).

Problems of the batch itself are a 400 (no requests, too many, a `custom_id` missing, malformed
or repeated, a request that is not `{custom_id, params}`); a request whose `params` are not a
valid Messages request (a bad field, an unknown model, `stream`) ends `errored` with the error
`/v1/messages` would have given, and the rest of the batch runs. The body's bytes are bounded
like every body's (ABL_MAX_BODY_BYTES, a 413 naming it); its JSON values are counted before
parsing (ABL_BATCH_MAX_JSON_VALUES), so parsing it stays within a bounded memory.
"""

import json
import re
from typing import Any

from fastapi.exceptions import HTTPException
from pydantic import ValidationError

from api.anthropic.protocol import MessagesRequest
from api.errors import InvalidRequestError, format_validation_errors
from api.request_body import within_budget
from api.settings import ApiSettings
from contract.catalog import Catalog
from db.batches import NewItem

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def parse_batch(body: bytes, settings: ApiSettings, catalog: Catalog) -> list[NewItem]:
    """The batch's requests, in order; InvalidRequestError (400) for the batch's problems."""
    if not within_budget(body, settings.batch_max_json_values):
        raise HTTPException(
            413,
            f"request body has more than {settings.batch_max_json_values} JSON values"
            " (ABL_BATCH_MAX_JSON_VALUES)",
        )
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("body: Input should be a JSON object")
    unknown = sorted(set(data) - {"requests"})
    if unknown:
        raise InvalidRequestError(f"{unknown[0]}: Extra inputs are not permitted")
    requests = data.get("requests")
    if not isinstance(requests, list):
        raise InvalidRequestError("requests: Field required (a list of {custom_id, params})")
    if not requests:
        raise InvalidRequestError("requests: a batch needs at least one request")
    if len(requests) > settings.batch_max_requests:
        raise InvalidRequestError(
            f"requests: {len(requests)} requests > {settings.batch_max_requests}, the most a"
            " batch may hold"
        )
    seen: set[str] = set()
    items = []
    for index, entry in enumerate(requests):
        custom_id = _custom_id(index, entry)
        if custom_id in seen:
            raise InvalidRequestError(
                f"requests.{index}.custom_id: {custom_id!r} is used by an earlier request;"
                " custom_id must be unique within the batch"
            )
        seen.add(custom_id)
        items.append(_item(custom_id, entry["params"], catalog))
    return items


def _custom_id(index: int, entry: Any) -> str:
    if not isinstance(entry, dict):
        raise InvalidRequestError(f"requests.{index}: Input should be a JSON object")
    extra = sorted(set(entry) - {"custom_id", "params"})
    if extra:
        raise InvalidRequestError(f"requests.{index}.{extra[0]}: Extra inputs are not permitted")
    if "params" not in entry:
        raise InvalidRequestError(f"requests.{index}.params: Field required")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
        raise InvalidRequestError(
            f"requests.{index}.custom_id: must be 1-64 characters of letters, digits, _ and -"
        )
    return custom_id


def _item(custom_id: str, params: Any, catalog: Catalog) -> NewItem:
    model = params.get("model") if isinstance(params, dict) else None
    model = model if isinstance(model, str) else None
    kept = params if isinstance(params, dict) else None
    try:
        request = MessagesRequest.model_validate(params)
    except ValidationError as exc:
        message = format_validation_errors(exc.errors())
        return NewItem(custom_id, model, kept, _error("invalid_request_error", message))
    if request.stream:
        message = "stream: a batch request cannot stream; its result is in the batch's results"
        return NewItem(custom_id, model, kept, _error("invalid_request_error", message))
    if catalog.resolve(request.model) is None:
        return NewItem(custom_id, model, kept, _error("not_found_error", f"model: {model}"))
    return NewItem(custom_id, model, kept)


def _error(error_type: str, message: str) -> dict[str, str]:
    return {"type": error_type, "message": message}
