"""`make k8s-secrets`: the files infra/deploy/k8s's secretGenerator reads, with fresh values.

No secret ships with the manifests: `kubectl apply -k infra/deploy/k8s` fails until these files
exist (kustomize cannot read them), so nothing deploys with a placeholder. Each Secret goes to
the pods that need it and no others: the admin token and the JWT secret to the API only
(docs/security.md). The files are written 0600 and never overwritten; they are git-ignored.
"""

import argparse
import os
import secrets
import sys
from pathlib import Path

K8S_DIR = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
SECRETS_DIR = "secrets"
POSTGRES = "abl-postgres:5432"
REDIS = "abl-redis:6379"

# Secret name -> (the env file under secrets/ it is generated from, the keys it holds).
SECRET_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    # The API's credentials: no other pod mounts this Secret.
    "abl-api-secrets": ("api.env", ("ABL_ADMIN_TOKEN", "ABL_JWT_SECRET")),
    # Where the data lives, as the restricted role: the API, the workers and the migrate Job.
    "abl-secrets": ("app.env", ("ABL_DATABASE_URL", "ABL_REDIS_URL")),
    # The schema owner, which migrates: the migrate Job only.
    "abl-migrate-secrets": ("migrate.env", ("ABL_MIGRATION_DATABASE_URL",)),
    # The data stores' own passwords: the Postgres and Redis StatefulSets.
    "abl-datastore-secrets": ("datastores.env", ("POSTGRES_PASSWORD", "REDIS_PASSWORD")),
}


def secret_values(
    database_url: str | None, redis_url: str | None, migration_url: str | None = None
) -> dict[str, dict[str, str]]:
    """Fresh values for every Secret; given URLs (managed services) are used as they are."""
    pg_password, redis_password = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    app_password = secrets.token_urlsafe(32)
    return {
        "abl-api-secrets": {
            "ABL_ADMIN_TOKEN": secrets.token_urlsafe(32),
            "ABL_JWT_SECRET": secrets.token_urlsafe(32),
        },
        "abl-secrets": {
            # The migrate Job creates this role (owning nothing) with this password.
            "ABL_DATABASE_URL": database_url
            or f"postgresql+psycopg://abl_app:{app_password}@{POSTGRES}/abl",
            "ABL_REDIS_URL": redis_url or f"redis://:{redis_password}@{REDIS}/0",
        },
        "abl-migrate-secrets": {
            "ABL_MIGRATION_DATABASE_URL": migration_url
            or f"postgresql+psycopg://abl:{pg_password}@{POSTGRES}/abl",
        },
        "abl-datastore-secrets": {
            "POSTGRES_PASSWORD": pg_password,
            "REDIS_PASSWORD": redis_password,
        },
    }


def write_secret_files(
    directory: Path,
    database_url: str | None = None,
    redis_url: str | None = None,
    migration_url: str | None = None,
) -> list[Path]:
    """Writes every env file (0600) under `directory`; refuses if any exists already."""
    paths = {name: directory / file for name, (file, _) in SECRET_FILES.items()}
    if existing := [str(p) for p in paths.values() if p.exists()]:
        raise FileExistsError(f"already there (delete them to start over): {', '.join(existing)}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, values in secret_values(database_url, redis_url, migration_url).items():
        fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.writelines(f"{key}={value}\n" for key, value in values.items())
    return list(paths.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.cli.k8s_secrets", description=__doc__)
    parser.add_argument("--dir", type=Path, default=K8S_DIR / SECRETS_DIR)
    parser.add_argument(
        "--database-url", help="a managed Postgres (the application's restricted role)"
    )
    parser.add_argument("--migration-database-url", help="with --database-url: the owner role")
    parser.add_argument("--redis-url", help="a managed Redis instead of the StatefulSet")
    args = parser.parse_args(argv)
    try:
        written = write_secret_files(
            args.dir, args.database_url, args.redis_url, args.migration_database_url
        )
    except FileExistsError as exc:
        print(f"k8s-secrets: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
