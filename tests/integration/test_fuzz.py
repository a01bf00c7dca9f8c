"""Schemathesis against the OpenAPI document the stack serves: valid and invalid requests to every
/v1 operation, with a valid API key. No answer may be a 5xx or a 422, and every error must be
Anthropic's envelope. `make fuzz` runs the same with ABL_FUZZ_EXAMPLES=600 (about 4800
requests); the default suite runs about 200.
"""

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from infra.launcher.stack import Stack
from tests.conftest import AccountFactory
from tests.support import STACK_MODEL

# Per operation and mode (valid / invalid data): 8 runs x 25 = 200 requests.
EXAMPLES = int(os.environ.get("ABL_FUZZ_EXAMPLES", "25"))
# Generation is real (a CPU worker); valid requests stay cheap with a tiny max_tokens.
MAX_TOKENS = 3
MODEL = STACK_MODEL


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
    ("POST", "/v1/messages/batches"),
    ("GET", "/v1/messages/batches"),
    ("GET", "/v1/messages/batches/{batch_id}"),
    ("POST", "/v1/messages/batches/{batch_id}/cancel"),
    ("DELETE", "/v1/messages/batches/{batch_id}"),
    ("GET", "/v1/messages/batches/{batch_id}/results"),
]
# Invalid data needs a constraint to break: a free string path parameter or no input has none.
NO_INVALID_FORM = {
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/v1/account"),
    ("GET", "/v1/messages/batches/{batch_id}"),
    ("POST", "/v1/messages/batches/{batch_id}/cancel"),
    ("DELETE", "/v1/messages/batches/{batch_id}"),
    ("GET", "/v1/messages/batches/{batch_id}/results"),
}
# Invalid batch bodies nest the whole Messages schema; past a few examples hypothesis takes
# minutes to build each one (25 took over 300 s, 8 take 7 s), so that run draws fewer.
SLOW_INVALID_FORM = {("POST", "/v1/messages/batches"): 8}
# Requests of a fuzzed batch that are kept (each may run).
BATCH_REQUESTS = 3
RUNS = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or (method, path) not in NO_INVALID_FORM
]


def test_every_v1_operation_is_fuzzed(api_schema: Any) -> None:
    listed = {
        (result.ok().method.upper(), result.ok().path)
        for result in api_schema.get_all_operations()
        if result.ok().path.startswith("/v1/")
    }
    assert listed == set(OPERATIONS)


def _steer(case: Any, mode: GenerationMode) -> None:
    """Push valid data past the early refusals (random version, random model, a thinking
    budget above max_tokens, MCP servers) so that it reaches tokenizing, rate limiting,
    billing and generation; keep generation short."""
    if mode is GenerationMode.POSITIVE and case.headers:
        case.headers.pop("anthropic-version", None)
    if not isinstance(case.body, dict):
        return
    if case.path == "/v1/messages/batches":
        requests = case.body.get("requests")
        if isinstance(requests, list):
            del requests[BATCH_REQUESTS:]
            for request in requests:
                if isinstance(request, dict) and isinstance(request.get("params"), dict):
                    _steer_params(request["params"], mode, messages=True)
        return
    _steer_params(case.body, mode, messages=case.path == "/v1/messages")


def _steer_params(body: dict[str, Any], mode: GenerationMode, *, messages: bool) -> None:
    if mode is GenerationMode.POSITIVE:
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
        for unsupported in ("thinking", "mcp_servers"):
            body.pop(unsupported, None)
    if not messages:
        return
    max_tokens = body.get("max_tokens")
    if max_tokens is None or (isinstance(max_tokens, int) and max_tokens > MAX_TOKENS):
        body["max_tokens"] = MAX_TOKENS


def _check(case: Any, mode: GenerationMode, stack: Stack, fuzz_key: str) -> None:
    _steer(case, mode)
    response = case.call(base_url=stack.base_url, headers={"x-api-key": fuzz_key}, timeout=120)
    described = f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    if isinstance(case.body, dict):  # the sampling fields, which a long curl line cuts off
        described += f"\n{ {k: v for k, v in case.body.items() if k != 'messages'} }"[:1000]
    described += f"\n{case.as_curl_command()}"[:3000]
    assert response.status_code < 500, described
    assert response.status_code != 422, described
    if response.status_code >= 400:
        body = response.json()
        assert body["type"] == "error", described
        assert body["error"]["type"] and body["error"]["message"], described
        assert [body["request_id"]] == response.headers["request-id"], described


@pytest.mark.parametrize(("method", "path", "mode"), RUNS, ids=[f"{m} {p} {g}" for m, p, g in RUNS])
def test_no_server_errors(
    api_schema: Any, stack: Stack, fuzz_key: str, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]
    examples = EXAMPLES
    if mode is GenerationMode.NEGATIVE:
        examples = min(EXAMPLES, SLOW_INVALID_FORM.get((method, path), EXAMPLES))

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        _check(case, mode, stack, fuzz_key)

    fuzz()
