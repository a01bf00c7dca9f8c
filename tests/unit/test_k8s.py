"""infra/deploy/k8s manifests: kinds, selectors that match their pods, references that resolve,
environment names that processes actually read, and the security settings of docs/security.md:
no secret ships, only the API gets its credentials, every pod is locked down, and only the API
and the workers reach the data stores."""

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.settings import secret_problem
from contract.catalog import load_catalog
from infra.cli.k8s_secrets import SECRET_FILES, SECRETS_DIR, write_secret_files
from infra.cli.settings_doc import env_names

K8S = Path(__file__).resolve().parents[2] / "infra" / "deploy" / "k8s"
NAMESPACE = "abl"
WORKLOADS = ("Deployment", "StatefulSet", "Job")
API_CREDENTIALS = {"ABL_ADMIN_TOKEN", "ABL_JWT_SECRET"}
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def kustomization() -> Doc:
    loaded: Doc = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def docs(kustomization: Doc) -> list[Doc]:
    found: list[Doc] = []
    for name in kustomization["resources"]:
        found += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return found


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: Doc) -> Iterator[Doc]:
    spec = pod_spec(doc)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env_of(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def workers(docs: list[Doc]) -> list[Doc]:
    return [
        d
        for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/name"] == "abl-worker"
    ]


def test_every_manifest_is_listed_and_every_kind_is_there(
    kustomization: Doc, docs: list[Doc]
) -> None:
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = Counter(d["kind"] for d in docs)
    for kind in ("Namespace", "ConfigMap", "Job", "HorizontalPodAutoscaler"):
        assert kinds[kind] == 1, kind
    assert kinds["NetworkPolicy"] == 2
    assert kinds["StatefulSet"] == 2 and kinds["Service"] == 3
    # The API, the default model's GPU and CPU workers, the test model's CPU workers.
    assert kinds["Deployment"] == 4
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    assert kustomization["namespace"] == NAMESPACE


def test_selectors_match_their_pods(docs: list[Doc]) -> None:
    pod_labels = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]
            pod_labels.append(labels)
    # Worker Deployments must not select each other's pods.
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in workers(docs)]
    assert len(set(selectors)) == len(selectors)
    for service in of_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), service
    for stateful in of_kind(docs, "StatefulSet"):
        named(docs, "Service", stateful["spec"]["serviceName"])
    hpa = of_kind(docs, "HorizontalPodAutoscaler")[0]
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    named(docs, "Deployment", target["name"])


def generated_secrets() -> dict[str, set[str]]:
    """The Secrets the kustomization generates, and their keys (from `make k8s-secrets`)."""
    return {name: set(keys) for name, (_, keys) in SECRET_FILES.items()}


def secret_refs(container: Doc) -> dict[str, tuple[str, str]]:
    """Environment variable -> (Secret, key) for every variable taken from a Secret."""
    refs = {}
    for name, value in env_of(container).items():
        if isinstance(value, dict) and "secretKeyRef" in value:
            refs[name] = (value["secretKeyRef"]["name"], value["secretKeyRef"]["key"])
    return refs


def test_no_secret_ships_and_the_generator_writes_what_pods_read(kustomization: Doc) -> None:
    for path in K8S.rglob("*"):
        if path.is_file() and SECRETS_DIR not in path.relative_to(K8S).parts:
            assert "REPLACE_ME" not in path.read_text(), path
    generated = {g["name"]: [Path(e) for e in g["envs"]] for g in kustomization["secretGenerator"]}
    assert generated == {
        name: [Path(SECRETS_DIR) / file] for name, (file, _) in SECRET_FILES.items()
    }
    ignored = (K8S.parents[2] / ".gitignore").read_text().split()
    assert f"infra/deploy/k8s/{SECRETS_DIR}/" in ignored


def test_references_resolve(docs: list[Doc]) -> None:
    assert of_kind(docs, "Secret") == []  # all generated
    secrets = generated_secrets()
    config_keys = {k for c in of_kind(docs, "ConfigMap") for k in c["data"]}
    claims = {c["metadata"]["name"] for c in of_kind(docs, "PersistentVolumeClaim")}
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        for container in containers(doc):
            for ref in container.get("envFrom", []):
                named(docs, "ConfigMap", ref["configMapRef"]["name"])
            for secret, key in secret_refs(container).values():
                assert key in secrets[secret], (secret, key)
            assert "secretRef" not in str(container.get("envFrom", []))  # keys one by one
        for volume in pod_spec(doc).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert {i["key"] for i in volume["configMap"]["items"]} <= config_keys


def test_environment_names_are_settings(docs: list[Doc]) -> None:
    known = env_names()
    names = {k for c in of_kind(docs, "ConfigMap") for k in c["data"] if k.startswith("ABL_")}
    names |= {k for keys in generated_secrets().values() for k in keys if k.startswith("ABL_")}
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            for container in containers(doc):
                names |= {k for k in env_of(container) if k.startswith("ABL_")}
    assert names - known == set()
    for name in ("ABL_DATABASE_URL", "ABL_REDIS_URL", "ABL_ADMIN_TOKEN"):
        assert name in names


def test_api(docs: list[Doc]) -> None:
    api = named(docs, "Deployment", "abl-api")
    (container,) = pod_spec(api)["containers"]
    assert container["image"] == "abl-api"
    assert "api.main:create_app" in container["command"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"ABL_DATABASE_URL", "ABL_REDIS_URL", "ABL_ADMIN_TOKEN"} <= set(env_of(container))
    # Only the migrate Job may act as the schema's owner.
    assert "ABL_MIGRATION_DATABASE_URL" not in env_of(container)
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])


