"""`abl admin ...` as an operator runs it: a subprocess against the running stack."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from db.models import Account
from db.session import transaction

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ACCOUNT_ID = re.compile(r"acct_[0-9A-Za-z]+")


def _env(stack: Any, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABL_")}
    # Wide enough that no id is folded across lines in a table.
    env.update(COLUMNS="240", ABL_URL=stack.base_url, ABL_ADMIN_TOKEN=stack.admin_token)
    env.update(overrides)
    return env


def abl(stack: Any, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli.main", "admin", *args],
        cwd=REPO,
        env=_env(stack, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def abl_json(stack: Any, *args: str) -> Any:
    done = abl(stack, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_accounts_create_prints_a_table(stack: Any) -> None:
    done = abl(stack, "accounts", "create", "cli-table", "--credits", "42")
    assert done.returncode == 0, done.stderr
    assert "account created" in done.stdout
    assert "cli-table" in done.stdout
    assert re.search(r"credits\s+│\s+42\s", done.stdout)
    [account_id] = ACCOUNT_ID.findall(done.stdout)

    shown = abl(stack, "accounts", "show", account_id)
    assert shown.returncode == 0, shown.stderr
    assert account_id in shown.stdout and "cli-table" in shown.stdout
    listed = abl(stack, "accounts", "list", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    assert account_id in listed.stdout


def test_account_lifecycle_in_json(stack: Any, admin: httpx.Client) -> None:
    account = abl_json(stack, "accounts", "create", "cli-json", "--credits", "100")
    account_id = account["id"]
    assert (account["name"], account["credits"]) == ("cli-json", 100)
    assert abl_json(stack, "accounts", "show", account_id) == account
    assert abl_json(stack, "accounts", "disable", account_id)["disabled"] is True
    assert admin.get(f"/admin/accounts/{account_id}").json()["disabled"] is True
    assert abl_json(stack, "accounts", "enable", account_id)["disabled"] is False

    granted = abl_json(stack, "credits", "add", account_id, "25", "--reason", "cli grant")
    assert granted["credits"] == 125
    assert (granted["ledger_entry"]["kind"], granted["ledger_entry"]["reason"]) == (
        "grant",
        "cli grant",
    )
    adjusted = abl_json(stack, "credits", "add", account_id, "-5")
    assert (adjusted["credits"], adjusted["ledger_entry"]["kind"]) == (120, "adjustment")

    too_much = abl(stack, "credits", "add", account_id, "-1000")
    assert too_much.returncode == 1
    assert "400 invalid_request_error" in too_much.stderr and "reserved" in too_much.stderr
    assert admin.get(f"/admin/accounts/{account_id}").json()["credits"] == 120


def test_keys_and_tokens(stack: Any) -> None:
    account_id = abl_json(stack, "accounts", "create", "cli-keys", "--credits", "10")["id"]
    key = abl_json(
        stack, "keys", "create", account_id, "--name", "ci", "--rpm", "30", "--concurrency", "2"
    )
    assert key["key"].startswith("ak_")
    assert key["rate_limits"] == {"requests_per_minute": 30, "concurrent_requests": 2}

    table = abl(stack, "keys", "create", account_id, "--name", "shown-once")
    assert table.returncode == 0, table.stderr
    assert re.search(r"^key: ak_\S+$", table.stdout, re.MULTILINE)
    assert "not shown again" in table.stdout

    listed = abl(stack, "keys", "list", account_id)
    assert listed.returncode == 0, listed.stderr
    assert key["id"] in listed.stdout and key["prefix"] in listed.stdout
    assert key["key"] not in listed.stdout

    revoked = abl(stack, "keys", "revoke", key["id"])
    assert revoked.returncode == 0, revoked.stderr
    assert "key revoked" in revoked.stdout
    [row] = [k for k in abl_json(stack, "keys", "list", account_id)["data"] if k["id"] == key["id"]]
    assert row["revoked_at"] is not None

    token = abl_json(stack, "tokens", "mint", account_id, "--ttl", "60")
    assert token["account_id"] == account_id and token["token"].count(".") == 2
    bad_ttl = abl(stack, "tokens", "mint", account_id, "--ttl", "0")
    assert bad_ttl.returncode == 1 and "ttl_seconds" in bad_ttl.stderr


def test_ledger_csv_and_request(stack: Any, tmp_path: Path) -> None:
    account_id = abl_json(stack, "accounts", "create", "cli-ledger", "--credits", "1000")["id"]
    for amount in ("1", "2", "3"):
        assert abl(stack, "credits", "add", account_id, amount).returncode == 0
    key = abl_json(stack, "keys", "create", account_id)["key"]
    body = {
        "model": "abl-tiny",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}],
    }
    message = httpx.post(
        f"{stack.base_url}/v1/messages", json=body, headers={"x-api-key": key}, timeout=120
    )
    assert message.status_code == 200, message.text
    request_id = message.headers["request-id"]

    out = tmp_path / "ledger.csv"
    done = abl(stack, "ledger", account_id, "--all", "--csv", str(out))
    assert done.returncode == 0, done.stderr
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["kind"] == "grant" and rows[-1]["amount"] == "1000"
    assert [r["amount"] for r in rows[-4:]] == ["3", "2", "1", "1000"]
    assert {r["request_id"] for r in rows[:-4]} == {request_id}
    assert (
        sum(
            int(r["amount"])
            for r in rows
            if r["kind"] in ("grant", "charge", "refund", "adjustment")
        )
        == (abl_json(stack, "accounts", "show", account_id)["credits"])
    )
    assert len(abl_json(stack, "ledger", account_id, "--limit", "2")) == 2

    record = abl(stack, "request", request_id)
    assert record.returncode == 0, record.stderr
    assert request_id in record.stdout and "reserve" in record.stdout
    assert abl_json(stack, "request", request_id)["account_id"] == account_id
    missing = abl(stack, "request", "req_missing")
    assert missing.returncode == 1 and "404 not_found_error" in missing.stderr


def test_reconcile_exit_code_follows_the_books(stack: Any) -> None:
    done = abl(stack, "reconcile")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok:")

    account_id = abl_json(stack, "accounts", "create", "cli-reconcile", "--credits", "5")["id"]
    assert stack.database_url is not None
    # Break the books behind the ledger's back, and put them right whatever happens.
    _shift_balance(stack.database_url, account_id, 1)
    try:
        broken = abl(stack, "reconcile")
        assert broken.returncode == 1
        assert account_id in broken.stdout
        report = abl(stack, "reconcile", "--json")
        assert report.returncode == 1
        [bad] = [
            d for d in json.loads(report.stdout)["discrepancies"] if d["account_id"] == account_id
        ]
        assert (bad["balance"], bad["ledger_balance"]) == (6, 5)
    finally:
        _shift_balance(stack.database_url, account_id, -1)
    assert abl(stack, "reconcile").returncode == 0


def _shift_balance(database_url: str, account_id: str, delta: int) -> None:
    with transaction(database_url) as session:
        session.execute(
            update(Account)
            .where(Account.id == account_id)
            .values(credit_balance=Account.credit_balance + delta)
        )


def test_credentials_and_connection_errors(stack: Any, tmp_path: Path) -> None:
    wrong = abl(stack, "accounts", "list", ABL_ADMIN_TOKEN="not-the-token")
    assert wrong.returncode == 1 and "401 authentication_error" in wrong.stderr

    empty = tmp_path / "empty"
    missing = abl(stack, "accounts", "list", ABL_ADMIN_TOKEN="", ABL_DATA_DIR=str(empty))
    assert missing.returncode == 2 and "no admin token" in missing.stderr

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "admin_token").write_text(stack.admin_token + "\n")
    from_file = abl(stack, "accounts", "list", ABL_ADMIN_TOKEN="", ABL_DATA_DIR=str(data_dir))
    assert from_file.returncode == 0, from_file.stderr

    host, port = stack.base_url.removeprefix("http://").rsplit(":", 1)
    by_host = abl(stack, "reconcile", ABL_URL="", ABL_HOST=host, ABL_PORT=port)
    assert by_host.returncode == 0, by_host.stderr

    unreachable = abl(stack, "reconcile", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
