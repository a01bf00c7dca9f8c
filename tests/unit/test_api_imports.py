"""The API process never imports torch or transformers."""

import subprocess
import sys


def test_api_does_not_import_torch() -> None:
    code = (
        "import sys, api.main\n"
        "app = api.main.create_app()\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    env = {
        "ABL_DATABASE_URL": "postgresql+psycopg://x@127.0.0.1:1/x",
        "ABL_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == ""
