"""Claude Code (npm) against the real stack: `claude -p` prints an answer and exits 0.

Needs node and npm (the package is installed once per machine under ~/.cache/abl/npm) and a
served model whose context holds Claude Code's first request: 24 tools of JSON schema, about
15,500 tokens with the test tokenizer (tests/fixtures/claude_code_first_request.json has its
shape). `ABL_E2E_AGENT_MODEL` names that model (default `abl-tiny`, the long-context test model).

Claude Code asks for `max_tokens` 32,000 (the clamp policy lowers it to the model's 4,096) and
takes an answer cut by `max_tokens` as an error ("Claude's response exceeded the ... output token
maximum"). The test model's random weights almost never end a turn by themselves, and after a
15,500-token prompt they decode about 20 tokens a second on 2 cores. So Claude Code talks here to
an API process and a worker of their own, whose catalogue serves `abl-tiny` from a copy of the
test model that also ends a turn on one token in a hundred (its generation config names them as
end-of-turn tokens, as Llama 3's names three): answers end by themselves after ~100 tokens.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Request
from infra.launcher.stack import Stack
from tests.conftest import ApiAccount
from tests.integration.api_process import api_process
from tests.support import STACK_MODEL_SPEC

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.332"
NPM_DIR = Path.home() / ".cache" / "abl" / "npm"
MODEL = os.environ.get("ABL_E2E_AGENT_MODEL", "abl-tiny")


@pytest.fixture(scope="session")
def claude() -> Path:
    binary = NPM_DIR / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        command = ["npm", "install", "--prefix", str(NPM_DIR), "--no-audit", "--no-fund"]
        subprocess.run([*command, CLAUDE_CODE], check=True, timeout=900)
    return binary


def ending_copy(source: Path, dest: Path) -> Path:
    """The test model with 1 token in 100 also ending a turn; the weights are hard links."""
    dest.mkdir()
    for path in source.iterdir():
        if path.is_file():
            os.link(path, dest / path.name)
    config_file = dest / "generation_config.json"
    config = json.loads(config_file.read_text())
    config_file.unlink()  # a link: write a file of its own
    config["eos_token_id"] = [*config["eos_token_id"], *range(100, 8000, 100)]
    config_file.write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def agent_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API process and a worker beside the stack's, serving the ending copy as abl-tiny on
    a queue of its own."""
    folder = tmp_path_factory.mktemp("claude-code")
    model = ending_copy(stack.model_dir, folder / "abl-tiny-ends")
    spec = STACK_MODEL_SPEC.model_copy(
        update={"folder": str(model), "build": None, "queue": "abl-tiny-ends"}
    )
    models_file = folder / "models.json"
    models_file.write_text(json.dumps([spec.model_dump(mode="json")]))
    env = {
        **stack.env_for_children(),
        "ABL_MODELS_FILE": str(models_file),
        "ABL_WORKER_MODELS": spec.id,
        "ABL_WORKER_NAME": "claude-code-worker",
        "ABL_METRICS_PORT": "0",
    }
    with (folder / "worker.log").open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        with api_process(stack, folder / "api.log", {"ABL_MODELS_FILE": str(models_file)}) as url:
            yield url
    finally:
        worker.terminate()
        worker.wait(60)


def test_claude_code_prints_an_answer(
    stack: Stack, agent_api: str, account: ApiAccount, claude: Path, tmp_path: Path, db: Session
) -> None:
    base_url = agent_api if STACK_MODEL_SPEC.id == MODEL else stack.base_url
    # The worker of its own is serving once a request is answered.
    warm = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    answered = httpx.post(
        f"{base_url}/v1/messages", json=warm, headers={"x-api-key": account.key}, timeout=120
    )
    assert answered.status_code == 200, answered.text
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": account.key,
        "ANTHROPIC_MODEL": MODEL,
        "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": MODEL,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": MODEL,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    result = subprocess.run(
        [str(claude), "-p", "Say hello", "--model", MODEL],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), result.stderr
    assert "API Error" not in result.stdout
    # Its long first request ran, with max_tokens 32,000 lowered to the model's limit.
    rows = db.execute(
        select(Request.input_tokens, Request.max_tokens, Request.stop_reason).where(
            Request.account_id == account.id, Request.input_tokens > 10_000
        )
    ).all()
    assert rows and all(r.max_tokens == STACK_MODEL_SPEC.max_output_tokens for r in rows), rows
    assert all(r.stop_reason == "end_turn" for r in rows), rows
