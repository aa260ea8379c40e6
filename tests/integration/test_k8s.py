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


# --- scheduling: what a real scheduler would check, on nodes as the clouds make them ---------------------
KUBELET_LABELS = {"kubernetes.io/os", "kubernetes.io/arch", "kubernetes.io/hostname", "topology.kubernetes.io/zone",
                  "topology.kubernetes.io/region", "node.kubernetes.io/instance-type"}
QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
         "Ti": 2**40}


def quantity(value: object) -> float:
    number, unit = QUANTITY.match(str(value)).groups()
    return float(number) * UNITS[unit]


def gpu_node(**labels: str) -> dict:
    """A GPU pool node with only the device plugin: GKE/EKS/AKS style taint, no feature-discovery labels."""
    return {"labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": "gpu-1",
                       "topology.kubernetes.io/zone": "zone-a", **labels},
            "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
            "allocatable": {"cpu": "15", "memory": "120Gi", "ephemeral-storage": "100Gi", "nvidia.com/gpu": "4",
                            "pods": "110"}}


def pod_requests(pod: dict) -> dict[str, float]:
    """The pod's effective requests: max(each init container, sum of the app containers); limits stand in
    for missing requests of extended resources (as the API server defaults them)."""
    def of(container: dict) -> dict[str, float]:
        res = container.get("resources", {})
        merged = {**res.get("limits", {}), **res.get("requests", {})}
        return {k: quantity(v) for k, v in merged.items()}

    total: dict[str, float] = {}
    for container in pod["containers"]:
        for key, value in of(container).items():
            total[key] = total.get(key, 0.0) + value
    for container in pod.get("initContainers", []):
        for key, value in of(container).items():
            total[key] = max(total.get(key, 0.0), value)
    return total


def matches(expr: dict, labels: dict[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values", [])
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt"):
        if key not in labels:
            return False
        return int(labels[key]) > int(values[0]) if op == "Gt" else int(labels[key]) < int(values[0])
    raise AssertionError(f"unknown operator {op}")


def why_not_schedulable(pod: dict, node: dict) -> str | None:
    """None when the scheduler's filters (node selector and affinity, taints, resources) admit the pod."""
    labels = node["labels"]
    for key, value in pod.get("nodeSelector", {}).items():
        if labels.get(key) != value:
            return f"nodeSelector {key}={value}"
    required = (pod.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required and not any(all(matches(e, labels) for e in term.get("matchExpressions", []))
                            for term in required["nodeSelectorTerms"]):
        return "node affinity"
    for taint in node["taints"]:
        if taint["effect"] in ("NoSchedule", "NoExecute") and not any(
                t.get("key") == taint["key"] and t.get("operator") in ("Exists", None, "Equal")
                and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
                and t.get("effect") in (None, taint["effect"]) for t in pod.get("tolerations", [])):
            return f"untolerated taint {taint['key']}"
    for key, value in pod_requests(pod).items():
        if value > quantity(node["allocatable"].get(key, 0)):
            return f"insufficient {key}"
    if pod.get("runtimeClassName"):
        return "needs RuntimeClass " + pod["runtimeClassName"]
    return None


def qos_class(pod: dict) -> str:
    """Kubernetes' QoS rules: Guaranteed when every container (init included) has cpu and memory
    limits equal to its requests."""
    guaranteed = True
    for container in containers(pod):
        res = container.get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        for key in ("cpu", "memory"):
            if key not in limits or quantity(requests.get(key, limits[key])) != quantity(limits[key]):
                guaranteed = False
    return "Guaranteed" if guaranteed else "Burstable"


def workload(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc["spec"]["predictor"] if kind == "InferenceService" else doc["spec"]["template"]["spec"]


def test_gpu_pods_schedule_on_a_node_that_advertises_only_nvidia_gpu(rendered: dict[str, dict[str, dict]],
                                                                      kserve: list[dict]) -> None:
    """No NFD/GPU-operator label is required: the nvidia.com/gpu limit and the toleration are what place it."""
    pods = {"gpu overlay": rendered["gpu"]["Deployment"]["spec"]["template"]["spec"],
            "InferenceService": workload(kserve, "InferenceService", "clip-tta")}
    for name, pod in pods.items():
        assert why_not_schedulable(pod, gpu_node()) is None, (name, why_not_schedulable(pod, gpu_node()))
        assert set(pod.get("nodeSelector", {})) <= KUBELET_LABELS, name
        assert "affinity" not in pod and "runtimeClassName" not in pod, name
        no_gpu = gpu_node()
        no_gpu["allocatable"] = {k: v for k, v in no_gpu["allocatable"].items() if k != "nvidia.com/gpu"}
        no_gpu["taints"] = []
        assert why_not_schedulable(pod, no_gpu) == "insufficient nvidia.com/gpu", name  # GPU nodes only
        for constraint in pod.get("topologySpreadConstraints", []):
            # DoNotSchedule would count CPU-only nodes (0 pods) as domains and cap replicas at the GPU nodes
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway", name
    cpu_pod = rendered["cpu"]["Deployment"]["spec"]["template"]["spec"]
    cpu_node = {**gpu_node(), "taints": []}
    assert why_not_schedulable(cpu_pod, cpu_node) is None
    assert why_not_schedulable(cpu_pod, gpu_node()) == "untolerated taint nvidia.com/gpu"  # stays off GPU pools


def test_replicas_spread_over_nodes_and_zones(manifests: dict[str, dict]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]
    spread = {c["topologyKey"]: c for c in pod["spec"]["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("patch, node_labels, fits", [
    ("nfd-affinity.yaml", {}, False),  # no feature discovery: the optional patch must not be the default
    ("nfd-affinity.yaml", {"nvidia.com/gpu.present": "true", "nvidia.com/cuda.driver-version.major": "570"}, False),
    ("nfd-affinity.yaml", {"nvidia.com/gpu.present": "true", "nvidia.com/cuda.driver-version.major": "580"}, True),
    ("runtime-class.yaml", {}, False),
])
def test_optional_gpu_patches(patch: str, node_labels: dict[str, str], fits: bool, tmp_path: Path) -> None:
    """The documented optional patches apply, validate, and do what their comments say (R580+ drivers)."""
    import kubernetes_validate

    optional = K8S / "overlays" / "gpu" / "optional" / patch
    (tmp_path / patch).write_text(optional.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)], "patches": [{"path": patch}]}))
    docs = render(tmp_path)
    deployment = by_kind(docs)["Deployment"]
    kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
    pod = deployment["spec"]["template"]["spec"]
    assert (why_not_schedulable(pod, gpu_node(**node_labels)) is None) is fits
    if patch == "runtime-class.yaml":
        assert pod["runtimeClassName"] == "nvidia"


