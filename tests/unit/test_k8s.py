"""infra/deploy/k8s manifests: kinds, selectors that match their pods, references that resolve, and
environment names that processes actually read."""

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from contract.catalog import load_catalog
from infra.cli.settings_doc import env_names

K8S = Path(__file__).resolve().parents[2] / "infra" / "deploy" / "k8s"
NAMESPACE = "abl"
WORKLOADS = ("Deployment", "StatefulSet", "Job")
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
    for kind in ("Namespace", "Secret", "ConfigMap", "Job", "HorizontalPodAutoscaler"):
        assert kinds[kind] == 1, kind
    assert kinds["StatefulSet"] == 2 and kinds["Service"] == 3
    assert kinds["Deployment"] == 3  # the API, and the default model's GPU and CPU workers
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


def test_references_resolve(docs: list[Doc]) -> None:
    secret_keys = {k for s in of_kind(docs, "Secret") for k in s["stringData"]}
    config_keys = {k for c in of_kind(docs, "ConfigMap") for k in c["data"]}
    claims = {c["metadata"]["name"] for c in of_kind(docs, "PersistentVolumeClaim")}
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        for container in containers(doc):
            for ref in container.get("envFrom", []):
                named(docs, "ConfigMap", ref["configMapRef"]["name"])
            for value in env_of(container).values():
                if isinstance(value, dict) and "secretKeyRef" in value:
                    named(docs, "Secret", value["secretKeyRef"]["name"])
                    assert value["secretKeyRef"]["key"] in secret_keys
        for volume in pod_spec(doc).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert {i["key"] for i in volume["configMap"]["items"]} <= config_keys


def test_environment_names_are_settings(docs: list[Doc]) -> None:
    known = env_names()
    names = {k for c in of_kind(docs, "ConfigMap") for k in c["data"] if k.startswith("ABL_")}
    names |= {k for s in of_kind(docs, "Secret") for k in s["stringData"] if k.startswith("ABL_")}
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
    assert variants == {("abliterated-model", "gpu"): 1, ("abliterated-model", "cpu"): 1}


def test_migrate_job(docs: list[Doc]) -> None:
    (job,) = of_kind(docs, "Job")
    (container,) = pod_spec(job)["containers"]
    assert "abl migrate" in " ".join(container["command"])
    assert {"ABL_DATABASE_URL", "ABL_MIGRATION_DATABASE_URL"} <= set(env_of(container))
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")
