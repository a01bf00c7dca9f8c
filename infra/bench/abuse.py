"""`make bench-abuse`: huge bodies from callers without valid credentials, and from one with a
key, against a fresh stack; the API's memory and the latency of `/healthz` meanwhile.

Issue 15, item 1: under 10 concurrent 30 MB bodies of `[{},{},...]` with a bogus key, the API's
resident memory must grow by less than 100 MB and every `/healthz` must answer within 100 ms.
Each phase sends its bodies on raw sockets (one thread each, reading the answer while the body is
still going out, so an early answer is seen as early) and probes `/healthz` back to back on a
keep-alive connection. Prints a table and writes bench-results/abuse.json.
"""

import argparse
import json
import os
import secrets
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.table import Table

from contract.catalog import TEST_MODEL_ID
from infra.bench.observe import RssSampler, rss_mb
from infra.bench.stats import percentile
from infra.launcher.stack import Stack

MB = 1024 * 1024
# The bounds.
MAX_RSS_GROWTH_MB = 100.0
MAX_HEALTHZ_MS = 100.0
DEFAULT_OUTPUT = Path("bench-results")


def abusive_body(size: int) -> bytes:
    """A Messages request whose `messages` is `[{},{},...]`, `size` bytes long."""
    head = b'{"model":"' + TEST_MODEL_ID.encode() + b'","max_tokens":1,"messages":['
    count = max(1, (size - len(head) - 2) // 3)
    return head + b",".join([b"{}"] * count) + b"]}"


@dataclass
class Upload:
    """One abusive request: its answer's status line and when its first byte came."""

    status: str = "no answer"
    first_byte_s: float | None = None
    sent_s: float | None = None


@dataclass
class Probe:
    """`/healthz` back to back until stopped; every answer's latency."""

    base_url: str
    latencies_s: list[float] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "Probe":
        self._thread = threading.Thread(target=self._run, name="healthz-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30, trust_env=False) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies_s.append(time.perf_counter() - started)
                self.failures += not ok
                self._stop.wait(0.005)


def upload(base_url: str, path: str, headers: dict[str, str], body: bytes) -> Upload:
    """POSTs `body` on a raw socket; the answer is read by a second thread meanwhile."""
    url = urlsplit(base_url)
    result = Upload()
    head = f"POST {path} HTTP/1.1\r\nhost: {url.hostname}\r\ncontent-type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"content-length: {len(body)}\r\n\r\n"
    started = time.perf_counter()
    with socket.create_connection((url.hostname or "", url.port or 80), timeout=120) as sock:

        def read_answer() -> None:
            try:
                first = sock.recv(65536)
            except OSError:
                return
            result.first_byte_s = time.perf_counter() - started
            # "HTTP/1.1 401 Unauthorized" -> "401"
            result.status = first.split(b"\r\n", 1)[0].decode(errors="replace")[9:12]

        reader = threading.Thread(target=read_answer, daemon=True)
        reader.start()
        try:
            sock.sendall(head.encode())
            sock.sendall(body)
            result.sent_s = time.perf_counter() - started
        except OSError:
            pass  # the server answered and closed before taking the whole body
        reader.join(120)
    return result


def run_phase(
    stack: Stack,
    name: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    uploads: int,
    bounded: bool = True,
) -> dict[str, Any]:
    """`uploads` concurrent bodies; the API's RSS and `/healthz` latencies while they last."""
    assert stack.api is not None and stack.api.pid is not None
    pid = stack.api.pid
    # A warm server: its threads and database connections exist before the measured burst.
    warm = [
        threading.Thread(target=upload, args=(stack.base_url, path, headers, body[:1024]))
        for _ in range(uploads)
    ]
    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join()
    time.sleep(1.0)  # let the previous phase's sockets drain
    rss_before = rss_mb(pid) or 0.0
    cpu_before = cpu_s(pid)
    results: list[Upload] = []
    with RssSampler([pid], interval_s=0.02) as rss, Probe(stack.base_url) as probe:
        time.sleep(0.3)  # a few idle probes first
        threads = [
            threading.Thread(
                target=lambda: results.append(upload(stack.base_url, path, headers, body))
            )
            for _ in range(uploads)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        time.sleep(0.3)
    api_cpu = cpu_s(pid) - cpu_before
    peak = rss.peak_mb.get(pid, rss_before)
    latencies = probe.latencies_s
    first_bytes = [r.first_byte_s for r in results if r.first_byte_s is not None]
    sent = [r.sent_s for r in results if r.sent_s is not None]
    growth = peak - rss_before
    healthz_max = max(latencies) if latencies else None
    return {
        "phase": name,
        "path": path,
        # The bounds are for callers without valid credentials.
        "within_bounds": (
            growth < MAX_RSS_GROWTH_MB
            and healthz_max is not None
            and healthz_max * 1000 < MAX_HEALTHZ_MS
            and probe.failures == 0
        )
        if bounded
        else None,
        "uploads": uploads,
        "body_mb": round(len(body) / MB, 1),
        "wall_s": round(wall, 2),
        "statuses": dict(Counter(r.status for r in results)),
        "answer_first_byte_s_max": round(max(first_bytes), 3) if first_bytes else None,
        "body_sent_s_max": round(max(sent), 3) if sent else None,
        "api_cpu_s": round(api_cpu, 2),
        "api_rss_before_mb": round(rss_before, 1),
        "api_rss_peak_mb": round(peak, 1),
        "api_rss_growth_mb": round(growth, 1),
        "healthz_probes": len(latencies),
        "healthz_failures": probe.failures,
        "healthz_ms_p50": _ms(percentile(latencies, 50)),
        "healthz_ms_p99": _ms(percentile(latencies, 99)),
        "healthz_ms_max": _ms(healthz_max),
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _api_key(stack: Stack) -> str:
    headers = {"Authorization": f"Bearer {stack.admin_token}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as admin:
        account = admin.post("/admin/accounts", json={"name": "abuse", "credits": 1000})
        account.raise_for_status()
        key = admin.post(f"/admin/accounts/{account.json()['id']}/keys", json={})
        key.raise_for_status()
        return str(key.json()["key"])


PHASES = ("bogus-key", "bogus-admin", "valid-key")


def run(uploads: int, body_mb: float, names: list[str]) -> dict[str, Any]:
    body = abusive_body(int(body_mb * MB))
    bogus_key = {"x-api-key": "ak_" + secrets.token_urlsafe(32)}
    bogus_admin = {"authorization": "Bearer " + secrets.token_urlsafe(32)}
    phases = []
    with (
        tempfile.TemporaryDirectory(prefix="abl-abuse-") as tmp,
        Stack(Path(tmp), env={"ABL_WORKER_MODELS": TEST_MODEL_ID}) as stack,
    ):
        if "bogus-key" in names:
            phases.append(
                run_phase(stack, "bogus API key", "/v1/messages", bogus_key, body, uploads)
            )
        if "bogus-admin" in names:
            phases.append(
                run_phase(stack, "bogus admin token", "/admin/accounts", bogus_admin, body, uploads)
            )
        if "valid-key" in names:
            valid = {"x-api-key": _api_key(stack)}
            phases.append(
                run_phase(stack, "valid API key", "/v1/messages", valid, body, uploads, False)
            )
    return {
        "bounds": {"api_rss_growth_mb": MAX_RSS_GROWTH_MB, "healthz_ms_max": MAX_HEALTHZ_MS},
        "host": {"cpus": len(os.sched_getaffinity(0)), "load_avg_1m": os.getloadavg()[0]},
        "phases": phases,
    }


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title="huge bodies: the API's memory and /healthz meanwhile")
    for column in ("phase", "answers", "RSS growth MB", "healthz p50/p99/max ms", "within bounds"):
        table.add_column(column)
    verdicts = {True: "yes", False: "NO", None: "(authenticated: no bound)"}
    for phase in result["phases"]:
        table.add_row(
            phase["phase"],
            ", ".join(f"{n}x {s}" for s, n in phase["statuses"].items()),
            str(phase["api_rss_growth_mb"]),
            f"{phase['healthz_ms_p50']}/{phase['healthz_ms_p99']}/{phase['healthz_ms_max']}",
            verdicts[phase["within_bounds"]],
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.bench.abuse", description=__doc__)
    parser.add_argument("--uploads", type=int, default=10, help="concurrent bodies per phase")
    parser.add_argument("--body-mb", type=float, default=30.0, help="size of each body")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}"
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.phases.split(",") if n.strip()]
    if unknown := set(names) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    result = run(args.uploads, args.body_mb, names)
    console = Console()
    print_table(result, console)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "abuse.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
