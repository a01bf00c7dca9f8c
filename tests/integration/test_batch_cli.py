"""`abl batch ...` as a user runs it: a subprocess with the SDK's environment variables."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ApiAccount
from tests.support import STACK_MODEL

REPO = Path(__file__).resolve().parents[2]
MODEL = STACK_MODEL


def abl(stack: Any, account: ApiAccount, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABL_", "ANTHROPIC_"))}
    env.update(COLUMNS="240", ANTHROPIC_BASE_URL=stack.base_url, ANTHROPIC_API_KEY=account.key)
    return subprocess.run(
        [sys.executable, "-m", "infra.cli.main", "batch", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_submit_waits_and_writes_the_results(
    stack: Any, account: ApiAccount, tmp_path: Path
) -> None:
    params = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    source = tmp_path / "eval.jsonl"
    source.write_text(
        "".join(json.dumps({"custom_id": f"q{i}", "params": params}) + "\n" for i in range(4))
    )
    done = abl(stack, account, "submit", str(source), "--interval", "0.3")
    assert done.returncode == 0, done.stderr
    results = [
        json.loads(line) for line in (tmp_path / "eval.results.jsonl").read_text().splitlines()
    ]
    assert sorted(r["custom_id"] for r in results) == ["q0", "q1", "q2", "q3"]
    assert {r["result"]["type"] for r in results} == {"succeeded"}
    assert "succeeded 4" in done.stderr

    listed = abl(stack, account, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    batch_id = json.loads(listed.stdout)["data"][0]["id"]
    status = abl(stack, account, "status", batch_id, "--json")
    assert json.loads(status.stdout)["processing_status"] == "ended"
    table = abl(stack, account, "list")
    assert batch_id in table.stdout and "ended" in table.stdout
    again = abl(stack, account, "results", batch_id)
    assert sorted(json.loads(line)["custom_id"] for line in again.stdout.splitlines()) == [
        "q0",
        "q1",
        "q2",
        "q3",
    ]
    canceled = abl(stack, account, "cancel", batch_id)
    assert canceled.returncode == 0 and "ended" in canceled.stderr


def test_errors_are_printed_with_status_one(stack: Any, account: ApiAccount) -> None:
    missing = abl(stack, account, "status", "msgbatch_nope")
    assert missing.returncode == 1 and "not_found_error" in missing.stderr
