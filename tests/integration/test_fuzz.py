"""Schemathesis against the OpenAPI document the stack serves: valid and invalid requests to every
/v1 operation, with a valid API key. No answer may be a 5xx or a 422, and every error must be
Anthropic's envelope. `make fuzz` runs the same with ABL_FUZZ_EXAMPLES=500 (about 5000
requests); the default suite runs about 200.
"""

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from infra.stack import Stack
from tests.conftest import AccountFactory

# Per operation and mode (valid / invalid data): 5 operations x 2 modes x 20 = 200 requests.
EXAMPLES = int(os.environ.get("ABL_FUZZ_EXAMPLES", "20"))
# Generation is real (a CPU worker); valid requests stay cheap with a tiny max_tokens.
MAX_TOKENS = 3


@pytest.fixture(scope="module")
def fuzz_key(make_account: AccountFactory) -> str:
    return make_account(credits=10**12, name="fuzz").key


@pytest.fixture(scope="module")
def api_schema(stack: Stack) -> Any:
    return schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")


# Every /v1 operation the document lists; a new one fails the test below until it is added.
OPERATIONS = [
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/v1/account"),
]


def test_every_v1_operation_is_fuzzed(api_schema: Any) -> None:
    listed = {
        (result.ok().method.upper(), result.ok().path)
        for result in api_schema.get_all_operations()
        if result.ok().path.startswith("/v1/")
    }
    assert listed == set(OPERATIONS)


def _keep_generation_short(case: Any) -> None:
    if case.path != "/v1/messages" or not isinstance(case.body, dict):
        return
    max_tokens = case.body.get("max_tokens")
    if max_tokens is None or (isinstance(max_tokens, int) and max_tokens > MAX_TOKENS):
        case.body["max_tokens"] = MAX_TOKENS


def _check(case: Any, stack: Stack, fuzz_key: str) -> None:
    _keep_generation_short(case)
    response = case.call(base_url=stack.base_url, headers={"x-api-key": fuzz_key}, timeout=120)
    described = f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    described += f"\n{case.as_curl_command()}"[:2000]
    assert response.status_code < 500, described
    assert response.status_code != 422, described
    if response.status_code >= 400:
        body = response.json()
        assert body["type"] == "error", described
        assert body["error"]["type"] and body["error"]["message"], described
        assert [body["request_id"]] == response.headers["request-id"], described


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors(
    api_schema: Any, stack: Stack, fuzz_key: str, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        _check(case, stack, fuzz_key)

    fuzz()
