"""`abl batch ...`: Message Batches from the command line, with the Messages API's credentials.

The base URL and key come from options or, as the anthropic SDK reads them, from
ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN, sent as a Bearer token).
`submit FILE.jsonl` takes one `{"custom_id", "params"}` per line (the shape of a batch's
`requests`), shows a progress bar until the batch ends, then writes its results (JSONL).
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
ENDED = ("succeeded", "errored", "canceled", "expired")


class BatchCliError(Exception):
    """An answer the command cannot go on from (printed, exit status 1)."""


def client_for(args: argparse.Namespace) -> httpx.Client:
    base = args.base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL
    headers = {"anthropic-version": "2023-06-01"}
    key = args.api_key or os.environ.get("ANTHROPIC_API_KEY")
    token = os.environ.get("ANTHROPIC_AUTH_TOKEN")
    if key:
        headers["x-api-key"] = key
    elif token:
        headers["authorization"] = f"Bearer {token}"
    else:
        raise BatchCliError("no credentials: pass --api-key or set ANTHROPIC_API_KEY")
    return httpx.Client(base_url=base.rstrip("/"), headers=headers, timeout=300)


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    response = client.request(method, path, **kwargs)
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            detail = f"{error['type']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            detail = response.text[:500]
        raise BatchCliError(f"{method} {path} -> {response.status_code} {detail}")
    return response.json()


def read_requests(path: Path) -> list[Any]:
    requests = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                requests.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BatchCliError(f"{path}:{number}: not JSON ({exc})") from None
    return requests


def done_count(batch: dict[str, Any]) -> int:
    return sum(int(batch["request_counts"][k]) for k in ENDED)


def wait_until_ended(
    client: httpx.Client, batch: dict[str, Any], console: Console, interval: float
) -> dict[str, Any]:
    total = done_count(batch) + int(batch["request_counts"]["processing"])
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(batch["id"], total=total, completed=done_count(batch))
        while batch["processing_status"] != "ended":
            time.sleep(interval)
            batch = call(client, "GET", f"/v1/messages/batches/{batch['id']}")
            progress.update(task, completed=done_count(batch))
    return batch


def stream_results(client: httpx.Client, batch_id: str, out: TextIO) -> int:
    lines = 0
    with client.stream("GET", f"/v1/messages/batches/{batch_id}/results") as response:
        if response.status_code >= 400:
            response.read()
            raise BatchCliError(f"results of {batch_id} -> {response.status_code} {response.text}")
        for line in _lines(response.iter_lines()):
            out.write(line + "\n")
            lines += 1
    return lines


def _lines(lines: Iterator[str]) -> Iterator[str]:
    return (line for line in lines if line.strip())


def counts_line(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    return ", ".join(f"{k} {counts[k]}" for k in ("processing", *ENDED))


def batch_table(batches: list[dict[str, Any]]) -> Table:
    """Batches as a table (printed on standard output; progress and notes go to stderr)."""
    table = Table("id", "status", "counts", "created_at", "ended_at")
    for b in batches:
        table.add_row(
            b["id"], b["processing_status"], counts_line(b), b["created_at"], b["ended_at"] or ""
        )
    return table


def cmd_submit(args: argparse.Namespace, client: httpx.Client, console: Console) -> int:
    requests = read_requests(args.file)
    batch = call(client, "POST", "/v1/messages/batches", json={"requests": requests})
    console.print(f"batch {batch['id']}: {len(requests)} requests")
    if args.no_wait:
        print(batch["id"])
        return 0
    batch = wait_until_ended(client, batch, console, args.interval)
    output: Path = args.output or args.file.with_name(f"{args.file.stem}.results.jsonl")
    with output.open("w", encoding="utf-8") as out:
        lines = stream_results(client, batch["id"], out)
    console.print(f"{counts_line(batch)}; {lines} results written to {output}")
    return 0


def cmd_list(args: argparse.Namespace, client: httpx.Client, console: Console) -> int:
    page = call(client, "GET", "/v1/messages/batches", params={"limit": args.limit})
    if args.json:
        print(json.dumps(page))
    else:
        Console().print(batch_table(page["data"]))
    return 0


def cmd_status(args: argparse.Namespace, client: httpx.Client, console: Console) -> int:
    batch = call(client, "GET", f"/v1/messages/batches/{args.batch_id}")
    if args.json:
        print(json.dumps(batch))
    else:
        Console().print(batch_table([batch]))
    return 0


def cmd_results(args: argparse.Namespace, client: httpx.Client, console: Console) -> int:
    if args.output is None:
        stream_results(client, args.batch_id, sys.stdout)
        return 0
    with args.output.open("w", encoding="utf-8") as out:
        lines = stream_results(client, args.batch_id, out)
    console.print(f"{lines} results written to {args.output}")
    return 0


def cmd_cancel(args: argparse.Namespace, client: httpx.Client, console: Console) -> int:
    batch = call(client, "POST", f"/v1/messages/batches/{args.batch_id}/cancel")
    console.print(f"batch {batch['id']}: {batch['processing_status']} ({counts_line(batch)})")
    return 0


def _run(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        console = Console(stderr=True)
        try:
            with client_for(args) as client:
                return int(handler(args, client, console))
        except (BatchCliError, httpx.HTTPError) as exc:
            console.print(f"[red]{exc}[/red]")
            return 1

    return run


def register_batch(subparsers: Any) -> None:
    batch = subparsers.add_parser("batch", help="Message Batches (env: ANTHROPIC_BASE_URL, ...)")
    commands = batch.add_subparsers(dest="batch_command", required=True)

    def leaf(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
        p.add_argument("--base-url", help="the API (default: $ANTHROPIC_BASE_URL)")
        p.add_argument("--api-key", help="an API key (default: $ANTHROPIC_API_KEY)")
        p.set_defaults(func=_run(handler))
        return p

    submit = leaf("submit", cmd_submit, "create a batch from a JSONL file, wait, write results")
    submit.add_argument("file", type=Path, help="one {custom_id, params} per line")
    submit.add_argument("--output", type=Path, help="results file (default: FILE.results.jsonl)")
    submit.add_argument("--no-wait", action="store_true", help="print the batch id and return")
    submit.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    listing = leaf("list", cmd_list, "the account's batches, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    status = leaf("status", cmd_status, "one batch")
    status.add_argument("batch_id")
    status.add_argument("--json", action="store_true")
    results = leaf("results", cmd_results, "an ended batch's results (JSONL)")
    results.add_argument("batch_id")
    results.add_argument("--output", type=Path, help="file (default: standard output)")
    cancel = leaf("cancel", cmd_cancel, "cancel a batch")
    cancel.add_argument("batch_id")
