"""Shared fixtures: one real stack (Postgres, Redis, API, a Celery worker, the test model
abl-tiny) per test session, started from scratch in a temporary directory.

Embedded Postgres and Redis are started unless ABL_TEST_DATABASE_URL / ABL_TEST_REDIS_URL
name servers to use instead (ABL_TEST_MIGRATION_DATABASE_URL: the owner role, else the
application's role migrates).
"""

import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from db.session import get_sessionmaker
from infra.launcher.stack import Stack
from tests.support import STACK_MODEL


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("abl-stack")
    env = {
        # The test model alone: fast on 2 cores, built offline (tests/model asks SmolLM2).
        "ABL_WORKER_MODELS": STACK_MODEL,
        "ABL_JWT_SECRET": secrets.token_urlsafe(32),
        "ABL_REQUEST_TIMEOUT_S": "120",
        # A second, named admin token (the stack's ABL_ADMIN_TOKEN is "admin").
        "ABL_ADMIN_TOKENS": f"ops={secrets.token_urlsafe(32)}",
        # Many tests send wrong admin tokens on purpose, all from 127.0.0.1: the throttle is
        # tested on an API process of its own (tests/integration/test_admin_security.py).
        "ABL_ADMIN_AUTH_MAX_FAILURES": "100000",
    }
    running = Stack(
        data_dir,
        workers=1,
        database_url=os.environ.get("ABL_TEST_DATABASE_URL"),
        migration_database_url=os.environ.get("ABL_TEST_MIGRATION_DATABASE_URL"),
        redis_url=os.environ.get("ABL_TEST_REDIS_URL"),
        env=env,
    )
    with running:  # starts it, and stops every child on the way out
        yield running


@pytest.fixture(scope="session")
def admin(stack: Stack) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {stack.admin_token}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def ops_admin(stack: Stack) -> Iterator[httpx.Client]:
    """The admin API with the named token `ops` instead of ABL_ADMIN_TOKEN."""
    token = stack.extra_env["ABL_ADMIN_TOKENS"].removeprefix("ops=")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:
        yield client


@dataclass(frozen=True)
class ApiAccount:
    id: str
    key: str


AccountFactory = Callable[..., ApiAccount]


@pytest.fixture(scope="session")
def make_account(admin: httpx.Client) -> AccountFactory:
    """A new account with `credits` and one API key."""

    def make(credits: int = 10_000, name: str = "test", **key_fields: object) -> ApiAccount:
        created = admin.post("/admin/accounts", json={"name": name, "credits": credits})
        assert created.status_code == 201, created.text
        account_id = created.json()["id"]
        key = admin.post(f"/admin/accounts/{account_id}/keys", json=key_fields)
        assert key.status_code == 201, key.text
        return ApiAccount(account_id, key.json()["key"])

    return make


@pytest.fixture
def account(make_account: AccountFactory) -> ApiAccount:
    return make_account()


@pytest.fixture
def client(stack: Stack, account: ApiAccount) -> anthropic.Anthropic:
    """The official SDK pointed at the stack; no retries so errors surface at once."""
    return anthropic.Anthropic(base_url=stack.base_url, api_key=account.key, max_retries=0)


@pytest.fixture
def http(stack: Stack, account: ApiAccount) -> Iterator[httpx.Client]:
    """Plain HTTP with the account's key as x-api-key."""
    with httpx.Client(
        base_url=stack.base_url, headers={"x-api-key": account.key}, timeout=120
    ) as client:
        yield client


@pytest.fixture
def db(stack: Stack) -> Iterator[Session]:
    """A session as the application's role."""
    assert stack.database_url is not None
    with get_sessionmaker(stack.database_url)() as session:
        yield session


@pytest.fixture(scope="session")
def owner_url(stack: Stack) -> str:
    """The URL of the role that owns the schema (migrations, tests that tamper with data)."""
    url = stack.migration_database_url or stack.database_url
    assert url is not None
    return url


@pytest.fixture
def scratch_database(owner_url: str) -> Iterator[str]:
    """An empty database on the stack's server, owned by the owner role; dropped afterwards."""
    url = make_url(owner_url)
    name = f"abl_scratch_{uuid.uuid4().hex[:8]}"
    admin_dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield url.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
