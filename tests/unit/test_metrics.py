"""Metrics and request logs, without servers: the API's RequestMeter, the worker's engine
collector, the readiness rule, the JSON formatter, and the dashboard's queries."""

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY

from api.credentials import Principal
from api.errors import ApiInternalError, NotFoundError, RateLimitError
from api.health import workers_check
from api.metrics import RequestMeter
from contract.catalog import Catalog, ModelSpec
from contract.events import DeltaEvent, DoneEvent
from contract.logs import REQUEST_LOGGER, JsonFormatter
from workers.backends.seam import EngineStats
from workers.telemetry import EngineCollector

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "infra" / "deploy" / "grafana" / "dashboards" / "abl.json"
)
PRINCIPAL = Principal("acct_unit", "key_unit", "ak_unit", None)


def catalog(model: str) -> Catalog:
    return Catalog(
        [
            ModelSpec(
                id=model,
                display_name=model,
                folder=model,
                context_window=100,
                max_output_tokens=50,
                input_price_per_mtok=Decimal(1),
                output_price_per_mtok=Decimal(1),
                queue=model,
            )
        ]
    )


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def request_lines() -> Iterator[list[dict[str, Any]]]:
    """The `abl.requests` lines logged during the test, parsed."""
    lines: list[dict[str, Any]] = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(json.loads(JsonFormatter().format(r)))  # type: ignore[method-assign]
    logger = logging.getLogger(REQUEST_LOGGER)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def done(output_tokens: int, credits: int = 3) -> DoneEvent:
    return DoneEvent(
        index=9,
        status="succeeded",
        stop_reason="end_turn",
        stop_sequence=None,
        input_tokens=7,
        output_tokens=output_tokens,
        credits_charged=credits,
        remaining_credits=100,
        cost_usd="0.001",
    )


def test_a_streamed_request_counts_latency_tokens_and_credits(
    request_lines: list[dict[str, Any]],
) -> None:
    model = "unit-ok"
    meter = RequestMeter(catalog(model), PRINCIPAL, model, "req_unit1", stream=True)
    meter.queued(7)
    meter.delta(DeltaEvent(index=0, text="a", output_tokens=1))
    meter.delta(DeltaEvent(index=1, text="bc", output_tokens=3))  # two tokens coalesced
    meter.delta(DeltaEvent(index=2, text="d", output_tokens=4))
    meter.done(done(4))
    meter.close()
    meter.close()  # counted once
    labels = {"model": model}
    assert value("abl_requests_total", model=model, status="succeeded", error_type="") == 1
    assert value("abl_time_to_first_token_seconds_count", **labels) == 1
    assert value("abl_inter_token_latency_seconds_count", **labels) == 3
    assert value("abl_input_tokens_total", **labels) == 7
    assert value("abl_output_tokens_total", **labels) == 4
    assert value("abl_credits_charged_total", **labels) == 3
    assert value("abl_request_duration_seconds_count", model=model, status="succeeded") == 1
    (line,) = request_lines
    assert line["logger"] == REQUEST_LOGGER and line["msg"] == "request"
    assert line["request_id"] == "req_unit1" and line["account_id"] == "acct_unit"
    assert (line["key_prefix"], line["model"], line["status"]) == ("ak_unit", model, "succeeded")
    assert (line["input_tokens"], line["output_tokens"], line["credits"]) == (7, 4, 3)
    assert line["latency_s"] >= line["ttft_s"] >= 0


def test_unknown_models_share_one_label() -> None:
    meter = RequestMeter(catalog("unit-known"), PRINCIPAL, "x" * 1000, "req_unit2", stream=False)
    meter.fail(NotFoundError("model: x"))
    meter.close(cancelled=True)
    labels = {"model": "unknown", "status": "rejected", "error_type": "not_found_error"}
    assert value("abl_requests_total", **labels) >= 1
    assert REGISTRY.get_sample_value("abl_requests_total", {**labels, "model": "x" * 1000}) is None


