"""Metrics, request logs and readiness on the session's stack: what an operator sees."""

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from contract.keys import cancel_key
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory, ApiAccount
from tests.integration.api_process import api_process
from tests.scrape import Samples, scrape
from tests.support import STACK_MODEL, wait_for

pytestmark = pytest.mark.integration

MODEL = STACK_MODEL
BODY = {
    "model": MODEL,
    "max_tokens": 16,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Hi"}],
}
LONG = {
    **BODY,
    "max_tokens": 1000,
    "stream": True,
    "messages": [{"role": "user", "content": "Write a very long story."}],
}


def api_metrics(stack: Stack) -> Samples:
    return scrape(f"{stack.base_url}/metrics")


def worker_metrics(stack: Stack, i: int = 0) -> Samples:
    env = stack.workers[i].env
    return scrape(f"http://{env['ABL_METRICS_HOST']}:{env['ABL_METRICS_PORT']}/metrics")


def sse(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name:
            events.append((name, json.loads(line[6:])))
    return events


def request_lines(log_path: Path, request_id: str) -> list[dict[str, Any]]:
    lines = []
    for raw in log_path.read_text(errors="replace").splitlines():
        if raw.startswith("{") and request_id in raw:
            record = json.loads(raw)
            if record.get("logger") == "abl.requests" and record["request_id"] == request_id:
                lines.append(record)
    return lines


def test_requests_tokens_credits_and_latency_are_counted(stack: Stack, http: httpx.Client) -> None:
    before = api_metrics(stack)
    plain = http.post("/v1/messages", json=BODY)
    assert plain.status_code == 200, plain.text
    with http.stream("POST", "/v1/messages", json={**BODY, "stream": True}) as streamed:
        assert streamed.status_code == 200
        events = sse(streamed)
    after = api_metrics(stack)

    final = next(d for n, d in events if n == "message_delta")
    start = next(d for n, d in events if n == "message_start")["message"]
    deltas = sum(1 for n, _ in events if n == "content_block_delta")
    usage = plain.json()["usage"]
    labels = {"model": MODEL}
    ok = {"model": MODEL, "status": "succeeded", "error_type": ""}
    assert after.get("abl_requests_total", **ok) - before.get("abl_requests_total", **ok) == 2
    inputs = usage["input_tokens"] + start["usage"]["input_tokens"]
    outputs = usage["output_tokens"] + final["usage"]["output_tokens"]
    credits = plain.json()["estimated_credits_used"] + final["estimated_credits_used"]
    for name, expected in [
        ("abl_input_tokens_total", inputs),
        ("abl_output_tokens_total", outputs),
        ("abl_credits_charged_total", credits),
        ("abl_time_to_first_token_seconds_count", 2),
    ]:
        assert after.get(name, **labels) - before.get(name, **labels) == expected, name
    itl = after.get("abl_inter_token_latency_seconds_count", **labels) - before.get(
        "abl_inter_token_latency_seconds_count", **labels
    )
    # Every delta after a request's first adds at least one observation; never more than tokens.
    assert deltas - 1 <= itl <= outputs
    route = {"route": "/v1/messages", "code": "200"}
    assert (
        after.get("abl_http_responses_total", **route)
        - before.get("abl_http_responses_total", **route)
        == 2
    )
    assert after.get("abl_live_workers", **labels) == len(stack.workers)
    assert ("abl_queue_depth", (("model", MODEL),)) in after.values


def test_refusals_are_counted_by_error_type(stack: Stack, make_account: AccountFactory) -> None:
    limited = make_account(rate_limits={"requests_per_minute": 1})
    broke = make_account(credits=0)
    before = api_metrics(stack)

    def post(account: ApiAccount, body: dict[str, Any]) -> int:
        headers = {"x-api-key": account.key}
        return httpx.post(
            f"{stack.base_url}/v1/messages", json=body, headers=headers, timeout=60
        ).status_code

    assert post(broke, {**BODY, "model": "no-such-model"}) == 404
    assert post(broke, BODY) == 402
    assert post(limited, BODY) == 200
    assert post(limited, BODY) == 429
    after = api_metrics(stack)

    def grew(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    rejected = {"status": "rejected"}
    assert (
        grew("abl_requests_total", model="unknown", error_type="not_found_error", **rejected) == 1
    )
    assert grew("abl_requests_total", model=MODEL, error_type="billing_error", **rejected) == 1
    assert grew("abl_requests_total", model=MODEL, error_type="rate_limit_error", **rejected) == 1
    assert grew("abl_rate_limit_rejections_total", model=MODEL) == 1


def test_worker_metrics_show_the_batch_and_cancellations(stack: Stack, http: httpx.Client) -> None:
    idle = worker_metrics(stack)
    labels = {"model": MODEL}
    assert idle.get("abl_worker_info", worker="worker-0") == 1
    assert idle.get("abl_worker_kv_cache_capacity_tokens", **labels) > 0
    before_api = api_metrics(stack)
    with http.stream("POST", "/v1/messages", json=LONG) as response:
        assert response.status_code == 200
        # Held, not dropped: closing this iterator would close the connection at once.
        lines = response.iter_lines()
        while not next(lines).startswith("event: content_block_delta"):
            pass
        busy = worker_metrics(stack)
    # Leaving the block closed the stream: the API cancels the request.
    assert busy.get("abl_worker_batch_size", **labels) >= 1
    assert busy.get("abl_worker_kv_cache_tokens", **labels) > 0
    assert 0 < busy.get("abl_worker_kv_cache_usage_ratio", **labels) <= 1
    assert busy.get("abl_worker_generated_tokens_total", **labels) > idle.get(
        "abl_worker_generated_tokens_total", **labels
    )
    cancelled = {"model": MODEL, "outcome": "cancelled"}
    wait_for(
        lambda: (
            worker_metrics(stack).get("abl_worker_generations_total", **cancelled)
            > idle.get("abl_worker_generations_total", **cancelled)
        )
    )
    after = wait_for(
        lambda: (s := worker_metrics(stack)).get("abl_worker_batch_size", **labels) == 0 and s
    )
    assert after.get("abl_worker_kv_cache_tokens", **labels) == 0
    assert after.get("abl_worker_requests_total", model=MODEL, status="cancelled") > idle.get(
        "abl_worker_requests_total", model=MODEL, status="cancelled"
    )
    api_after = api_metrics(stack)
    assert (
        api_after.get("abl_cancelled_requests_total", **labels)
        - before_api.get("abl_cancelled_requests_total", **labels)
        == 1
    )


def test_a_generation_nobody_waits_for_is_counted_as_orphaned(
    stack: Stack, http: httpx.Client
) -> None:
    """The cancel key set without the broadcast the API sends with it: the worker never hears
    of the cancellation, runs the stream to its end for nobody, and must count that."""
    labels = {"model": MODEL}
    before = worker_metrics(stack).get("abl_worker_orphaned_generations_total", **labels)
    client = redis.Redis.from_url(stack.redis_url or "")
    with http.stream("POST", "/v1/messages", json={**LONG, "max_tokens": 200}) as response:
        assert response.status_code == 200
        request_id = response.headers["request-id"]
        lines = response.iter_lines()
        while not next(lines).startswith("event: content_block_delta"):
            pass
        client.set(cancel_key(request_id), 1, ex=60)
        rest = list(lines)
    assert "event: message_stop" in rest
    after = wait_for(
        lambda: (
            (s := worker_metrics(stack)).get("abl_worker_orphaned_generations_total", **labels)
            > before
            and s
        )
    )
    assert after.get("abl_worker_orphaned_generations_total", **labels) == before + 1
    worker_lines = wait_for(lambda: request_lines(stack.log_dir / "worker-0.log", request_id))
    assert worker_lines[0]["orphaned"] is True
    assert worker_lines[0]["status"] == "succeeded"


def test_one_json_line_per_request_in_api_and_worker(stack: Stack, http: httpx.Client) -> None:
    response = http.post("/v1/messages", json=BODY)
    assert response.status_code == 200
    request_id = response.headers["request-id"]
    body = response.json()
    api_lines = wait_for(lambda: request_lines(stack.log_dir / "api.log", request_id))
    worker_lines = wait_for(lambda: request_lines(stack.log_dir / "worker-0.log", request_id))
    assert len(api_lines) == 1 and len(worker_lines) == 1
    api, worker = api_lines[0], worker_lines[0]
    assert api["account_id"].startswith("acct_")
    assert api["key_prefix"] and http.headers["x-api-key"].startswith(api["key_prefix"])
    assert (api["model"], api["status"], api["error_type"]) == (MODEL, "succeeded", None)
    assert api["input_tokens"] == body["usage"]["input_tokens"]
    assert api["output_tokens"] == body["usage"]["output_tokens"]
    assert api["credits"] == body["estimated_credits_used"]
    assert api["latency_s"] >= api["ttft_s"] > 0
    assert (worker["worker"], worker["status"], worker["orphaned"]) == (
        "worker-0",
        "succeeded",
        False,
    )
    assert (worker["output_tokens"], worker["credits"]) == (api["output_tokens"], api["credits"])
    assert (worker["account_id"], worker["key_prefix"]) == (api["account_id"], api["key_prefix"])
    assert worker["latency_s"] > 0


def test_readyz_names_each_required_model(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/readyz", timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ready"] is True and body["failed"] == []
    workers = body["checks"]["workers"]
    assert workers["required"] == [MODEL] and workers["missing"] == []
    assert workers["by_model"][MODEL] == len(stack.workers)
    assert body["checks"]["database"]["ok"] and body["checks"]["redis"]["ok"]


def test_readyz_fails_for_a_required_model_without_workers(stack: Stack, tmp_path: Path) -> None:
    env = {"ABL_READY_MODELS": f"{MODEL},model-nobody-serves"}
    with api_process(stack, tmp_path / "api.log", env) as base_url:
        response = httpx.get(f"{base_url}/readyz", timeout=10)
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False and body["failed"] == ["workers"]
    workers = body["checks"]["workers"]
    assert workers["missing"] == ["model-nobody-serves"]
    assert workers["by_model"] == {MODEL: len(stack.workers), "model-nobody-serves": 0}
