"""A model's output limits over HTTP, on real components: max_tokens lowered to what fits under
the `clamp` policy (the header says so, the reservation and the run use the lowered value),
Anthropic's exact 400s under `reject`.

The stack's worker serves the test model; two more API processes give it, in their catalogues,
a small window (512 tokens, 64 out) with one policy each, so prompts that overflow it are cheap.
"""

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from contract.rendering import PromptRenderer
from db.pricing import Prices
from infra.launcher.stack import Stack
from tests.conftest import ApiAccount
from tests.integration.api_process import api_process
from tests.support import STACK_MODEL, STACK_MODEL_SPEC, sse_events

pytestmark = pytest.mark.integration

WINDOW = 512
MAX_OUT = 64
CREDIT_PRICE = Decimal("0.001")


def small_window(stack: Stack, tmp: Any, policy: str) -> Iterator[str]:
    folder = tmp.mktemp(f"limits-{policy}")
    changes = {"context_window": WINDOW, "max_output_tokens": MAX_OUT, "max_tokens_policy": policy}
    spec = STACK_MODEL_SPEC.model_copy(update=changes)
    models_file = folder / "models.json"
    models_file.write_text(json.dumps([spec.model_dump(mode="json")]))
    with api_process(stack, folder / "api.log", {"ABL_MODELS_FILE": str(models_file)}) as url:
        yield url


@pytest.fixture(scope="module")
def clamp_url(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from small_window(stack, tmp_path_factory, "clamp")


@pytest.fixture(scope="module")
def reject_url(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from small_window(stack, tmp_path_factory, "reject")


@pytest.fixture(scope="module")
def renderer(stack: Stack) -> PromptRenderer:
    return PromptRenderer.from_folder(stack.model_dir)


def client(url: str, account: ApiAccount) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"x-api-key": account.key}, timeout=120)


def prompt_of(renderer: PromptRenderer, tokens: int) -> tuple[str, int]:
    """The longest user message of numbered words whose prompt is at most `tokens` tokens, and
    that prompt's exact count."""
    words = [f"w{i}" for i in range(tokens)]
    low, high = 1, len(words)
    while low < high:
        mid = (low + high + 1) // 2
        if renderer.count(None, [("user", " ".join(words[:mid]))]) <= tokens:
            low = mid
        else:
            high = mid - 1
    text = " ".join(words[:low])
    return text, renderer.count(None, [("user", text)])


def body(text: str = "Hi", **fields: Any) -> dict[str, Any]:
    return {"model": STACK_MODEL, "messages": [{"role": "user", "content": text}], **fields}


def stored(admin: httpx.Client, request_id: str) -> dict[str, Any]:
    response = admin.get(f"/admin/requests/{request_id}")
    assert response.status_code == 200, response.text
    row: dict[str, Any] = response.json()
    return row


def test_clamp_lowers_max_tokens_to_the_output_limit_and_reserves_that(
    clamp_url: str, account: ApiAccount, admin: httpx.Client, renderer: PromptRenderer
) -> None:
    n_in = renderer.count(None, [("user", "Hi")])
    with client(clamp_url, account) as http:
        response = http.post("/v1/messages", json=body(max_tokens=32_000, temperature=0))
    assert response.status_code == 200, response.text
    assert response.headers["abl-max-tokens"] == str(MAX_OUT)
    assert response.json()["usage"]["output_tokens"] <= MAX_OUT
    row = stored(admin, response.headers["request-id"])
    assert (row["max_tokens"], row["input_tokens"]) == (MAX_OUT, n_in)
    # However large: a client's habit, not an error.
    with client(clamp_url, account) as http:
        huge = http.post("/v1/messages", json=body(max_tokens=10**40, temperature=0))
    assert huge.status_code == 200, huge.text
    assert huge.headers["abl-max-tokens"] == str(MAX_OUT)
    prices = Prices(
        STACK_MODEL_SPEC.input_price_per_mtok, STACK_MODEL_SPEC.output_price_per_mtok, CREDIT_PRICE
    )
    assert row["credits_reserved"] == prices.credits(n_in, MAX_OUT)


def test_clamp_leaves_the_rest_of_the_window_and_says_so_in_a_stream(
    clamp_url: str, account: ApiAccount, admin: httpx.Client, renderer: PromptRenderer
) -> None:
    text, n_in = prompt_of(renderer, WINDOW - 20)
    payload = body(text, max_tokens=MAX_OUT, temperature=0, stream=True)
    with client(clamp_url, account) as http, http.stream("POST", "/v1/messages", json=payload) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["abl-max-tokens"] == str(WINDOW - n_in)
        events = [(name, data) for name, data in sse_events(r.iter_lines()) if name != "ping"]
    assert events[-1][0] == "message_stop"
    (delta,) = [data for name, data in events if name == "message_delta"]
    assert delta["usage"]["output_tokens"] <= WINDOW - n_in
    assert stored(admin, r.headers["request-id"])["max_tokens"] == WINDOW - n_in


def test_a_max_tokens_that_fits_is_kept_without_the_header(
    clamp_url: str, account: ApiAccount
) -> None:
    with client(clamp_url, account) as http:
        response = http.post("/v1/messages", json=body(max_tokens=MAX_OUT, temperature=0))
    assert response.status_code == 200, response.text
    assert "abl-max-tokens" not in response.headers


@pytest.mark.parametrize("url", ["clamp_url", "reject_url"])
def test_a_prompt_over_the_window_is_refused_in_anthropics_words(
    url: str, request: pytest.FixtureRequest, account: ApiAccount, renderer: PromptRenderer
) -> None:
    text, n_in = prompt_of(renderer, WINDOW + 40)
    assert n_in >= WINDOW
    with client(request.getfixturevalue(url), account) as http:
        response = http.post("/v1/messages", json=body(text, max_tokens=8))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error == {
        "type": "invalid_request_error",
        "message": f"prompt is too long: {n_in} tokens > {WINDOW - 1} maximum",
    }


def test_reject_answers_anthropics_400s(
    reject_url: str, account: ApiAccount, renderer: PromptRenderer
) -> None:
    text, n_in = prompt_of(renderer, WINDOW - 20)
    with client(reject_url, account) as http:
        over_output = http.post("/v1/messages", json=body(max_tokens=MAX_OUT + 1))
        over_window = http.post("/v1/messages", json=body(text, max_tokens=MAX_OUT))
        fits = http.post("/v1/messages", json=body(text, max_tokens=WINDOW - n_in, temperature=0))
    assert over_output.status_code == 400
    assert over_output.json()["error"]["message"] == (
        f"max_tokens: {MAX_OUT + 1} > {MAX_OUT}, which is the maximum allowed number of output"
        f" tokens for {STACK_MODEL}"
    )
    assert over_window.status_code == 400
    assert over_window.json()["error"]["message"] == (
        f"input length and max_tokens exceed context limit: {n_in} + {MAX_OUT} > {WINDOW},"
        " decrease input length or max_tokens and try again"
    )
    assert fits.status_code == 200, fits.text
    assert "abl-max-tokens" not in fits.headers


def test_the_stack_model_takes_claude_codes_max_tokens(http: httpx.Client) -> None:
    """32,000 (Claude Code's default) on the test model: lowered to its 4,096."""
    # Any of these ends the random model's answer early.
    stops = ["a", "e", "i", "o", "u", " ", "\n"]
    payload = body(max_tokens=32_000, temperature=0, stop_sequences=stops)
    response = http.post("/v1/messages", json=payload)
    assert response.status_code == 200, response.text
    assert response.headers["abl-max-tokens"] == str(STACK_MODEL_SPEC.max_output_tokens)
