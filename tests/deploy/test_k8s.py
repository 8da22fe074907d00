"""deploy/k8s (issue 11): valid against the Kubernetes schemas (`kubernetes-validate --strict`)
and shaped as the README describes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
VALIDATE = str(Path(sys.executable).with_name("kubernetes-validate"))
PING = "celery -A segops_sync inspect ping -d celery@$HOSTNAME"
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "AUTH", "DATABASE_URL")


def _validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VALIDATE, "--strict", "--quiet", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in MANIFESTS:
        out.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    ]


def test_every_manifest_passes_strict_schema_validation() -> None:
    assert len(MANIFESTS) >= 8
    result = _validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_an_unknown_field(tmp_path: Path) -> None:
    """--strict is really strict here: a misspelt field in a copy of worker.yaml fails."""
    doc = yaml.safe_load((K8S / "worker.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # not "resources"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert _validate(bad).returncode != 0


def test_deployments_for_workers_beat_flower_and_api(docs: list[dict[str, Any]]) -> None:
    commands = {
        "segops-worker": ["celery", "-A", "segops_sync", "worker"],
        "segops-beat": ["celery", "-A", "segops_sync", "beat"],
        "segops-flower": ["celery", "-A", "segops_sync", "flower"],
        "segops-api": ["segops-sync", "api", "--host", "0.0.0.0"],
    }
    for name, prefix in commands.items():
        deployment = _one(docs, "Deployment", name)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][: len(prefix)] == prefix, name
    beat = _one(docs, "Deployment", "segops-beat")["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"] == {"type": "Recreate"}
    beats = [d for d in docs if d["kind"] == "Deployment" and "beat" in str(d["spec"]["template"])]
    assert len(beats) == 1, "one beat only"


def test_a_migration_job(docs: list[dict[str, Any]]) -> None:
    job = _one(docs, "Job", "segops-migrate")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["segops-sync", "db", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_settings_from_a_configmap_and_secrets_from_a_secret(docs: list[dict[str, Any]]) -> None:
    settings = _one(docs, "ConfigMap", "segops-settings")["data"]
    secret = _one(docs, "Secret", "segops-secrets")["stringData"]
    assert {
        "SEGOPS_SECRET_KEY",
        "SEGOPS_API_TOKEN",
        "SEGOPS_DATABASE_URL",
        "FLOWER_BASIC_AUTH",
    } <= set(secret)
    for key, value in secret.items():
        assert "REPLACE-ME" in value, f"{key} must be a clearly marked placeholder"
    for key in settings:
        assert not any(w in key for w in SECRET_WORDS), key
    for name, spec in _pod_specs(docs):
        for container in spec["containers"]:
            refs = container["envFrom"]
            assert {"configMapRef": {"name": "segops-settings"}} in refs, name
            assert {"secretRef": {"name": "segops-secrets"}} in refs, name
            for var in container.get("env", []):  # literal values only for what is not secret
                secret_like = any(w in var["name"] for w in SECRET_WORDS)
                assert not (secret_like and "value" in var), (name, var["name"])


def test_resource_requests_and_limits_everywhere(docs: list[dict[str, Any]]) -> None:
    specs = _pod_specs(docs)
    assert len(specs) == 5
    for name, spec in specs:
        for container in spec.get("initContainers", []) + spec["containers"]:
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)


def test_every_pod_runs_as_non_root(docs: list[dict[str, Any]]) -> None:
    for name, spec in _pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_worker_liveness_probe_pings_its_own_node(docs: list[dict[str, Any]]) -> None:
    container = _one(docs, "Deployment", "segops-worker")["spec"]["template"]["spec"]["containers"][
        0
    ]
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"], "a shell expands $HOSTNAME"
    assert command[2].startswith(PING)


def test_an_autoscaler_for_the_workers_and_disruption_budgets(docs: list[dict[str, Any]]) -> None:
    hpa = _one(docs, "HorizontalPodAutoscaler", "segops-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "segops-worker",
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    worker_labels = _one(docs, "Deployment", "segops-worker")["spec"]["template"]["metadata"][
        "labels"
    ]
    pdb = _one(docs, "PodDisruptionBudget", "segops-worker")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= worker_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain can still proceed"
