"""deploy/k8s is valid against the Kubernetes schemas (`kubernetes-validate --strict`)
and shaped as docs/operations.md describes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
VALIDATE = str(Path(sys.executable).with_name("kubernetes-validate"))
PING = "celery -A segops_sync inspect ping -d celery@$HOSTNAME"
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "AUTH", "DATABASE_URL")
# The secrets each pod takes: exactly what it uses, so a leak from one pod exposes no more. Beat only sends tasks; the API
# sends tasks and never reads results; Flower never sees the key ring nor the database.
SECRETS_OF = {
    "segops-migrate": {"SEGOPS_DATABASE_URL"},
    "segops-worker": {
        "SEGOPS_DATABASE_URL",
        "SEGOPS_BROKER_URL",
        "SEGOPS_RESULT_BACKEND",
        "SEGOPS_SECRET_KEY",
        "SEGOPS_ALERT_WEBHOOK_SECRET",
    },
    "segops-beat": {"SEGOPS_BROKER_URL"},
    "segops-flower": {"SEGOPS_BROKER_URL", "FLOWER_BASIC_AUTH"},
    "segops-api": {
        "SEGOPS_DATABASE_URL",
        "SEGOPS_BROKER_URL",
        "SEGOPS_SECRET_KEY",
        "SEGOPS_API_TOKEN",
    },
}
# Where each pod may open connections: the cluster DNS, Redis, PostgreSQL, HTTPS out.
REACHES = {
    "segops-migrate": {"dns", "postgres"},
    "segops-worker": {"dns", "redis", "postgres", "https"},
    "segops-beat": {"dns", "redis"},
    "segops-flower": {"dns", "redis"},
    "segops-api": {"dns", "redis", "postgres", "https"},
}
REDIS_LABELS = {"app.kubernetes.io/name": "segops-redis"}
POSTGRES_LABELS = {"app.kubernetes.io/name": "segops-postgres"}


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


def _secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        var["name"]: var["valueFrom"]["secretKeyRef"]
        for var in container.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }


def test_settings_from_a_configmap_and_secrets_from_a_secret(docs: list[dict[str, Any]]) -> None:
    settings = _one(docs, "ConfigMap", "segops-settings")["data"]
    secret = _one(docs, "Secret", "segops-secrets")["stringData"]
    assert {
        "SEGOPS_SECRET_KEY",
        "SEGOPS_API_TOKEN",
        "SEGOPS_DATABASE_URL",
        "SEGOPS_BROKER_URL",
        "SEGOPS_RESULT_BACKEND",
        "FLOWER_BASIC_AUTH",
    } <= set(secret)
    for key, value in secret.items():
        assert "REPLACE-ME" in value, f"{key} must be a clearly marked placeholder"
    for key, value in settings.items():
        assert not any(w in key for w in SECRET_WORDS), key
        assert "@" not in value, f"{key} looks like a URL with credentials: secret.yaml"
    for name, spec in _pod_specs(docs):
        for container in spec["containers"]:
            refs = container["envFrom"]
            assert {"configMapRef": {"name": "segops-settings"}} in refs, name
            # no pod takes the whole Secret: each names the keys it uses
            assert not any("secretRef" in ref for ref in refs), name
            for var in container.get("env", []):  # literal values only for what is not secret
                secret_like = any(w in var["name"] for w in SECRET_WORDS)
                assert not (secret_like and "value" in var), (name, var["name"])
            for var, ref in _secret_refs(container).items():
                assert ref["name"] == "segops-secrets" and ref["key"] == var, (name, var)
                assert ref["key"] in secret or ref.get("optional") is True, (name, var)


def test_each_pod_takes_only_the_secrets_it_uses(docs: list[dict[str, Any]]) -> None:
    pods = dict(_pod_specs(docs))
    assert set(pods) == set(SECRETS_OF)
    for name, spec in pods.items():
        taken: set[str] = set()
        for container in spec.get("initContainers", []) + spec["containers"]:
            taken |= set(_secret_refs(container))
        assert taken == SECRETS_OF[name], name
        assert not spec.get("volumes") or not any("secret" in v for v in spec["volumes"]), name
    flower = pods["segops-flower"]["containers"][0]
    assert "SEGOPS_SECRET_KEY" not in _secret_refs(flower)


def test_redis_urls_carry_the_redis_password(docs: list[dict[str, Any]]) -> None:
    secret = _one(docs, "Secret", "segops-secrets")["stringData"]
    for key in ("SEGOPS_BROKER_URL", "SEGOPS_RESULT_BACKEND"):
        url = urlsplit(secret[key])
        assert url.scheme in ("redis", "rediss"), key
        assert url.password and "REPLACE-ME" in url.password, key
    settings = _one(docs, "ConfigMap", "segops-settings")["data"]
    assert not any(v.startswith(("redis://", "rediss://")) for v in settings.values())


# -- NetworkPolicies: only our pods reach Redis and PostgreSQL ----------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against pod labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        operator = expr["operator"]
        if operator == "In" and value not in expr["values"]:
            return False
        if operator == "NotIn" and value in expr["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _pod_labels(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }


def _policies(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [
        d["spec"]
        for d in docs
        if d["kind"] == "NetworkPolicy" and kind in d["spec"].get("policyTypes", [])
    ]


def test_only_the_pods_that_use_them_may_connect_to_redis_and_postgres(
    docs: list[dict[str, Any]],
) -> None:
    pods = _pod_labels(docs)
    servers = (("redis", REDIS_LABELS, 6379), ("postgres", POSTGRES_LABELS, 5432))
    for server, labels, port in servers:
        guarding = [p for p in _policies(docs, "Ingress") if _selects(p["podSelector"], labels)]
        assert guarding, f"no NetworkPolicy selects the {server} pods"
        allowed: set[str] = set()
        for policy in guarding:
            for rule in policy.get("ingress", []):
                assert [p["port"] for p in rule["ports"]] == [port], server
                for peer in rule["from"]:
                    # a pod selector alone: pods of this namespace, never an address range
                    assert set(peer) == {"podSelector"}, (server, peer)
                    allowed |= {n for n, pl in pods.items() if _selects(peer["podSelector"], pl)}
                    outsider = {"app.kubernetes.io/name": "something-else"}
                    assert not _selects(peer["podSelector"], outsider), server
        assert allowed == {n for n, reach in REACHES.items() if server in reach}, server


def test_every_pod_of_ours_reaches_only_what_it_uses(docs: list[dict[str, Any]]) -> None:
    egress = _policies(docs, "Egress")
    for name, labels in _pod_labels(docs).items():
        mine = [p for p in egress if _selects(p["podSelector"], labels)]
        assert mine, f"{name}: no egress policy, so it may connect anywhere"
        reaches: set[str] = set()
        for policy in mine:
            for rule in policy.get("egress", []):
                ports = {p["port"] for p in rule["ports"]}
                for peer in rule["to"]:
                    if "podSelector" in peer and _selects(peer["podSelector"], REDIS_LABELS):
                        assert ports == {6379}
                        reaches.add("redis")
                    elif "podSelector" in peer and _selects(peer["podSelector"], POSTGRES_LABELS):
                        assert ports == {5432}
                        reaches.add("postgres")
                    elif "namespaceSelector" in peer and ports == {53}:
                        reaches.add("dns")
                    elif "ipBlock" in peer and ports == {443}:
                        reaches.add("https")
                    else:
                        raise AssertionError(f"{name}: unexpected egress {peer} {ports}")
        assert reaches == REACHES[name], name


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
