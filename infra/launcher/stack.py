"""The whole local platform as child processes: embedded services, migrations, API, workers.

Used by `abl up` and by the test suite's fixtures. Every child gets a parent-death signal and its
own session, so Ctrl-C reaches only the launcher, which then stops the children in order.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from contract.catalog import TEST_MODEL_ID, load_catalog
from infra.launcher.services import (
    LOOPBACK,
    EmbeddedPostgres,
    EmbeddedRedis,
    die_with_parent,
    free_port,
    log_tail,
)
from workers.settings import WorkerSettings

API_NAME = "api"
# The API's credentials: only the API process gets them, never a worker or the model build,
# even when the launcher itself inherited them (docs/security.md).
API_ONLY_ENV = ("ABL_ADMIN_TOKEN", "ABL_JWT_SECRET")


def api_argv(host: str, port: int) -> list[str]:
    """The command that runs one API process."""
    factory = "api.main:create_app"
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        host,
        "--port",
        str(port),
    ]


class StackError(RuntimeError):
    """The stack could not start; the message carries the tail of the children's logs."""


@dataclass
class ChildProcess:
    """One supervised child: its command, environment and log file (appended across restarts)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.alive:
            raise StackError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def send_signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if still running after `timeout` seconds."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.log_path} (last {lines} lines) ---\n{log_tail(self.log_path, lines)}"


def stop_children(children: list[ChildProcess], timeout: float) -> None:
    """SIGTERM them all, wait up to `timeout` in total, then SIGKILL whatever is left."""
    for child in children:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        child.wait(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.alive:
            child.send_signal(signal.SIGKILL)
            child.wait(10)


def _without_api_credentials(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in API_ONLY_ENV}


def _workers_counted(response: httpx.Response) -> int:
    """Workers the `/readyz` answer counts (`checks.workers.count`); a 200 without it counts all."""
    try:
        return int(response.json()["checks"]["workers"]["count"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize


class Stack:
    """Embedded (or given) Postgres and Redis, migrations, one API process and N workers."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int = 1,
        admin_token: str | None = None,
        database_url: str | None = None,
        migration_database_url: str | None = None,
        redis_url: str | None = None,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        ready_timeout: float = 180.0,
        stop_timeout: float = 20.0,
        listen_host: str = LOOPBACK,
        clients: str | None = None,
        worker_prefix: Callable[[int], Sequence[str]] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        # 0 picks a free port at start().
        self.port = port
        self.worker_count = workers
        self.admin_token = admin_token or secrets.token_urlsafe(32)
        # The application's (restricted) role, and the owner role that migrates (None with a
        # given database_url: migrations then run as database_url's role, with a warning).
        self.database_url = database_url
        self.migration_database_url = migration_database_url
        self.redis_url = redis_url
        self.extra_env = dict(env or {})
        self.log_dir = Path(log_dir).resolve() if log_dir else self.data_dir / "logs"
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.demo_api_key: str | None = None
        # Seconds each start phase took, for `abl up` and the benchmarks.
        self.timings: dict[str, float] = {}
        self.api: ChildProcess | None = None
        self.workers: list[ChildProcess] = []
        # Embedded services run where no URL was given (again on a restart after stop()).
        # `listen_host`/`clients`: where they listen and who else may log in (other hosts).
        self._postgres = EmbeddedPostgres(
            self.data_dir, log_dir=self.log_dir, listen_host=listen_host, clients=clients
        )
        self._redis = EmbeddedRedis(
            self.data_dir, log_dir=self.log_dir, listen_host=listen_host, clients=clients
        )
        # The command that runs worker i's process in its place (`ip netns exec NS`, ssh...).
        self.worker_prefix = worker_prefix
        self._embedded_db = database_url is None
        self._embedded_redis = redis_url is None
        self._build: ChildProcess | None = None
        self._build_started = 0.0

    @property
    def base_url(self) -> str:
        """Where clients reach the API (loopback when it binds every interface)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else host
        return f"http://{host}:{self.port}"

    @property
    def postgres_service(self) -> EmbeddedPostgres | None:
        """The embedded Postgres this stack started (None when given a URL); for fault tests."""
        return self._postgres

    @property
    def redis_service(self) -> EmbeddedRedis | None:
        """The embedded Redis this stack started (None when given a URL); for fault tests."""
        return self._redis

    def model_path(self, model_id: str = TEST_MODEL_ID) -> Path:
        """A served model's folder (the test model's by default)."""
        spec = load_catalog(self._models_file()).get(model_id)
        if spec is None:
            raise KeyError(f"model {model_id!r} is not in the catalogue")
        return spec.path(self.data_dir / "models")

    @property
    def model_dir(self) -> Path:
        """The test model's folder."""
        return self.model_path(TEST_MODEL_ID)

    def _models_file(self) -> Path | None:
        named = self.extra_env.get("ABL_MODELS_FILE") or os.environ.get("ABL_MODELS_FILE")
        return Path(named) if named else None

    def start(self) -> Self:
        """Start everything and return once `/readyz` answers 200; on failure stop what started."""
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_model_build()
            self._start_services()
            self._timed("migrate", self._migrate)
            self._finish_model_build()
            if self.port == 0:
                self.port = free_port(self.host if self.host not in ("", "::") else "127.0.0.1")
            self.api = ChildProcess(
                API_NAME, self._api_argv(), self.env_for_api(), self.log_dir / f"{API_NAME}.log"
            )
            self.api.start()
            for i in range(self.worker_count):
                self.start_worker(i)
            self._timed("ready", lambda: self.wait_ready(min_workers=self.worker_count))
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop the API and workers (SIGTERM, wait, SIGKILL), then the embedded services."""
        children = [c for c in [self._build, self.api, *self.workers] if c is not None]
        stop_children(children, self.stop_timeout)
        self._redis.stop()
        self._postgres.stop()

    def wait_ready(self, timeout: float | None = None, min_workers: int = 1) -> None:
        """Poll `/readyz` until 200 with at least `min_workers` workers counted in its answer.

        Fails early when the API or every worker has exited.
        """
        timeout = timeout if timeout is not None else self.ready_timeout
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                self._check_children_alive()
                try:
                    response = client.get(f"{self.base_url}/readyz")
                    last = f"{response.status_code} {response.text[:500]}"
                    if response.status_code == 200 and _workers_counted(response) >= min_workers:
                        return
                except httpx.HTTPError as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    raise StackError(f"not ready after {timeout:.0f}s ({last})" + self._tails())
                time.sleep(0.2)

    def start_worker(self, i: int) -> ChildProcess:
        """Start worker `i` (again, after kill_worker; `i == len(workers)` adds one)."""
        if i > len(self.workers):
            raise IndexError(f"worker {i} would leave a gap (have {len(self.workers)})")
        if i == len(self.workers):
            name = f"worker-{i}"
            prefix = list(self.worker_prefix(i)) if self.worker_prefix else []
            argv = [*prefix, sys.executable, "-m", "workers"]
            self.workers.append(self._child(name, argv, self._worker_env(name)))
        self.workers[i].start()
        return self.workers[i]

    def _worker_env(self, name: str) -> dict[str, str]:
        """Its name, and a metrics port of its own unless the extra env fixes one."""
        env = {"ABL_WORKER_NAME": name}
        if "ABL_METRICS_PORT" not in self.extra_env:
            host = self.extra_env.get("ABL_METRICS_HOST", LOOPBACK)
            env |= {"ABL_METRICS_HOST": host, "ABL_METRICS_PORT": str(free_port(host))}
        return env

    def kill_worker(
        self, i: int, sig: int = signal.SIGKILL, timeout: float | None = 30.0
    ) -> int | None:
        """Signal worker `i`, wait up to `timeout` (None: no wait); its exit status if it exited."""
        worker = self.workers[i]
        worker.send_signal(sig)
        return worker.wait(timeout) if timeout is not None else worker.returncode

    def env_for_api(self) -> dict[str, str]:
        """The API's environment: ours, the ABL_* of this stack, the extras, the admin token."""
        assert self.database_url is not None and self.redis_url is not None
        env = dict(os.environ)
        env.update(
            {
                "ABL_DATA_DIR": str(self.data_dir),
                "ABL_DATABASE_URL": self.database_url,
                "ABL_REDIS_URL": self.redis_url,
                "ABL_HOST": self.host,
                "ABL_PORT": str(self.port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        env["ABL_ADMIN_TOKEN"] = self.admin_token
        # Ready once the models the workers serve are served (not every catalogue model).
        if not env.get("ABL_READY_MODELS"):
            served = WorkerSettings.model_fields["worker_models"].default
            env["ABL_READY_MODELS"] = env.get("ABL_WORKER_MODELS") or served
        return env

    def env_for_children(self) -> dict[str, str]:
        """The environment of every other child: the API's without its credentials."""
        return _without_api_credentials(self.env_for_api())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _timed(self, phase: str, fn: Callable[[], object]) -> None:
        t0 = time.monotonic()
        fn()
        self.timings[phase] = time.monotonic() - t0

    def _start_services(self) -> None:
        if self._embedded_db:
            self.database_url = self._postgres.start()
            self.migration_database_url = self._postgres.migration_url
            self.timings["postgres"] = self._postgres.start_seconds or 0.0
        if self._embedded_redis:
            self.redis_url = self._redis.start()
            self.timings["redis"] = self._redis.start_seconds or 0.0

    def _migrate(self) -> None:
        from db.bootstrap import ensure_demo_account
        from db.migrate import migrate

        assert self.database_url is not None
        migrate(self.database_url, self.migration_database_url)
        self.demo_api_key = ensure_demo_account(self.database_url, self.data_dir)

    def _start_model_build(self) -> None:
        """Make the folders of the models the workers serve, in the background, while the
        services start (torch lives in that subprocess only); checks and nothing more when
        they are ready."""
        env = {**os.environ, "ABL_DATA_DIR": str(self.data_dir), **self.extra_env}
        env = _without_api_credentials(env)
        argv = [sys.executable, "-m", "workers.models.prepare"]
        self._build = ChildProcess("model_build", argv, env, self.log_dir / "model_build.log")
        self._build.start()
        self._build_started = time.monotonic()

    def _finish_model_build(self) -> None:
        if self._build is None:
            return
        code = self._build.wait(1800)
        if code != 0:
            raise StackError(f"preparing the models failed ({code})\n{self._build.tail(12)}")
        self._build = None
        self.timings["model_build"] = time.monotonic() - self._build_started

    def _api_argv(self) -> list[str]:
        return api_argv(self.host, self.port)

    def _child(self, name: str, argv: list[str], env: Mapping[str, str]) -> ChildProcess:
        full_env = {**self.env_for_children(), **env}
        return ChildProcess(name, argv, full_env, self.log_dir / f"{name}.log")

    def _check_children_alive(self) -> None:
        if self.api is not None and not self.api.alive:
            raise StackError(f"the API exited with status {self.api.returncode}" + self._tails())
        if self.workers and not any(w.alive for w in self.workers):
            codes = [w.returncode for w in self.workers]
            raise StackError(f"every worker exited (statuses {codes})" + self._tails())

    def _tails(self, lines: int = 40) -> str:
        children = [c for c in [self.api, *self.workers] if c is not None]
        return "".join(f"\n{c.tail(lines)}" for c in children)
