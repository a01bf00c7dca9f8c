"""Secrets at the process boundary: `abl up` refuses weak ones before starting anything, and
only the API process holds the admin token and the JWT secret."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.launcher.stack import Stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STRONG = "s" * 40


def abl_up(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ABL_")}
    return subprocess.run(
        [sys.executable, "-m", "infra.cli.main", "up"],
        cwd=REPO,
        env={**base, "ABL_DATA_DIR": str(data_dir), "ABL_PORT": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "file", "named"),
    [
        ({"ABL_ADMIN_TOKEN": "REPLACE_ME_admin_token"}, None, "ABL_ADMIN_TOKEN still holds"),
        ({"ABL_ADMIN_TOKEN": "a" * 31}, None, "ABL_ADMIN_TOKEN is 31 characters long"),
        ({"ABL_ADMIN_TOKEN": STRONG, "ABL_JWT_SECRET": "x"}, None, "ABL_JWT_SECRET is 1 "),
        ({}, ("admin_token", "changeme"), "ABL_ADMIN_TOKEN (from "),
    ],
)
def test_abl_up_refuses_weak_secrets_before_starting_anything(
    tmp_path: Path, env: dict[str, str], file: tuple[str, str] | None, named: str
) -> None:
    if file is not None:
        (tmp_path / file[0]).write_text(file[1] + "\n")
    done = abl_up(tmp_path, **env)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"abl up: {named}"), line
    assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in line
    # Nothing started: no database, no logs.
    assert not (tmp_path / "postgres").exists() and not (tmp_path / "logs").exists()


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_only_the_api_holds_the_admin_token_and_the_jwt_secret(stack: Stack) -> None:
    assert stack.api is not None and stack.api.pid is not None
    api = environ(stack.api.pid)
    assert api["ABL_ADMIN_TOKEN"] == stack.admin_token and api["ABL_JWT_SECRET"]
    for worker in stack.workers:
        assert worker.pid is not None
        seen = environ(worker.pid)
        assert "ABL_DATABASE_URL" in seen
        assert "ABL_ADMIN_TOKEN" not in seen and "ABL_JWT_SECRET" not in seen