@pytest.mark.parametrize(
    ("steps", "status", "error_type"),
    [
        (["rate_limited"], "rejected", "rate_limit_error"),
        (["queued", "delta", "client_gone"], "cancelled", ""),
        (["queued", "delta", "worker_died"], "failed", "api_error"),
        (["queued", "error_event"], "failed", "overloaded_error"),
        (["queued", "closed_without_outcome"], "failed", "api_error"),
    ],
)
def test_outcomes(steps: list[str], status: str, error_type: str) -> None:
    model = f"unit-{'-'.join(steps)}"
    meter = RequestMeter(catalog(model), PRINCIPAL, model, "req_unit3", stream=True)
    cancelled = False
    for step in steps:
        if step == "rate_limited":
            meter.fail(RateLimitError("slow down"))
        elif step == "queued":
            meter.queued(5)
        elif step == "delta":
            meter.delta(DeltaEvent(index=0, text="a", output_tokens=1))
        elif step == "client_gone":
            meter.fail(asyncio.CancelledError())  # not an error: the client went away
            cancelled = True
        elif step == "worker_died":
            meter.fail(ApiInternalError("the worker stopped"))
            cancelled = True  # the relay also cancels what it did not finish
        elif step == "error_event":
            meter.fail("overloaded_error")
    meter.close(cancelled=cancelled)
    assert value("abl_requests_total", model=model, status=status, error_type=error_type) == 1
    assert value("abl_cancelled_requests_total", model=model) == (status == "cancelled")
    assert value("abl_rate_limit_rejections_total", model=model) == (
        error_type == "rate_limit_error"
    )
    assert value("abl_output_tokens_total", model=model) == 0


def test_readiness_needs_a_worker_for_every_required_model() -> None:
    workers = [{"name": "w1", "models": ["a"]}, {"name": "w2", "models": ["a", "c"]}]
    ok = workers_check(["a"], workers)
    assert ok["ok"] and ok["by_model"] == {"a": 2, "c": 1} and ok["count"] == 2
    missing = workers_check(["a", "b"], workers)
    assert not missing["ok"] and missing["missing"] == ["b"] and missing["models"] == ["a", "c"]
    assert workers_check(["a"], [])["ok"] is False


def test_engine_collector_reads_stats_at_scrape_time() -> None:
    stats = SimpleNamespace(
        active=3,
        waiting=1,
        steps=40,
        tokens_generated=120,
        cancelled=2,
        finished=5,
        failed=1,
        kv_tokens=512,
        kv_allocated_tokens=600,
        kv_capacity_tokens=2048,
        prefix_lookups=10,
        prefix_hits=7,
        prefix_read_tokens=7000,
        prefix_stored_tokens=3000,
        prefix_evictions=4,
        prefix_bytes=1 << 20,
        prefix_budget_bytes=1 << 22,
    )
    engine = SimpleNamespace(stats=stats)
    families = {f.name: f for f in EngineCollector({"m": engine}).collect()}  # type: ignore[dict-item]
    samples = {
        (s.name, tuple(s.labels.values())): s.value for f in families.values() for s in f.samples
    }
    assert samples[("abl_worker_batch_size", ("m",))] == 3
    assert samples[("abl_worker_kv_cache_usage_ratio", ("m",))] == 0.25
    assert samples[("abl_worker_generated_tokens_total", ("m",))] == 120
    assert samples[("abl_worker_generations_total", ("m", "cancelled"))] == 2
    assert samples[("abl_worker_prefix_cache_hits_total", ("m",))] == 7
    assert samples[("abl_worker_prefix_cache_bytes", ("m",))] == 1 << 20
    stats.active = 0
    again = {f.name: f for f in EngineCollector({"m": engine}).collect()}  # type: ignore[dict-item]
    assert again["abl_worker_batch_size"].samples[0].value == 0


def known_series() -> set[str]:
    """Every series name the API and worker registries and the engine collector can expose."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    fake = SimpleNamespace(stats=EngineStats())
    families = [*REGISTRY.collect(), *EngineCollector({"m": fake}).collect()]  # type: ignore[dict-item]
    names = set()
    for family in families:
        for suffix in suffixes.get(family.type, [""]):
            names.add(family.name + suffix)
    return names


def test_dashboard_queries_existing_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\babl_[a-z_]+", expr)}
    assert used and used <= known_series(), used - known_series()
    # Every panel reads the provisioned datasource.
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {"abl-prometheus"}


def test_json_formatter_writes_one_object_per_line() -> None:
    record = logging.LogRecord("abl.requests", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"request_id": "req_x", "credits": Decimal("1.5"), "text": "é\nx"}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["request_id"] == "req_x" and parsed["credits"] == "1.5"
    assert parsed["level"] == "info" and parsed["ts"].endswith("+00:00")
