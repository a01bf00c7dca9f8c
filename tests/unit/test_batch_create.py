"""The create body of a Message Batch: the batch's problems are 400s, a request's are its own."""

import json
from typing import Any

import pytest
from fastapi.exceptions import HTTPException

from api.anthropic.batch_create import parse_batch
from api.errors import InvalidRequestError
from api.settings import ApiSettings
from contract.catalog import DEFAULT_MODEL_ID, load_catalog

CATALOG = load_catalog()
SETTINGS = ApiSettings(batch_max_requests=5, batch_max_json_values=500)


def params(**extra: Any) -> dict[str, Any]:
    return {
        "model": DEFAULT_MODEL_ID,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def parse(body: Any) -> Any:
    return parse_batch(json.dumps(body).encode(), SETTINGS, CATALOG)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ([], "JSON object"),
        ({}, "requests: Field required"),
        ({"requests": []}, "at least one"),
        ({"requests": [{"custom_id": "a", "params": params()}] * 2}, "unique"),
        ({"requests": [{"custom_id": "a" * 65, "params": params()}]}, "1-64"),
        ({"requests": [{"custom_id": "a b", "params": params()}]}, "1-64"),
        ({"requests": [{"custom_id": "a"}]}, "requests.0.params: Field required"),
        ({"requests": [{"custom_id": "a", "params": {}, "x": 1}]}, "requests.0.x"),
        ({"requests": [{"custom_id": "a", "params": params()}], "extra": 1}, "extra"),
        ({"requests": [{"custom_id": f"r{i}", "params": params()} for i in range(6)]}, "> 5"),
    ],
)
def test_batch_problems_are_refused(body: Any, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        parse(body)


def test_too_many_json_values_is_a_413() -> None:
    body = {"requests": [{"custom_id": "a", "params": params(metadata={"x": list(range(600))})}]}
    with pytest.raises(HTTPException) as refused:
        parse(body)
    assert refused.value.status_code == 413
    assert "ABL_BATCH_MAX_JSON_VALUES" in str(refused.value.detail)


def test_a_bad_request_ends_errored_alone() -> None:
    items = parse(
        {
            "requests": [
                {"custom_id": "ok", "params": params()},
                {"custom_id": "hot", "params": params(temperature=3)},
                {"custom_id": "who", "params": params(model="nobody")},
                {"custom_id": "flow", "params": params(stream=True)},
                {"custom_id": "list", "params": [1]},
            ]
        }
    )
    ok, hot, who, flow, listed = items
    assert ok.error is None and ok.model == DEFAULT_MODEL_ID and ok.params == params()
    assert hot.error is not None and hot.error["type"] == "invalid_request_error"
    assert "temperature" in hot.error["message"]
    assert who.error == {"type": "not_found_error", "message": "model: nobody"}
    assert flow.error is not None and "stream" in flow.error["message"]
    assert listed.error is not None and listed.params is None
