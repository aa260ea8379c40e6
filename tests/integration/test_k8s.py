"""The kustomize overlays render offline, validate against current Kubernetes schemas, and their pieces fit.

Rendered with the real `kubectl kustomize`; built-in kinds validated strictly by kubernetes-validate
(the newest Kubernetes version it ships); custom resources (ServiceMonitor, PrometheusRule,
InferenceService) checked by hand for the fields their CRDs require. The autoscaler's metric is
checked end to end: HPA name == prometheus-adapter rule name, and the series the rule reads is one a
live tiny-random TorchServe (the session server) really exports. docker/probe.py, which the pods use
for readiness and the preStop drain, runs against that live server too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import yaml

from tests.integration.torchserve import REPO, TorchServe

K8S = REPO / "k8s"
OVERLAYS = ("gpu", "cpu")
MANAGEMENT_PORT = 8081
CRD_GROUPS = ("monitoring.coreos.com", "serving.kserve.io")
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")


def render(path: Path) -> list[dict]:
    rendered = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True,
                              timeout=120).stdout
    return [d for d in yaml.safe_load_all(rendered) if d]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    """Kind -> document; ConfigMaps keyed by their name without the generator's hash suffix."""
    out: dict[str, dict] = {}
    for doc in docs:
        kind = doc["kind"]
        if kind in ("ConfigMap", "Secret"):
            kind = f"{kind}/{doc['metadata']['name'].rsplit('-', 1)[0]}"
        elif kind in ("Service", "NetworkPolicy", "StatefulSet", "PodDisruptionBudget", "PersistentVolumeClaim",
                      "Job") and doc["metadata"]["name"] not in ("clip-tta", "clip-tta-data"):
            kind = f"{kind}/{doc['metadata']['name']}"
        assert kind not in out, f"two {kind} documents"
        out[kind] = doc
    return out


def without_redis(overlay: str, tmp: Path) -> Path:
    """The overlay with its redis component line removed (paths made absolute), as a user would edit it."""
    source = K8S / "overlays" / overlay
    text = (source / "kustomization.yaml").read_text(encoding="utf-8")
    text, removed = re.subn(r"^\s*- \.\./\.\./components/redis.*\n", "", text, flags=re.M)
    assert removed == 1, "the overlay no longer lists the redis component"
    text = re.sub(r"(?m)^(\s*-\s*)\.\./\.\./", rf"\g<1>{os.path.relpath(K8S, tmp)}/", text)  # no absolute roots
    for patch in source.glob("*.yaml"):  # the overlay's own patches, next to its kustomization
        if patch.name != "kustomization.yaml":
            shutil.copy(patch, tmp / patch.name)
    (tmp / "kustomization.yaml").write_text(text, encoding="utf-8")
    return tmp


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def manifests(overlay: tuple[str, list[dict]]) -> dict[str, dict]:
    return by_kind(overlay[1])


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict]]:
    return {name: by_kind(render(K8S / "overlays" / name)) for name in OVERLAYS}


@pytest.fixture(scope="module")
def kserve() -> list[dict]:
    return render(K8S / "kserve")


@pytest.fixture(scope="module")
def adapter_rule() -> dict:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text(encoding="utf-8"))
    (rule,) = values["rules"]["custom"]
    return rule


def pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    """(name, pod spec) of every workload, the InferenceService's predictor included."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]
        elif doc["kind"] == "InferenceService":
            yield f"InferenceService/{doc['metadata']['name']}", doc["spec"]["predictor"]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def redis_args(statefulset: dict) -> list[str]:
    """redis-server's options from the StatefulSet's start script (`... exec redis-server FILE --opt v ...`)."""
    script = statefulset["spec"]["template"]["spec"]["containers"][0]["args"][0]
    return shlex.split(script.split("exec redis-server", 1)[1])[1:]


# --- schemas -------------------------------------------------------------------------------------------
def test_builtin_kinds_validate_strictly(overlay: tuple[str, list[dict]], kserve: list[dict]) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    checked = set()
    for doc in overlay[1] + kserve:
        if doc["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue  # custom resources: checked field by field below
        kubernetes_validate.validate(doc, version, strict=True)
        checked.add(doc["kind"])
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "StatefulSet", "ConfigMap", "Job", "PersistentVolumeClaim"} <= checked


def test_custom_resources_have_their_required_fields(manifests: dict[str, dict], kserve: list[dict]) -> None:
    crds = [d for d in list(manifests.values()) + kserve if d["apiVersion"].split("/")[0] in CRD_GROUPS]
    kinds = {d["kind"] for d in crds}
    assert {"ServiceMonitor", "InferenceService"} <= kinds
    for doc in crds:
        assert doc["metadata"].get("name") and isinstance(doc.get("spec"), dict), doc["kind"]
        spec = doc["spec"]
        if doc["kind"] == "ServiceMonitor":
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert spec["selector"]["matchLabels"] and spec["endpoints"]
            assert all(e.get("port") or e.get("targetPort") for e in spec["endpoints"])
        elif doc["kind"] == "PrometheusRule":
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and spec["groups"]
            for group in spec["groups"]:
                assert group["name"] and group["rules"]
                for rule in group["rules"]:
                    assert rule.get("expr") and bool(rule.get("record")) != bool(rule.get("alert")), rule
        elif doc["kind"] == "InferenceService":
            assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
            predictor = spec["predictor"]
            (container,) = predictor["containers"]
            assert container["name"] == "kserve-container" and container["image"]
            assert {p["containerPort"] for p in container["ports"]} == {8080}
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["SERVER"] == "kserve"  # the KServe adapter (tta serve --server kserve)
            assert container["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{env['NAME']}/ready"
            assert predictor["maxReplicas"] == 1  # no shared state: never two pods running stream methods


# --- how the pieces fit --------------------------------------------------------------------------------
def test_only_the_gpu_overlay_asks_for_a_gpu(rendered: dict[str, dict[str, dict]]) -> None:
    def gpus(manifests: dict[str, dict]) -> list[object]:
        pod = manifests["Deployment"]["spec"]["template"]["spec"]
        return [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in containers(pod)]

    assert gpus(rendered["gpu"]) == [None, 1] and gpus(rendered["cpu"]) == [None, None]
    gpu_pod, cpu_pod = (rendered[o]["Deployment"]["spec"]["template"]["spec"] for o in ("gpu", "cpu"))
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert "tolerations" not in cpu_pod
    device = {o: {e["name"]: e.get("value") for e in rendered[o]["Deployment"]["spec"]["template"]["spec"]
                  ["initContainers"][0]["env"]}["DEVICE_TYPE"] for o in OVERLAYS}
    assert device == {"gpu": "gpu", "cpu": "cpu"}


def test_no_container_runs_as_root(overlay: tuple[str, list[dict]], kserve: list[dict]) -> None:
    pods = list(pod_specs(overlay[1] + kserve))
    assert len(pods) == 5  # clip-tta, its Redis, the weights Job (overlay and KServe), the InferenceService
    for name, pod in pods:
        pod_ctx = pod.get("securityContext", {})
        for container in containers(pod):
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, (name, container["name"])
            assert ctx.get("runAsUser", 0) != 0, (name, container["name"])
            assert ctx.get("allowPrivilegeEscalation") is False, (name, container["name"])


def test_no_service_exposes_the_management_port(manifests: dict[str, dict], kserve: list[dict]) -> None:
    config = manifests["ConfigMap/clip-tta-config"]["data"]["config.properties"]
    props = dict(line.split("=", 1) for line in config.splitlines() if line and not line.startswith("#"))
    assert props["management_address"] == f"http://127.0.0.1:{MANAGEMENT_PORT}"
    assert props["metrics_mode"] == "prometheus" and props["enable_model_api"] == "false"
    services = [d for d in manifests.values() if d["kind"] == "Service"]
    assert services
    for service in services:
        for port in service["spec"]["ports"]:
            assert MANAGEMENT_PORT not in (port["port"], port.get("targetPort")), service["metadata"]["name"]
    for _, pod in pod_specs(list(manifests.values()) + kserve):
        for container in containers(pod):
            assert all(p["containerPort"] != MANAGEMENT_PORT for p in container.get("ports", []))


def test_deployment_probes_drain_and_ports(manifests: dict[str, dict]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ready = ["python3", "-I", "/app/docker/probe.py", "ready"]
    assert container["readinessProbe"]["exec"]["command"] == ready  # model loaded, not just /ping
    assert container["startupProbe"]["exec"]["command"] == ready
    assert container["livenessProbe"]["httpGet"]["path"] == "/ping"
    drain = container["lifecycle"]["preStop"]["exec"]["command"]
    assert drain[:4] == ["python3", "-I", "/app/docker/probe.py", "drain"]
    budget = float(drain[drain.index("--delay") + 1]) + float(drain[drain.index("--timeout") + 1])
    assert budget < pod["spec"]["terminationGracePeriodSeconds"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "ts-metrics": 8082, "tta-metrics": 8083}
    selector = manifests["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert manifests["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_images_are_pinned_by_tag(overlay: tuple[str, list[dict]], kserve: list[dict]) -> None:
    images = {c["image"] for _, pod in pod_specs(overlay[1] + kserve) for c in containers(pod)}
    assert {i.split(":")[0] for i in images} == {"clip-tta", "redis"}
    for image in images:
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", image


def test_with_redis_replicas_share_state_and_roll(manifests: dict[str, dict]) -> None:
    deployment = manifests["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    url = urlparse(env["TTA_STATE_URL"]["value"])
    assert url.scheme == "redis" and url.password is None  # no secret in the URL
    assert f"Service/{url.hostname}" in manifests and url.port == 6379
    redis = manifests["StatefulSet/clip-tta-redis"]
    # one Secret, two readers: clip-tta's password file and redis-server's requirepass
    password_file = Path(env["TTA_STATE_PASSWORD_FILE"]["value"])
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(password_file.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    redis_pod = redis["spec"]["template"]["spec"]
    assert volume["secret"]["secretName"] in {v.get("secret", {}).get("secretName") for v in redis_pod["volumes"]}
    assert str(password_file) in redis_pod["containers"][0]["args"][0]
    args = redis_args(redis)
    assert args[args.index("--appendonly") + 1] == "yes" and redis["spec"]["volumeClaimTemplates"]
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert "TTA_STATE_DIR" not in env and "PersistentVolumeClaim" not in manifests  # nothing pins a pod to a node
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"] and hpa["maxReplicas"] > 1


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_without_redis_one_replica_runs_stream_methods(overlay_name: str, tmp_path: Path) -> None:
    """Removing the redis component leaves a single replica: no autoscaler, Recreate, state on the PVC."""
    manifests = by_kind(render(without_redis(overlay_name, tmp_path)))
    deployment = manifests["Deployment"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    assert "HorizontalPodAutoscaler" not in manifests and "StatefulSet/clip-tta-redis" not in manifests
    env = {e["name"] for e in deployment["template"]["spec"]["containers"][0]["env"]}
    assert "TTA_STATE_URL" not in env and "TTA_STATE_DIR" in env
    assert "PersistentVolumeClaim" in manifests


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


# --- the autoscaler's metric, against a live server ----------------------------------------------------
def test_hpa_metric_is_the_adapter_rule_over_a_rate(manifests: dict[str, dict], adapter_rule: dict) -> None:
    (metric,) = manifests["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert manifests["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert metric["pods"]["metric"]["name"] == adapter_rule["name"]["as"]
    assert adapter_rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # a per-pod metric
    series = re.match(r"^(\w+)\{", adapter_rule["seriesQuery"]).group(1)
    assert re.fullmatch(adapter_rule["name"]["matches"], series)
    assert "rate(<<.Series>>" in adapter_rule["metricsQuery"]  # TorchServe's latency metrics are counters


@pytest.mark.server
def test_the_adapter_reads_a_series_the_server_exports(server: TorchServe, photos: dict[str, bytes],
                                                       adapter_rule: dict) -> None:
    reply = requests.post(server.predict_url, data=photos["chelsea"], timeout=120,
                          headers={**server.auth, "Content-Type": "image/jpeg"})
    assert reply.status_code == 200, reply.text
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    series = re.match(r"^(\w+)\{", adapter_rule["seriesQuery"]).group(1)
    assert re.search(rf"^# TYPE {series} counter$", text, re.M), f"{series} is not a counter TorchServe exports"
    values = [float(v) for v in re.findall(rf"^{series}\{{[^}}]*\}} (\S+)$", text, re.M)]
    assert values and sum(values) > 0


@pytest.mark.server
def test_probe_ready_and_drain_against_the_live_server(server: TorchServe, photos: dict[str, bytes]) -> None:
    env = {**os.environ, "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{server.management_port}",
           "KEY_FILE": str(server.workdir / "key_file.json"), "TTA_METRICS_PORT": str(server.tta_metrics_port)}
    probe = [sys.executable, "-I", str(REPO / "docker" / "probe.py")]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*probe, *args], env=env, capture_output=True, text=True, timeout=60)

    assert run("ready", "--model", server.model).returncode == 0
    assert run("ready", "--model", "no-such-model").returncode == 1
    requests.post(server.predict_url, data=photos["coffee"], headers={**server.auth, "Content-Type": "image/jpeg"},
                  timeout=120).raise_for_status()
    metrics = requests.get(f"http://127.0.0.1:{server.tta_metrics_port}/metrics", timeout=10).text
    assert re.search(r"^tta_requests_in_flight\{[^}]*\} 0\.0$", metrics, re.M), "no in-flight gauge at rest"
    drained = run("drain", "--model", server.model, "--delay", "0", "--timeout", "20")
    assert drained.returncode == 0 and "drain done" in drained.stderr
