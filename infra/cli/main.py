"""`abl`: run the local platform (`abl up`), migrate, build the default model, administer, bench.

Subcommands set `func` (taking the parsed arguments, returning an exit status) on their parser.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from api.settings import secret_problem
from contract.catalog import DEFAULT_MODEL_ID
from contract.settings import CoreSettings
from infra.bench.command import register_bench
from infra.bench.soak import register as register_soak
from infra.cli.admin import register_admin
from infra.cli.batch import register_batch
from infra.launcher.services import EmbeddedPostgres, read_or_create_secret
from infra.launcher.stack import Stack, StackError
from infra.launcher.supervise import signals_as_interrupt, signals_ignored, supervise

ADMIN_TOKEN_FILE = "admin_token"
JWT_SECRET_FILE = "jwt_secret"

console = Console()
err_console = Console(stderr=True)


class MigrationSettings(CoreSettings):
    """Who migrates: the owner role (ABL_* environment of `abl migrate` and `abl up`)."""

    migration_database_url: str | None = None


class UpSettings(MigrationSettings):
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


def secret_problems(settings: UpSettings, admin_token: str, jwt: dict[str, str]) -> list[str]:
    """Why the API would refuse its secrets, one line each naming the variable (and the file
    it came from): checked before anything starts, rather than restarting an API that exits."""
    given = settings.admin_token is not None and settings.admin_token.get_secret_value()
    admin_from = "" if given else f" (from {settings.data_dir / ADMIN_TOKEN_FILE})"
    jwt_from = "" if not jwt else f" (from {settings.data_dir / JWT_SECRET_FILE})"
    jwt_secret = jwt.get("ABL_JWT_SECRET") or os.environ.get("ABL_JWT_SECRET", "")
    found = [
        secret_problem(f"ABL_ADMIN_TOKEN{admin_from}", admin_token),
        secret_problem(f"ABL_JWT_SECRET{jwt_from}", jwt_secret),
    ]
    return [problem for problem in found if problem is not None]


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
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    return (
        f"curl -X POST {base_url}/v1/messages "
        '-H "Content-Type: application/json" '
        f'-H "Authorization: Bearer {api_key}" '
        f"-d '{json.dumps(body, separators=(',', ':'))}'"
    )


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


def cmd_up(args: argparse.Namespace) -> int:
    settings = UpSettings()
    admin_token, generated = admin_token_for(settings)
    jwt = jwt_env(settings)
    if problems := secret_problems(settings, admin_token, jwt):
        for problem in problems:
            print(f"abl up: {problem}", file=sys.stderr)
        return 2
    # In the foreground, before anything starts: a first start downloads and converts the
    # default model, with progress on this terminal, and an offline machine learns at once
    # what to do (the stack checks the folders again, in a second, once they are ready).
    if code := prepare_models([]):
        return code
    stack = Stack(
        settings.data_dir,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        admin_token=admin_token,
        database_url=settings.database_url,
        migration_database_url=settings.migration_database_url,
        redis_url=settings.redis_url,
        env=jwt,  # the launcher gives the API's credentials to the API only
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
    from db.migrate import migrate, upgrade

    settings = MigrationSettings()
    if settings.database_url:
        migrate(settings.database_url, settings.migration_database_url)
        console.print("migrated")
        return 0
    if settings.migration_database_url:
        upgrade(settings.migration_database_url)
        console.print("migrated")
        return 0
    postgres = EmbeddedPostgres(settings.data_dir)
    try:
        postgres.start()
        assert postgres.migration_url is not None
        upgrade(postgres.migration_url)
    finally:
        postgres.stop()
    console.print(f"migrated the embedded database in {postgres.pgdata}")
    return 0


def prepare_models(ids: list[str], *extra: str) -> int:
    """Each model's folder made ready (default: ABL_WORKER_MODELS), with progress; in a
    subprocess, so torch is imported there, never in the launcher."""
    argv = [sys.executable, "-m", "workers.models.prepare", *ids, *extra]
    return subprocess.run(argv, check=False).returncode


def cmd_build_model(args: argparse.Namespace) -> int:
    return prepare_models(args.models, *(["--force"] if args.force else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abl", description="Run and administer the platform.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    up = subparsers.add_parser("up", help="run the whole platform locally (env: ABL_*)")
    up.set_defaults(func=cmd_up)
    migrate = subparsers.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(func=cmd_migrate)
    build = subparsers.add_parser(
        "build-model", help="fetch, convert or build the served models' folders if missing"
    )
    _model_arguments(build)
    models = subparsers.add_parser("models", help="the served models' folders")
    pull = models.add_subparsers(dest="models_command", required=True).add_parser(
        "pull", help="fetch, convert or build them if missing (as build-model)"
    )
    _model_arguments(pull)
    register_bench(subparsers)
    register_soak(subparsers)
    register_admin(subparsers)
    register_batch(subparsers)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", help="catalogue ids (default: ABL_WORKER_MODELS)")
    parser.add_argument("--force", action="store_true", help="build again even if present")
    parser.set_defaults(func=cmd_build_model)


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
