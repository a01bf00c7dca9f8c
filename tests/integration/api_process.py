"""One more API process beside the stack's: same Postgres and Redis, its own port and settings."""

import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from infra.launcher.services import free_port
from infra.launcher.stack import Stack, api_argv


@contextmanager
def api_process(
    stack: Stack, log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Start `uvicorn --factory api.main:create_app` with the stack's env plus `env`; its URL."""
    port = free_port("127.0.0.1")
    full_env = {**stack.env_for_api(), "ABL_PORT": str(port), **(env or {})}
    argv = api_argv("127.0.0.1", port)
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, base_url, log_path)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_healthy(proc: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"API process exited ({proc.returncode}):\n{log_path.read_text()}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"API process not healthy after 60 s:\n{log_path.read_text()}")
