"""Claude Code (npm) against the real stack: `claude -p` prints an answer and exits 0.

Needs node and npm (the package is installed once per machine under ~/.cache/abl/npm) and a
served model whose context holds Claude Code's first request: 24 tools of JSON schema, about
19,000 tokens with the test tokenizer (tests/fixtures/claude_code_first_request.json has its
shape). `ABL_E2E_AGENT_MODEL` names that model (default `abl-tiny`, the long-context test model).
"""

import os
import subprocess
from pathlib import Path

import pytest

from infra.launcher.stack import Stack
from tests.conftest import ApiAccount

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


def test_claude_code_prints_an_answer(
    stack: Stack, account: ApiAccount, claude: Path, tmp_path: Path
) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "ANTHROPIC_BASE_URL": stack.base_url,
        "ANTHROPIC_API_KEY": account.key,
        "ANTHROPIC_MODEL": MODEL,
        "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
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
        timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), result.stderr
    assert "API Error" not in result.stdout