def test_a_worker_deployment_per_model_with_gpu_and_cpu_variants(docs: list[Doc]) -> None:
    catalog = load_catalog()
    variants: Counter[tuple[str, str]] = Counter()
    for worker in workers(docs):
        labels = worker["spec"]["template"]["metadata"]["labels"]
        main = pod_spec(worker)["containers"][0]
        env = env_of(main)
        assert main["image"] == "abl-worker" and main["command"] == ["python", "-m", "workers"]
        assert env["ABL_WORKER_MODELS"] == labels["abl.dev/model"]
        assert catalog.get(labels["abl.dev/model"]) is not None
        port = next(p["containerPort"] for p in main["ports"] if p["name"] == "metrics")
        assert env["ABL_METRICS_PORT"] == str(port)
        annotations = worker["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port)
        resources = main["resources"]
        gpus = resources.get("limits", {}).get("nvidia.com/gpu", 0)
        accelerator = labels["abl.dev/accelerator"]
        assert (accelerator == "gpu") == (gpus >= 1)
        if gpus:
            assert resources["requests"]["nvidia.com/gpu"] == gpus
        # Running generations finish within the grace the pod gets.
        grace = float(env.get("ABL_SHUTDOWN_GRACE_S", 30))
        assert pod_spec(worker)["terminationGracePeriodSeconds"] > grace
        variants[labels["abl.dev/model"], accelerator] += 1
    assert variants == {
        ("abliterated-model", "gpu"): 1,
        ("abliterated-model", "cpu"): 1,
        ("abl-tiny", "cpu"): 1,
    }
    # Each waits for its own model's folder, made by the migrate Job.
    for worker in workers(docs):
        (wait,) = pod_spec(worker)["initContainers"]
        model = worker["spec"]["template"]["metadata"]["labels"]["abl.dev/model"]
        assert wait["command"][:4] == ["python", "-m", "workers.models.prepare", "--wait"]
        assert wait["command"][-1] == model


def test_migrate_job(docs: list[Doc]) -> None:
    (job,) = of_kind(docs, "Job")
    (container,) = pod_spec(job)["containers"]
    assert "abl migrate" in " ".join(container["command"])
    assert {"ABL_DATABASE_URL", "ABL_MIGRATION_DATABASE_URL"} <= set(env_of(container))
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")


def test_only_the_api_gets_its_credentials(docs: list[Doc]) -> None:
    holders = set()
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        for container in containers(doc):
            refs = secret_refs(container)
            if API_CREDENTIALS & set(env_of(container)):
                holders.add(doc["metadata"]["name"])
            if any(secret == "abl-api-secrets" for secret, _ in refs.values()):
                holders.add(doc["metadata"]["name"])
    assert holders == {"abl-api"}
    (api,) = pod_spec(named(docs, "Deployment", "abl-api"))["containers"]
    assert {secret_refs(api)[n] for n in API_CREDENTIALS} == {
        ("abl-api-secrets", "ABL_ADMIN_TOKEN"),
        ("abl-api-secrets", "ABL_JWT_SECRET"),
    }


def test_every_pod_is_locked_down(docs: list[Doc]) -> None:
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        name, pod = doc["metadata"]["name"], pod_spec(doc)
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] != 0, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in containers(doc):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (name, container["name"])
            assert not context.get("privileged"), name
        # A read-only root: where the main container must write is a volume.
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], name


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_only_the_api_and_workers_reach_the_data_stores(docs: list[Doc]) -> None:
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in WORKLOADS
    }
    workers_ = {d["metadata"]["name"] for d in workers(docs)}
    expected = {
        "abl-postgres": ({"abl-api", "abl-migrate", *workers_}, 5432),
        "abl-redis": ({"abl-api", *workers_}, 6379),
    }
    for store, (allowed, port) in expected.items():
        (policy,) = [
            p
            for p in of_kind(docs, "NetworkPolicy")
            if _selects(p["spec"]["podSelector"], pods[store])
        ]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policy["spec"]["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": port}]
        reach = {
            name
            for name, labels in pods.items()
            if any(_selects(peer["podSelector"], labels) for peer in rule["from"])
        }
        assert reach == allowed, store
        assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # this namespace


def test_make_k8s_secrets_writes_strong_values_once(tmp_path: Path) -> None:
    written = write_secret_files(tmp_path / "secrets")
    values: dict[str, str] = {}
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o600
        values |= dict(line.split("=", 1) for line in path.read_text().splitlines())
    assert set(values) == {k for keys in generated_secrets().values() for k in keys}
    for name in ("ABL_ADMIN_TOKEN", "ABL_JWT_SECRET", "POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        assert secret_problem(name, values[name]) is None
    owner = f"postgresql+psycopg://abl:{values['POSTGRES_PASSWORD']}@abl-postgres:5432/"
    assert values["ABL_MIGRATION_DATABASE_URL"].startswith(owner)
    assert values["ABL_DATABASE_URL"].startswith("postgresql+psycopg://abl_app:")
    assert values["POSTGRES_PASSWORD"] not in values["ABL_DATABASE_URL"]
    assert f":{values['REDIS_PASSWORD']}@abl-redis:6379/" in values["ABL_REDIS_URL"]
    with pytest.raises(FileExistsError):
        write_secret_files(tmp_path / "secrets")
