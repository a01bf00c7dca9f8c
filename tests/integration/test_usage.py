"""Billing reports on the real stack: usage totals equal the requests sent, CSV parses, top
accounts, the rollup agrees with the request rows, and GET /v1/account shows only your own."""

import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import daily_usage
from db.models import Account, Request
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory, ApiAccount
from tests.support import STACK_MODEL

pytestmark = pytest.mark.integration

MODEL = STACK_MODEL
METRICS = ("requests", "input_tokens", "output_tokens", "credits_charged", "cost_usd")
# Prompt-cache columns (docs/caching.md): 0 here, where no request marks a breakpoint.
CACHE = ("cache_read_input_tokens", "cache_creation_input_tokens")
REPO = Path(__file__).resolve().parents[2]


def send(stack: Stack, key: str, max_tokens: int, *, stream: bool = False) -> dict[str, int | str]:
    """One request; its usage as the response reported it."""
    body = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": f"Count to {max_tokens}."}],
    }
    with httpx.Client(base_url=stack.base_url, headers={"x-api-key": key}, timeout=120) as http:
        if not stream:
            response = http.post("/v1/messages", json=body)
            assert response.status_code == 200, response.text
            message = response.json()
            usage, credits, cost = (
                message["usage"],
                message["estimated_credits_used"],
                message["estimated_cost_usd"],
            )
        else:
            with http.stream("POST", "/v1/messages", json=body) as response:
                assert response.status_code == 200
                data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            events = [json.loads(d) for d in data]
            start = next(e for e in events if e["type"] == "message_start")
            delta = next(e for e in events if e["type"] == "message_delta")
            usage = {**start["message"]["usage"], **delta["usage"]}
            credits, cost = delta["estimated_credits_used"], delta["estimated_cost_usd"]
    return {
        "input_tokens": usage["input_tokens"],
        "output_tokens": usage["output_tokens"],
        "credits_charged": credits,
        "cost_usd": str(cost),
    }


def summed(sent: list[dict[str, int | str]]) -> dict[str, Any]:
    return {
        "requests": len(sent),
        "input_tokens": sum(int(s["input_tokens"]) for s in sent),
        "output_tokens": sum(int(s["output_tokens"]) for s in sent),
        "credits_charged": sum(int(s["credits_charged"]) for s in sent),
        "cost_usd": sum((Decimal(str(s["cost_usd"])) for s in sent), Decimal(0)),
    }


def metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {**{k: row[k] for k in METRICS}, "cost_usd": Decimal(row["cost_usd"])}


@pytest.fixture(scope="module")
def spent(stack: Stack, make_account: AccountFactory, admin: httpx.Client) -> dict[str, Any]:
    """A fresh account that sent five requests with two keys; the window around them."""
    account = make_account(credits=100_000, name="usage-report")
    second = admin.post(f"/admin/accounts/{account.id}/keys", json={"name": "second"})
    assert second.status_code == 201, second.text
    first_key = admin.get(f"/admin/accounts/{account.id}/keys").json()["data"][0]["id"]
    start = datetime.now(UTC) - timedelta(seconds=5)
    by_key = {
        first_key: [send(stack, account.key, n) for n in (4, 9)]
        + [send(stack, account.key, 6, stream=True)],
        second.json()["id"]: [send(stack, second.json()["key"], n) for n in (3, 12)],
    }
    end = datetime.now(UTC) + timedelta(seconds=5)
    return {"account": account, "by_key": by_key, "start": start, "end": end}


def report(admin: httpx.Client, spent: dict[str, Any], **params: Any) -> httpx.Response:
    window = {"start": spent["start"].isoformat(), "end": spent["end"].isoformat()}
    return admin.get("/admin/usage", params={**window, **params})


def test_usage_totals_equal_the_requests_sent(
    admin: httpx.Client, spent: dict[str, Any], db: Session
) -> None:
    account: ApiAccount = spent["account"]
    everything = [s for sent in spent["by_key"].values() for s in sent]
    response = report(admin, spent, group_by="account,key,model,day", account_id=account.id)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["group_by"] == ["account", "model", "day", "key"]
    assert body["columns"] == ["account_id", "model", "day", "key_id", *METRICS, *CACHE]
    assert {r["key_id"] for r in body["data"]} == set(spent["by_key"])
    for row in body["data"]:
        assert (row["account_id"], row["model"]) == (account.id, MODEL)
        assert row["day"] in {spent["start"].date().isoformat(), spent["end"].date().isoformat()}
    for key_id, sent in spent["by_key"].items():
        rows = [r for r in body["data"] if r["key_id"] == key_id]
        total = {m: sum(metrics(r)[m] for r in rows) for m in METRICS}
        assert total == summed(sent)
    assert metrics(body["totals"]) == summed(everything)
    # The same numbers as the request rows themselves.
    rows = list(db.scalars(select(Request).where(Request.account_id == account.id)))
    assert len(rows) == len(everything)
    assert sum(r.credits_charged for r in rows) == body["totals"]["credits_charged"]
    assert sum(r.cost_usd for r in rows) == Decimal(body["totals"]["cost_usd"])
    assert daily_usage.discrepancies(db, account_id=account.id) == []


def test_usage_grouped_by_account_across_every_account(
    admin: httpx.Client, spent: dict[str, Any]
) -> None:
    everything = [s for sent in spent["by_key"].values() for s in sent]
    body = report(admin, spent, group_by="account").json()
    [mine] = [r for r in body["data"] if r["account_id"] == spent["account"].id]
    assert metrics(mine) == summed(everything)
    assert body["columns"] == ["account_id", *METRICS, *CACHE]
    assert [r["account_id"] for r in body["data"]] == sorted(r["account_id"] for r in body["data"])