def test_gpu_pods_are_guaranteed_qos(rendered: dict[str, dict[str, dict]], kserve: list[dict]) -> None:
    assert qos_class(rendered["gpu"]["Deployment"]["spec"]["template"]["spec"]) == "Guaranteed"
    assert qos_class(workload(kserve, "InferenceService", "clip-tta")) == "Guaranteed"
    cpu = rendered["cpu"]["Deployment"]["spec"]["template"]["spec"]  # no CPU limit on purpose (throttling)
    for container in containers(cpu):
        res = container["resources"]
        assert quantity(res["requests"]["memory"]) == quantity(res["limits"]["memory"]), container["name"]


# --- hardening -----------------------------------------------------------------------------------------
WRITABLE_ENV = ("HOME", "RUN_DIR", "PROMETHEUS_MULTIPROC_DIR", "TTA_STATE_DIR", "MODEL_STORE")


def test_pods_are_hardened(overlay: tuple[str, list[dict]], kserve: list[dict]) -> None:
    """Read-only root (every path the code writes is a writable mount), no service-account token,
    no Secret in an environment variable, sized emptyDirs, ephemeral-storage requests."""
    for name, pod in pod_specs(overlay[1] + kserve):
        assert pod.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), (name, volume["name"])
        for container in containers(pod):
            where = (name, container["name"])
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            assert "ephemeral-storage" in container["resources"]["requests"], where
            for env in container.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), (where, env["name"])  # files, not env
            writable = [m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")]
            assert "/tmp" in writable, where
            for env in container.get("env", []):
                if env["name"] in WRITABLE_ENV and not (env["name"] == "MODEL_STORE" and container["name"] != "archive"):
                    assert any(env["value"] == m or env["value"].startswith(m + "/") for m in writable), \
                        (where, env["name"], env["value"])


def test_server_pods_have_a_sized_memory_backed_dev_shm(manifests: dict[str, dict], kserve: list[dict]) -> None:
    for pod in (manifests["Deployment"]["spec"]["template"]["spec"], workload(kserve, "InferenceService", "clip-tta")):
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        (volume,) = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory" and quantity(volume["emptyDir"]["sizeLimit"]) >= 2**29


def test_weights_come_from_the_cache_volume_filled_once(overlay: tuple[str, list[dict]], kserve: list[dict]) -> None:
    """Every container that loads CLIP reads the model-cache PVC read-only and offline; the one Job writes it,
    fetching the same MODEL."""
    for docs in (overlay[1], kserve):
        job = workload(docs, "Job", "clip-tta-fetch-weights")
        (fetch,) = job["containers"]
        job_env = {e["name"]: e.get("value") for e in fetch["env"]}
        assert fetch["args"][:3] == ["tta", "fetch-weights", "$(MODEL)"] and fetch["args"][3] == "--to"
        target = fetch["args"][4]
        (mount,) = [m for m in fetch["volumeMounts"] if m["mountPath"] == target]
        claim = {v["name"]: v for v in job["volumes"]}[mount["name"]]["persistentVolumeClaim"]["claimName"]
        (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim]
        assert "ReadWriteMany" in pvc["spec"]["accessModes"] and not mount.get("readOnly")
        servers = [(n, p) for n, p in pod_specs(docs) if n.split("/")[1] in ("clip-tta",)
                   and not n.startswith("StatefulSet")]
        assert servers
        for name, pod in servers:
            volumes = {v["name"]: v for v in pod["volumes"]}
            for container in containers(pod):
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                if "MODEL" not in env and container["name"] != "torchserve":
                    continue
                assert env["HF_HUB_OFFLINE"] == "1", (name, container["name"])
                cache = [m for m in container["volumeMounts"] if m["mountPath"] == env["HF_HUB_CACHE"]]
                assert cache and cache[0]["readOnly"] is True, (name, container["name"])
                source = volumes[cache[0]["name"]]["persistentVolumeClaim"]
                assert source["claimName"] == claim and source["readOnly"] is True
                if "MODEL" in env:
                    assert env["MODEL"] == job_env["MODEL"], (name, container["name"])
                    assert env["WEIGHTS_DIR"] == env["HF_HUB_CACHE"]  # checked at start: fails fast
        assert not [v for _, p in servers for v in p["volumes"] if v["name"] == "weights" and "emptyDir" in v]


def test_network_policies_choose_namespaces_by_label(overlay: tuple[str, list[dict]], kserve: list[dict]) -> None:
    policies = [d for d in overlay[1] + kserve if d["kind"] == "NetworkPolicy"]
    names = {p["metadata"]["name"] for p in policies}
    assert {"clip-tta", "clip-tta-egress", "clip-tta-redis", "clip-tta-to-redis", "clip-tta-predictor",
            "clip-tta-fetch-weights"} <= names
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                labels = peer.get("namespaceSelector", {}).get("matchLabels", {})
                assert "kubernetes.io/metadata.name" not in labels, policy["metadata"]["name"]  # no literal names
    predictor = next(p for p in policies if p["metadata"]["name"] == "clip-tta-predictor")
    assert predictor["spec"]["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "clip-tta"}
    for name in ("clip-tta", "clip-tta-predictor"):
        policy = next(p for p in policies if p["metadata"]["name"] == name)
        peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
        assert any("namespaceSelector" in p and "podSelector" in p for p in peers), name  # ingress-controller example
    egress = next(p for p in policies if p["metadata"]["name"] == "clip-tta-egress")
    assert {port["port"] for rule in egress["spec"]["egress"] for port in rule["ports"]} == {53}


def test_kserve_requires_a_token_from_a_secret_file(kserve: list[dict]) -> None:
    predictor = workload(kserve, "InferenceService", "clip-tta")
    (container,) = predictor["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    flags = shlex.split(env["ARCHIVE_ARGS"])
    token_file = Path(flags[flags.index("--token-file") + 1])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(token_file.parent)]
    volume = {v["name"]: v for v in predictor["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == "clip-tta-token" and mount["readOnly"] is True


def test_digest_pinning_through_kustomize_images(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
        "images": [{"name": "clip-tta", "newName": "registry.example.com/ml/clip-tta", "digest": digest}]}))
    images = {c["image"] for _, pod in pod_specs(render(tmp_path)) for c in containers(pod)}
    assert f"registry.example.com/ml/clip-tta@{digest}" in images
    assert not any(i.startswith("registry.example.com/ml/clip-tta:") for i in images)


# --- Redis as the manifest configures it, on a real redis-server ---------------------------------------
def test_redis_maxmemory_is_below_the_limit_and_holds_the_state_bound(manifests: dict[str, dict]) -> None:
    from tta.state.redis_log import memory_bound

    redis = manifests["StatefulSet/clip-tta-redis"]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = redis_args(redis)
    maxmemory = quantity(args[args.index("--maxmemory") + 1].replace("mb", "Mi").replace("gb", "Gi"))
    limit = quantity(container["resources"]["limits"]["memory"])
    assert maxmemory <= limit / 2  # the other half: an AOF rewrite fork's copy-on-write, client buffers
    # TDA at ImageNet size (README "Scaling out"): snapshot <= 18 MB, operation ~6 KB, every 1000
    per_owner = memory_bound(18_000_000, 6_000, 1000)
    owners = 5  # tda, tfup, tfup-t, gda, drift: the stream-state owners of one deployment
    assert maxmemory >= 2 * owners * per_owner
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--protected-mode") + 1] == "yes"
    assert "clusterIP" not in manifests["Service/clip-tta-redis"]["spec"]
    headless = manifests[f"Service/{redis['spec']['serviceName']}"]
    assert headless["spec"]["clusterIP"] == "None"
    pdb = manifests["PodDisruptionBudget/clip-tta-redis"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_redis_from_the_manifest_needs_the_password_and_refuses_writes_when_full(manifests: dict[str, dict],
                                                                                 tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """The StatefulSet's own start script, run on a real redis-server (paths and port mapped to tmp)."""
    import redis as redis_py

    from tta.testing.redis_server import free_port, redis_server_binary, terminate

    if redis_server_binary() is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    statefulset = manifests["StatefulSet/clip-tta-redis"]
    script = statefulset["spec"]["template"]["spec"]["containers"][0]["args"][0]
    secret, run, data = tmp_path / "secret", tmp_path / "run", tmp_path / "data"
    for folder in (secret, run, data):
        folder.mkdir()
    password = "s3cretpassword0123"
    (secret / "password").write_text(password)
    port = free_port()
    script = (script.replace("/secrets/redis", str(secret)).replace("/run/redis", str(run))
              .replace("--dir /data", f"--dir {data}").replace("redis-server ", f"{redis_server_binary()} ", 1))
    # the pod's port, loopback only, and a small cap so filling it takes milliseconds (later options win)
    script += f" --port {port} --bind 127.0.0.1 --maxmemory 4mb"
    process = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        anonymous = redis_py.Redis(port=port, socket_timeout=5)
        deadline = __import__("time").monotonic() + 30
        while True:
            try:
                anonymous.ping()
                pytest.fail("Redis answered without the password")
            except redis_py.AuthenticationError:
                break
            except redis_py.ConnectionError:
                assert process.poll() is None and __import__("time").monotonic() < deadline, "redis did not start"
                __import__("time").sleep(0.05)  # poll interval of a deadline loop
        assert (run / "auth.conf").stat().st_mode & 0o077 == 0  # the password file is private
        assert password not in " ".join(Path(f"/proc/{process.pid}/cmdline").read_text().split("\0"))

        from tta.state import redis_log

        monkeypatch.delenv("TTA_STATE_PASSWORD", raising=False)
        monkeypatch.setenv("TTA_STATE_PASSWORD_FILE", str(secret / "password"))
        client = redis_log.client(f"redis://127.0.0.1:{port}/0", 5.0)  # what clip-tta's pods do
        assert client.ping() is True
        assert client.config_get("appendonly")["appendonly"] == "yes"
        chunk = b"x" * 65536
        with pytest.raises(redis_py.exceptions.OutOfMemoryError):
            for i in range(1000):  # 64 MB: far past the cap
                client.set(f"k{i}", chunk)
        assert process.poll() is None and client.ping() is True  # refused the write, still serving
        assert client.get("k0") == chunk
    finally:
        terminate(process, 10)
