"""docker-compose.yml's structure, checked with pyyaml since Docker does not run here: services,
start order, scaling, and the hardening of docs/security.md (no default password, the API's
credentials for the API alone, locked-down containers, data stores on an internal network)."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli.settings_doc import env_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Variables the compose file itself reads (no process does).
COMPOSE_ONLY = {"ABL_POSTGRES_PASSWORD", "ABL_APP_POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
WORKERS = ("worker", "worker-gpu")
# The platform's own containers and its data stores (monitoring is an optional profile).
PLATFORM = ("postgres", "redis", "migrate", "api", *WORKERS)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def command(service: dict[str, Any]) -> str:
    value = service["command"]
    return " ".join(value) if isinstance(value, list) else str(value)


def test_services(services: dict[str, dict[str, Any]]) -> None:
    expected = {"postgres", "redis", "migrate", "api", *WORKERS, "prometheus", "grafana"}
    assert set(services) == expected
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    for name in ("postgres", "redis", "migrate", "api", "worker"):
        assert "profiles" not in services[name], f"{name} must run without a profile"


def test_commands(services: dict[str, dict[str, Any]]) -> None:
    assert command(services["migrate"]) == "sh -c abl migrate && abl build-model"
    assert services["migrate"]["restart"] == "no"
    api = command(services["api"])
    assert "uvicorn --factory api.main:create_app" in api and "--port 8000" in api
    for name in WORKERS:
        assert services[name]["command"] == ["python", "-m", "workers"]


def test_stateful_services_have_health_checks_and_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["postgres"]["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert services["redis"]["volumes"] == ["redisdata:/data"]
    assert "--appendonly" in services["redis"]["command"]
    declared = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert conditions("migrate") == {"postgres": "service_healthy"}
    expected = {"migrate": "service_completed_successfully", "redis": "service_healthy"}
    for name in ("api", *WORKERS):
        assert conditions(name) == expected, name
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name


def test_workers_scale(services: dict[str, dict[str, Any]]) -> None:
    """`--scale worker=N` needs no fixed name, host port or hostname on the worker."""
    for name in WORKERS:
        worker = services[name]
        for fixed in ("container_name", "ports", "hostname"):
            assert fixed not in worker, f"{name} has {fixed}"
        assert worker["environment"]["ABL_METRICS_PORT"] == "9464"
        assert worker["expose"] == ["9464"]
        assert "ABL_WORKER_NAME" not in worker["environment"]  # hostname-pid is unique
    for name, service in services.items():
        assert "container_name" not in service, name


def test_gpu_worker_reserves_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["worker"]


def test_environment_names_are_settings(services: dict[str, dict[str, Any]]) -> None:
    known = env_names()
    for name in ("api", "migrate", *WORKERS):
        env = services[name]["environment"]
        assert {"ABL_DATABASE_URL", "ABL_REDIS_URL", "ABL_DATA_DIR"} <= set(env), name
        unknown = {k for k in env if k.startswith("ABL_")} - known
        assert not unknown, f"{name} sets variables no process reads: {unknown}"
    interpolated = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))
    assert interpolated - known <= COMPOSE_ONLY


def test_prometheus_scrapes_the_api_and_every_worker(services: dict[str, dict[str, Any]]) -> None:
    mount = next(v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v)
    config = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["abl-api"]["static_configs"] == [{"targets": ["api:8000"]}]
    assert jobs["abl-api"]["metrics_path"] == "/metrics"
    (dns,) = jobs["abl-worker"]["dns_sd_configs"]
    assert set(dns["names"]) == set(WORKERS) and dns["type"] == "A"
    assert str(dns["port"]) == services["worker"]["environment"]["ABL_METRICS_PORT"]


def test_only_migrate_connects_as_the_schema_owner(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]["environment"]
    assert migrate["ABL_MIGRATION_DATABASE_URL"].startswith("postgresql+psycopg://abl:")
    for name in ("api", *WORKERS):
        env = services[name]["environment"]
        assert "ABL_MIGRATION_DATABASE_URL" not in env, name
        assert env["ABL_DATABASE_URL"].startswith("postgresql+psycopg://abl_app:"), name


def test_no_default_password(compose: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text()
    for variable in ("ABL_POSTGRES_PASSWORD", "ABL_APP_POSTGRES_PASSWORD"):
        uses = re.findall(r"\$\{" + variable + r"([^}]*)\}", text)
        assert uses, variable
        for use in uses:
            assert use.startswith(f":?set {variable}"), use  # required, with a message
    assert "generate one with: python -c" in text
    assert "abl:abl@" not in text and "abl_app:abl_app@" not in text


def test_only_the_api_gets_its_credentials(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        env = service.get("environment") or {}
        has = {"ABL_ADMIN_TOKEN", "ABL_JWT_SECRET"} & set(env)
        assert has == ({"ABL_ADMIN_TOKEN", "ABL_JWT_SECRET"} if name == "api" else set()), name
    assert services["api"]["environment"]["ABL_ADMIN_TOKEN"].startswith("${ABL_ADMIN_TOKEN:?")


def test_platform_containers_are_locked_down(services: dict[str, dict[str, Any]]) -> None:
    for name in PLATFORM:
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert "cap_add" not in service and not service.get("privileged"), name
        assert str(service["user"]).split(":")[0] not in ("root", "0"), name
        assert "/tmp" in service["tmpfs"], name  # a read-only root: temporary files in memory
    assert "/var/run/postgresql" in services["postgres"]["tmpfs"]
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        assert "\nUSER abl\n" in (ROOT / "infra" / "deploy" / dockerfile).read_text()


def test_only_the_api_and_workers_reach_the_data_stores(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert compose["networks"]["data"] == {"internal": True}
    on_data = {name for name, s in services.items() if "data" in s.get("networks", ["default"])}
    assert on_data == {"postgres", "redis", "api", "migrate", *WORKERS}
    for store in ("postgres", "redis"):
        assert services[store]["networks"] == ["data"], store
        assert "ports" not in services[store] and "expose" not in services[store]
