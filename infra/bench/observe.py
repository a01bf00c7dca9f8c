"""Looking at the platform from outside while it is under load: heartbeats, RSS, request rows."""

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from contract.worker_registry import LIVE_WORKERS_CALL, LIVE_WORKERS_SCRIPT, live_payloads

TERMINAL = ("succeeded", "failed", "cancelled")


def heartbeats(redis_url: str) -> list[dict[str, Any]]:
    """Every live worker's last heartbeat (its name, models, engine stats, recent cancels)."""
    client = redis.Redis.from_url(redis_url)
    try:
        script = client.register_script(LIVE_WORKERS_SCRIPT)
        return live_payloads(script(**LIVE_WORKERS_CALL))
    finally:
        client.close()


def engine_stats(beats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The engine stats of every model of every worker, flattened."""
    return [stats for beat in beats for stats in beat.get("engines", {}).values()]


def rss_mb(pid: int) -> float | None:
    """Resident memory of one process in MiB; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), None)
    return int(line.split()[1]) / 1024 if line else None


def descendants(pid: int) -> list[int]:
    """The processes started by `pid`, and by them, and so on (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def tree_rss_mb(pid: int, children: list[int]) -> float | None:
    """Resident memory in MiB of a process and its `children` (a worker and its engine
    process); None when the process is gone."""
    own = rss_mb(pid)
    if own is None:
        return None
    return own + sum(rss_mb(child) or 0.0 for child in children)


class RssSampler:
    """Samples the resident memory of some processes (with their descendants) in a thread;
    keeps each one's peak."""

    def __init__(self, pids: list[int], interval_s: float = 0.1, rescan_s: float = 5.0) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak_mb: dict[int, float] = {}
        # Scanning /proc for descendants costs more than reading RSS: done every `rescan_s`.
        self.rescan_s = rescan_s
        self._children: dict[int, list[int]] = {}
        self._scanned_at = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        if time.monotonic() - self._scanned_at >= self.rescan_s:
            self._children = {pid: descendants(pid) for pid in self.pids}
            self._scanned_at = time.monotonic()
        for pid in self.pids:
            mb = tree_rss_mb(pid, self._children.get(pid, []))
            if mb is not None:
                self.peak_mb[pid] = max(mb, self.peak_mb.get(pid, 0.0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)


def request_rows(
    base_url: str, admin_token: str, request_ids: list[str], timeout_s: float = 60.0
) -> dict[str, dict[str, Any]]:
    """The admin view of each request once it is settled (or as it is after `timeout_s`)."""
    rows: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10, trust_env=False) as client:
        pending = list(request_ids)
        while pending:
            for request_id in list(pending):
                response = client.get(f"/admin/requests/{request_id}")
                if response.status_code == 200:
                    rows[request_id] = response.json()
                    if rows[request_id]["status"] in TERMINAL:
                        pending.remove(request_id)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    return rows
