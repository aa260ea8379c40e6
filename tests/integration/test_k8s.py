"""The kustomize overlays render offline, validate against the Kubernetes schemas, and their pieces fit."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.torchserve import REPO

K8S = REPO / "k8s"
OVERLAYS = ("gpu", "cpu")
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")


def render(path: Path) -> dict[str, dict]:
    rendered = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True,
                              timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    by_kind: dict[str, dict] = {}
    for doc in docs:
        key = doc["kind"] if doc["kind"] != "ConfigMap" else f"ConfigMap/{doc['metadata']['name'].rsplit('-', 1)[0]}"
        by_kind[key] = doc
    return by_kind


@pytest.fixture(scope="module", params=OVERLAYS)
def manifests(request: pytest.FixtureRequest) -> dict[str, dict]:
    return render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def gpu() -> dict[str, dict]:
    return render(K8S / "overlays" / "gpu")


@pytest.fixture(scope="module")
def cpu() -> dict[str, dict]:
    return render(K8S / "overlays" / "cpu")


def test_builtin_kinds_validate_strictly(manifests: dict[str, dict]) -> None:
    import kubernetes_validate

    for doc in manifests.values():
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: checked by hand below
        kubernetes_validate.validate(doc, "1.32.0", strict=True)
    assert {"Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy", "ServiceMonitor"} <= set(manifests)


def test_only_the_gpu_overlay_asks_for_a_gpu(gpu: dict[str, dict], cpu: dict[str, dict]) -> None:
    def gpus(manifests: dict[str, dict]) -> list[object]:
        pod = manifests["Deployment"]["spec"]["template"]["spec"]
        return [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                for c in pod.get("initContainers", []) + pod["containers"]]

    assert gpus(gpu) == [None, 1] and gpus(cpu) == [None, None]
    gpu_pod, cpu_pod = (m["Deployment"]["spec"]["template"]["spec"] for m in (gpu, cpu))
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"]) and gpu_pod["nodeSelector"]
    assert "tolerations" not in cpu_pod and "nodeSelector" not in cpu_pod


def test_deployment_probes_and_both_metrics_ports(manifests: dict[str, dict]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/ping"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "ts-metrics": 8082, "tta-metrics": 8083}
    selector = manifests["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert manifests["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {manifests["PersistentVolumeClaim"]["metadata"]["name"]}


def test_management_api_stays_inside_the_pod(manifests: dict[str, dict]) -> None:
    config = manifests["ConfigMap/clip-tta-config"]["data"]["config.properties"]
    props = dict(line.split("=", 1) for line in config.splitlines() if line and not line.startswith("#"))
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["metrics_mode"] == "prometheus" and props["enable_model_api"] == "false"
    assert 8081 not in {p["port"] for p in manifests["Service"]["spec"]["ports"]}


def test_service_monitor_scrapes_both_metrics_ports(manifests: dict[str, dict]) -> None:
    monitor, service = manifests["ServiceMonitor"], manifests["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"ts-metrics", "tta-metrics"} <= service_ports


def test_dashboard_queries_only_metrics_the_handler_exports(manifests: dict[str, dict]) -> None:
    from tta.metrics import ServingMetrics

    families = {m.name for m in ServingMetrics().registry.collect()}
    series = {f"{name}{suffix}" for name in families for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    data = manifests["ConfigMap/clip-tta-dashboard"]["data"]
    dashboard = json.loads(data["clip-tta-drift.json"])
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b(tta_[a-z_]+)", expr)}
    assert used and used <= series, used - series
