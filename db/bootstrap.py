"""First start: a demo account with credits and a key, so `make up` prints a working curl."""

import os
from pathlib import Path

from sqlalchemy import func, select

from db.accounts import create_account, create_api_key, find_live_key
from db.models import Account
from db.session import transaction

DEMO_CREDITS = 10_000
DEMO_KEY_FILE = "demo_api_key"


def ensure_demo_account(database_url: str, data_dir: Path) -> str | None:
    """The demo key: created with its account when the database has no accounts yet.

    The plaintext is kept in a 0600 file under data_dir because only its hash is in the
    database. Returns None when the database already had accounts and no demo key is on disk.
    """
    key_file = Path(data_dir) / DEMO_KEY_FILE
    with transaction(database_url) as session:
        if key_file.exists():
            key = key_file.read_text().strip()
            if find_live_key(session, key) is not None:
                return key
        if session.execute(select(func.count()).select_from(Account)).scalar_one():
            return None
        account = create_account(session, "demo", DEMO_CREDITS, created_by="bootstrap")
        new = create_api_key(session, account.id, name="demo")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new.plaintext + "\n")
    return new.plaintext