def test_usage_csv_parses_and_matches_json(admin: httpx.Client, spent: dict[str, Any]) -> None:
    params = {"group_by": "key,day", "account_id": spent["account"].id}
    as_json = report(admin, spent, **params).json()
    response = report(admin, spent, **params, format="csv")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    reader = csv.DictReader(io.StringIO(response.text))
    assert reader.fieldnames == ["day", "key_id", *METRICS, *CACHE]
    parsed = list(reader)
    assert parsed == [{k: str(v) for k, v in row.items()} for row in as_json["data"]]
    assert sum(int(r["requests"]) for r in parsed) == 5


def test_usage_requests_are_checked(admin: httpx.Client, spent: dict[str, Any]) -> None:
    for params in (
        {"group_by": "account,colour"},
        {"format": "xml"},
        {"start": "yesterday"},
        {"start": spent["end"].isoformat(), "end": spent["start"].isoformat()},
    ):
        response = admin.get("/admin/usage", params=params)
        assert response.status_code == 400, (params, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert "colour" in admin.get("/admin/usage", params={"group_by": "colour"}).text
    anonymous = httpx.get(f"{admin.base_url}/admin/usage")
    assert anonymous.status_code == 401


def test_usage_by_day_defaults_to_the_last_30_days(
    admin: httpx.Client, spent: dict[str, Any]
) -> None:
    body = admin.get(
        "/admin/usage", params={"group_by": "day", "account_id": spent["account"].id}
    ).json()
    start, end = (datetime.fromisoformat(body[k]) for k in ("start", "end"))
    assert end - start == timedelta(days=30)
    assert sum(r["requests"] for r in body["data"]) == 5


def test_top_accounts(admin: httpx.Client, spent: dict[str, Any]) -> None:
    window = {"start": spent["start"].isoformat(), "end": spent["end"].isoformat()}
    top = admin.get("/admin/top-accounts", params={**window, "limit": 1000})
    assert top.status_code == 200, top.text
    data = top.json()["data"]
    credits = [row["credits_charged"] for row in data]
    assert credits == sorted(credits, reverse=True)
    [mine] = [row for row in data if row["account_id"] == spent["account"].id]
    everything = [s for sent in spent["by_key"].values() for s in sent]
    assert mine["name"] == "usage-report"
    assert metrics(mine) == summed(everything)
    one = admin.get("/admin/top-accounts", params={**window, "limit": 1}).json()["data"]
    assert one == data[:1]
    assert admin.get("/admin/top-accounts", params={"limit": 0}).status_code == 400


def test_cli_usage_and_top(stack: Stack, spent: dict[str, Any], tmp_path: Path) -> None:
    env = {"COLUMNS": "240", "ABL_URL": stack.base_url, "ABL_ADMIN_TOKEN": stack.admin_token}
    window = ["--start", spent["start"].isoformat(), "--end", spent["end"].isoformat()]
    out = tmp_path / "usage.csv"

    def abl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "infra.cli.main", "admin", *args],
            cwd=REPO,
            env={**_base_env(), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    account_id = spent["account"].id
    done = abl("usage", *window, "--group-by", "key", "--account", account_id, "--csv", str(out))
    assert done.returncode == 0, done.stderr
    for key_id in spent["by_key"]:
        assert key_id in done.stdout
    assert "total" in done.stdout and f"wrote 2 rows to {out}" in done.stdout
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["key_id"] for r in rows) == sorted(spent["by_key"])
    assert sum(int(r["requests"]) for r in rows) == 5

    top = abl("top", *window, "--limit", "1000")
    assert top.returncode == 0, top.stderr
    assert account_id in top.stdout and "usage-report" in top.stdout
    bad = abl("usage", "--group-by", "colour")
    assert bad.returncode == 1 and "invalid_request_error" in bad.stderr


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ABL_")}


# ---- GET /v1/account ---------------------------------------------------------------------


def test_account_shows_the_callers_own_credits(
    stack: Stack, make_account: AccountFactory, admin: httpx.Client, db: Session
) -> None:
    mine, theirs = make_account(credits=1234), make_account(credits=55)
    url = f"{stack.base_url}/v1/account"
    spent = send(stack, mine.key, 5)
    body = httpx.get(url, headers={"x-api-key": mine.key}).json()
    row = db.get(Account, mine.id, populate_existing=True)
    assert row is not None
    assert body == {
        "type": "account",
        "id": mine.id,
        "name": "test",
        "credits": 1234 - int(spent["credits_charged"]),
        "reserved_credits": 0,
        "available_credits": row.credit_balance - row.reserved_credits,
        "credit_price_usd": "0.001",
        "api_key_id": body["api_key_id"],
    }
    assert body["api_key_id"].startswith("key_")
    assert admin.get(f"/admin/accounts/{mine.id}").json()["credits"] == body["credits"]

    other = httpx.get(url, headers={"Authorization": f"Bearer {theirs.key}"}).json()
    assert (other["id"], other["credits"]) == (theirs.id, 55)

    token = admin.post(f"/admin/accounts/{mine.id}/tokens", json={"ttl_seconds": 60})
    assert token.status_code == 201, token.text
    by_jwt = httpx.get(url, headers={"Authorization": f"Bearer {token.json()['token']}"}).json()
    assert (by_jwt["id"], by_jwt["credits"], by_jwt["api_key_id"]) == (
        mine.id,
        body["credits"],
        None,
    )


def test_account_needs_a_valid_key(stack: Stack) -> None:
    url = f"{stack.base_url}/v1/account"
    for headers in ({}, {"x-api-key": "ak_not-a-key"}, {"Authorization": "Bearer nope"}):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"
