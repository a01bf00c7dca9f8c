"""The ledger is append-only by privilege and by trigger, and reconcile finds what was changed.

The application connects as `abl_app`, which owns nothing (stack.database_url); the owner role
(owner_url) migrates. Tests that tamper as the owner put everything back before they end.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import errors

from db.migrate import upgrade
from db.roles import libpq_dsn
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory

pytestmark = pytest.mark.integration

BODY = {
    "model": "abl-tiny",
    "max_tokens": 4,
    "messages": [{"role": "user", "content": "Hi"}],
}


@contextmanager
def connect(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_dsn(url)) as conn:
        yield conn


def _grant_row(url: str, account_id: str) -> int:
    with connect(url) as conn:
        row = conn.execute(
            "SELECT id FROM ledger_entry WHERE account_id = %s AND kind = 'grant'", [account_id]
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entry SET amount = amount + 1000 WHERE id = %s",
        "DELETE FROM ledger_entry WHERE id = %s",
    ],
)
def test_the_application_role_cannot_change_ledger_rows(
    stack: Stack, make_account: AccountFactory, statement: str
) -> None:
    assert stack.database_url is not None
    account = make_account(credits=100)
    entry = _grant_row(stack.database_url, account.id)
    with connect(stack.database_url) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement, [entry])


def test_the_application_role_owns_nothing(stack: Stack) -> None:
    assert stack.database_url is not None
    with connect(stack.database_url) as conn:
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert superuser.fetchone() == (False,)
        owned = conn.execute(
            "SELECT count(*) FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND pg_has_role(c.relowner, 'MEMBER')"
        )
        assert owned.fetchone() == (0,)
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("TRUNCATE ledger_entry")


def test_the_trigger_refuses_the_owner_too(
    stack: Stack, owner_url: str, make_account: AccountFactory
) -> None:
    account = make_account(credits=100)
    entry = _grant_row(owner_url, account.id)
    for statement in (
        "UPDATE ledger_entry SET amount = amount + 1000 WHERE id = %s",
        "DELETE FROM ledger_entry WHERE id = %s",
    ):
        refused = pytest.raises(errors.RestrictViolation, match="append-only")
        with connect(owner_url) as conn, refused:
            conn.execute(statement, [entry])


def test_the_owner_may_still_truncate(scratch_database: str) -> None:
    upgrade(scratch_database)
    with connect(scratch_database) as conn:
        conn.execute(
            "INSERT INTO account (id, name, credit_balance, reserved_credits, disabled)"
            " VALUES ('acct_t', 't', 5, 0, false)"
        )
        conn.execute(
            "INSERT INTO ledger_entry (account_id, kind, amount, balance_after, reserved_after)"
            " VALUES ('acct_t', 'grant', 5, 5, 0)"
        )
        conn.commit()
        conn.execute("TRUNCATE ledger_entry, account CASCADE")
        assert conn.execute("SELECT count(*) FROM ledger_entry").fetchone() == (0,)


@contextmanager
def tampered(url: str, statements: list[tuple[str, list[Any]]], undo: list[tuple[str, list[Any]]]):
    """Run `statements` as the owner with the append-only trigger off (inside the transaction
    only), then, on the way out, `undo` the same way."""

    def run(batch: list[tuple[str, list[Any]]]) -> None:
        with connect(url) as conn:
            conn.execute("ALTER TABLE ledger_entry DISABLE TRIGGER ledger_entry_append_only")
            for statement, params in batch:
                conn.execute(statement, params)
            conn.execute("ALTER TABLE ledger_entry ENABLE TRIGGER ledger_entry_append_only")

    run(statements)
    try:
        yield
    finally:
        run(undo)


def test_reconcile_reports_an_amount_changed_with_its_balance(
    owner_url: str, admin: httpx.Client, make_account: AccountFactory
) -> None:
    """The issue's tampering: a grant made 1000 larger and the balance with it. The sums still
    agree; the grant's balance_after no longer follows from its amount."""
    account = make_account(credits=100)
    entry = _grant_row(owner_url, account.id)
    bump = "UPDATE ledger_entry SET amount = amount + %s WHERE id = %s"
    balance = "UPDATE account SET credit_balance = credit_balance + %s WHERE id = %s"
    with tampered(
        owner_url,
        [(bump, [1000, entry]), (balance, [1000, account.id])],
        [(bump, [-1000, entry]), (balance, [-1000, account.id])],
    ):
        report = admin.get("/admin/reconcile").json()
        assert not report["ok"]
        assert account.id not in {d["account_id"] for d in report["discrepancies"]}
        (broken,) = [b for b in report["chain_breaks"] if b["account_id"] == account.id]
        assert broken == {
            "account_id": account.id,
            "entry_id": entry,
            "kind": "grant",
            "amount": 1100,
            "balance_after": 100,
            "expected_balance_after": 1100,
            "reserved_after": 0,
            "expected_reserved_after": 0,
        }
    assert admin.get("/admin/reconcile").json()["ok"]


def test_reconcile_checks_each_request_and_the_daily_rollup(
    stack: Stack, admin: httpx.Client, make_account: AccountFactory
) -> None:
    """The application's role may update requests and the rollup; a charge that no longer
    matches its ledger row, or a day that no longer matches its requests, is reported."""
    assert stack.database_url is not None
    account = make_account(credits=1000)
    answer = httpx.post(
        f"{stack.base_url}/v1/messages", json=BODY, headers={"x-api-key": account.key}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["request-id"]
    change = "UPDATE request SET credits_charged = credits_charged + %s WHERE id = %s"
    with connect(stack.database_url) as conn:
        conn.execute(change, [-1, request_id])
    try:
        report = admin.get("/admin/reconcile").json()
        (mismatch,) = [m for m in report["request_mismatches"] if m["request_id"] == request_id]
        assert mismatch["charge_amount"] == -(mismatch["credits_charged"] + 1)
        assert mismatch["release_amount"] == -mismatch["credits_reserved"]
        days = [u for u in report["usage_mismatches"] if u["account_id"] == account.id]
        assert {u["source"] for u in days} == {"requests", "rollup"}
        assert not report["ok"]
    finally:
        with connect(stack.database_url) as conn:
            conn.execute(change, [1, request_id])
    assert admin.get("/admin/reconcile").json()["ok"]
