"""`abl`: run the local platform (`abl up`), migrate, build the default model, administer.

Subcommands set `func` (taking the parsed arguments, returning an exit status) on their parser;
`infra.admin_cli.register_admin(subparsers)`, when that module exists, adds `abl admin ...`.
"""

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from db.settings import CoreSettings
from infra.bench.command import register_bench
from infra.services import EmbeddedPostgres, read_or_create_secret
from infra.stack import Stack, StackError
from workers.catalog import DEFAULT_MODEL_ID

ADMIN_TOKEN_FILE = "admin_token"
JWT_SECRET_FILE = "jwt_secret"

console = Console()
err_console = Console(stderr=True)


class UpSettings(CoreSettings):
    """The operator contract of `make up` (ABL_* environment)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    admin_token: SecretStr | None = None
    workers: int = Field(default=1, ge=1)


def admin_token_for(settings: UpSettings) -> tuple[str, bool]:
    """ABL_ADMIN_TOKEN, else the one kept under the data dir, else a new one (then True)."""
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        return settings.admin_token.get_secret_value(), False
    path = settings.data_dir / ADMIN_TOKEN_FILE
    generated = not path.exists()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return read_or_create_secret(path, nbytes=32), generated


def jwt_env(settings: UpSettings) -> dict[str, str]:
    """ABL_JWT_SECRET for the API: the operator's, else one kept under the data dir."""
    if os.environ.get("ABL_JWT_SECRET"):
        return {}
    return {"ABL_JWT_SECRET": read_or_create_secret(settings.data_dir / JWT_SECRET_FILE, 32)}


def hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def curl_example(base_url: str, api_key: str) -> str:
    """The seed's example request, ready to paste."""
    body = {
        "model": DEFAULT_MODEL_ID,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello, world!"}],
    }
    return (
        f"curl -X POST {base_url}/v1/messages "
        '-H "Content-Type: application/json" '
        f'-H "Authorization: Bearer {api_key}" '
        f"-d '{json.dumps(body, separators=(',', ':'))}'"
    )


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGINT (even if inherited as ignored), SIGTERM and SIGHUP raise KeyboardInterrupt inside."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, interrupt) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Let a clean stop finish even if the operator presses Ctrl-C again."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def print_summary(stack: Stack, admin_token: str, generated: bool) -> None:
    table = Table(title="abl: the platform is ready", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("API", stack.base_url)
    table.add_row("Workers", str(len(stack.workers)))
    table.add_row("Database", hide_password(stack.database_url or ""))
    table.add_row("Redis", hide_password(stack.redis_url or ""))
    table.add_row("Data", str(stack.data_dir))
    table.add_row("Logs", str(stack.log_dir))
    table.add_row("Started in", ", ".join(f"{k} {v:.2f}s" for k, v in stack.timings.items()))
    console.print(table)
    # Plain prints from here: no wrapping or markup, so each line pastes as it is.
    note = f"  (generated, kept in {stack.data_dir / ADMIN_TOKEN_FILE})" if generated else ""
    print(f"Admin token: {admin_token}{note}")
    if stack.demo_api_key:
        print("Try it with the demo account's key:")
        print(curl_example(stack.base_url, stack.demo_api_key))
    print("Ctrl-C stops everything.", flush=True)


# A worker that exits (its engine process died, or it was killed) is started again after this
# long; its requests have already failed or will be settled by the sweeper.
WORKER_RESTART_DELAY_S = 5.0


def supervise(stack: Stack) -> int:
    """Wait until interrupted; a dead API ends the run, a dead worker is reported and restarted."""
    died_at: dict[int, float] = {}
    while True:
        time.sleep(1.0)
        if stack.api is not None and not stack.api.alive:
            err_console.print(f"[red]the API exited ({stack.api.returncode})[/red]")
            err_console.print(stack.api.tail(), markup=False, highlight=False)
            return 1
        for i, worker in enumerate(stack.workers):
            if worker.alive:
                continue
            if i not in died_at:
                died_at[i] = time.monotonic()
                err_console.print(
                    f"[yellow]{worker.name} exited ({worker.returncode}); restarting it in"
                    f" {WORKER_RESTART_DELAY_S:.0f} s[/yellow]"
                )
                err_console.print(worker.tail(20), markup=False, highlight=False)
            elif time.monotonic() - died_at[i] >= WORKER_RESTART_DELAY_S:
                del died_at[i]
                stack.start_worker(i)


def cmd_up(args: argparse.Namespace) -> int:
    settings = UpSettings()
    admin_token, generated = admin_token_for(settings)
    stack = Stack(
        settings.data_dir,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        admin_token=admin_token,
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        env=jwt_env(settings),
    )
    try:
        with signals_as_interrupt():
            with console.status("starting Postgres, Redis, the API and the workers..."):
                stack.start()
            print_summary(stack, admin_token, generated)
            return supervise(stack)
    except StackError as exc:
        err_console.print("[red]abl up failed:[/red]")
        err_console.print(str(exc), markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("stopping...")
        return 0
    finally:
        with signals_ignored():
            stack.stop()


def cmd_migrate(args: argparse.Namespace) -> int:
    from db.migrate import upgrade

    settings = CoreSettings()
    if settings.database_url:
        upgrade(settings.database_url)
        console.print("migrated")
        return 0
    postgres = EmbeddedPostgres(settings.data_dir)
    try:
        upgrade(postgres.start())
    finally:
        postgres.stop()
    console.print(f"migrated the embedded database in {postgres.pgdata}")
    return 0


def cmd_build_model(args: argparse.Namespace) -> int:
    # A subprocess: torch is imported there, never in the launcher.
    argv = [sys.executable, "-m", "workers.model_build"]
    argv += [str(args.dest)] if args.dest else []
    argv += ["--force"] if args.force else []
    return subprocess.run(argv, check=False).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abl", description="Run and administer the platform.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    up = subparsers.add_parser("up", help="run the whole platform locally (env: ABL_*)")
    up.set_defaults(func=cmd_up)
    migrate = subparsers.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(func=cmd_migrate)
    build = subparsers.add_parser("build-model", help="build the default model if missing")
    build.add_argument("dest", nargs="?", type=Path, help="target folder")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(func=cmd_build_model)
    register_bench(subparsers)
    from infra import soak

    soak.register(subparsers)
    register_admin = _admin_hook()
    if register_admin is not None:
        register_admin(subparsers)
    return parser


def _admin_hook() -> Callable[[Any], None] | None:
    """`register_admin` from infra.admin_cli, when that module exists."""
    try:
        module = importlib.import_module("infra.admin_cli")
    except ModuleNotFoundError as exc:
        if exc.name != "infra.admin_cli":
            raise
        return None
    register: Callable[[Any], None] = module.register_admin
    return register


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `abl` console script."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=err_console)]
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
