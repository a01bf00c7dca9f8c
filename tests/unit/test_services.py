"""Embedded PostgreSQL and Redis: real servers, started and stopped in about a second."""

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from infra.launcher.services import (
    EmbeddedPostgres,
    EmbeddedRedis,
    _leftover_pids,
    free_port,
    pid_alive,
)


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A live process that is not ours to stop: a recycled pid in a stale pid file."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_postgres_serves_the_abl_database_and_keeps_data_across_restarts(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    assert url.startswith("postgresql+psycopg://abl_app:")
    assert url.endswith(f"@127.0.0.1:{pg.port}/abl")
    assert pg.migration_url is not None
    owner = pg.migration_url
    assert owner.startswith("postgresql+psycopg://abl_owner:")
    with psycopg.connect(libpq_url(owner)) as conn:
        conn.execute("CREATE TABLE kept (value text)")
        conn.execute("INSERT INTO kept VALUES ('before restart')")
    pid = pg.pid
    assert pid is not None
    pg.stop()
    assert not pid_alive(pid)
    assert _leftover_pids(pg.pgdata, "postgres") == []

    again = EmbeddedPostgres(data_dir)
    again.start()
    assert again.migration_url == owner  # the passwords are kept in the data dir
    with psycopg.connect(libpq_url(again.migration_url or "")) as conn:
        assert conn.execute("SELECT value FROM kept").fetchall() == [("before restart",)]
    again.stop()
    assert _leftover_pids(pg.pgdata, "postgres") == []


def test_the_application_role_owns_nothing_and_creates_nothing(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    app = libpq_url(pg.start())
    try:
        with psycopg.connect(app) as conn:
            row = conn.execute(
                "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles"
                " WHERE rolname = current_user"
            ).fetchone()
            assert row == (False, False, False)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE mine (value text)")
    finally:
        pg.stop()


def test_tables_the_superuser_created_are_handed_to_the_owner(data_dir: Path) -> None:
    """A data dir from before the owner role: its tables move to the owner on start."""
    pg = EmbeddedPostgres(data_dir)
    pg.start()
    password = (data_dir / "postgres.password").read_text().strip()
    superuser = f"host=127.0.0.1 port={pg.port} user=postgres dbname=abl password={password}"
    with psycopg.connect(superuser) as conn:
        conn.execute("CREATE TABLE old_table (id bigserial PRIMARY KEY)")
    pg.stop()
    pg.start()
    try:
        with psycopg.connect(superuser) as conn:
            owners = conn.execute(
                "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class AS c"
                " WHERE c.relname IN ('old_table', 'old_table_id_seq') ORDER BY 1"
            ).fetchall()
        assert owners == [("old_table", "abl_owner"), ("old_table_id_seq", "abl_owner")]
    finally:
        pg.stop()


def test_postgres_requires_its_password(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    pg.start()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"host=127.0.0.1 port={pg.port} user=postgres dbname=abl password=x")
    finally:
        pg.stop()


def test_postgres_starts_after_a_crash_with_a_recycled_pid(data_dir: Path, sleeper: int) -> None:
    pg = EmbeddedPostgres(data_dir)
    pg.start()
    with psycopg.connect(libpq_url(pg.migration_url or "")) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (1)")
    assert pg.pid is not None
    os.kill(pg.pid, signal.SIGKILL)
    pg.stop()
    pid_file = pg.pgdata / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    # PostgreSQL itself refuses to start when the pid in its lock file belongs to a live process.
    pid_file.write_text("\n".join([str(sleeper), *lines[1:]]) + "\n")

    again = EmbeddedPostgres(data_dir)
    again.start()
    with psycopg.connect(libpq_url(again.migration_url or "")) as conn:
        assert conn.execute("SELECT n FROM kept").fetchall() == [(1,)]
    again.stop()
    assert pid_alive(sleeper)


def test_redis_serves_with_a_password_and_keeps_data_across_restarts(data_dir: Path) -> None:
    server = EmbeddedRedis(data_dir)
    url = server.start()
    assert url.startswith("redis://:")
    assert url.endswith(f"@127.0.0.1:{server.port}/0")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as anonymous:
        anonymous.sendall(b"PING\r\n")
        assert anonymous.recv(100).startswith(b"-NOAUTH")
    with redis.Redis.from_url(url) as client:
        client.set("kept", "before restart")
    pid = server.pid
    assert pid is not None
    server.stop()
    assert not pid_alive(pid)

    again = EmbeddedRedis(data_dir)
    with redis.Redis.from_url(again.start()) as client:
        assert client.get("kept") == b"before restart"
    again.stop()
    assert _leftover_pids(again.redis_dir, "redis-server") == []


def test_a_server_left_running_by_a_killed_launcher_is_replaced(data_dir: Path) -> None:
    leftover = EmbeddedRedis(data_dir)
    leftover.start()
    proc = leftover._proc
    assert proc is not None
    # Forget it, as a launcher killed before its parent-death signal could fire would.
    leftover._proc = None

    fresh = EmbeddedRedis(data_dir)
    with redis.Redis.from_url(fresh.start()) as client:
        assert client.ping()
    assert proc.wait(5) is not None
    assert _leftover_pids(fresh.redis_dir, "redis-server") == [fresh.pid]
    fresh.stop()


def test_busy_ports_are_avoided(data_dir: Path) -> None:
    pg, server = EmbeddedPostgres(data_dir), EmbeddedRedis(data_dir)
    pg.start()
    server.start()
    last_ports = (pg.port, server.port)
    pg.stop()
    server.stop()
    with socket.socket() as a, socket.socket() as b:
        for sock, port in ((a, last_ports[0]), (b, last_ports[1])):
            # The stopped servers' connections may linger in TIME_WAIT on these ports.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
        pg.start()
        server.start()
        try:
            assert pg.port not in last_ports
            assert server.port not in last_ports
            with psycopg.connect(libpq_url(pg.url or "")) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            pg.stop()
            server.stop()


def test_free_port_prefers_the_given_port_when_free() -> None:
    port = free_port()
    assert free_port(preferred=port) == port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert free_port(preferred=port) != port
