"""Looking at the platform from outside while it is under load: heartbeats, RSS, request rows."""

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

# workers.runtime.HEARTBEAT_PREFIX (not imported: that module loads the engine and torch).
HEARTBEAT_PATTERN = "abl:worker:*"
TERMINAL = ("succeeded", "failed", "cancelled")


def heartbeats(redis_url: str) -> list[dict[str, Any]]:
    """Every live worker's last heartbeat (its name, models, engine stats, recent cancels)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=HEARTBEAT_PATTERN, count=500))
        return [json.loads(raw) for raw in client.mget(keys) if raw] if keys else []
    finally:
        client.close()


def engine_stats(beats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The engine stats of every model of every worker, flattened."""
    return [stats for beat in beats for stats in beat.get("engines", {}).values()]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (psutil when present, else /proc)."""
    try:
        import psutil
    except ModuleNotFoundError:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), None)
        return int(line.split()[1]) / 1024 if line else None
    try:
        return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)
    except psutil.Error:
        return None


class RssSampler:
    """Samples the resident memory of some processes in a thread; keeps each one's peak."""

    def __init__(self, pids: list[int], interval_s: float = 0.1) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        for pid in self.pids:
            mb = rss_mb(pid)
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
