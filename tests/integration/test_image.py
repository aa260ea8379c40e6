"""The container image builds, serves predictions from TorchServe, and runs as a non-root user.

Slow (builds the whole image: ~10 min, ~6 GB): `pytest -m slow tests/integration/test_image.py -s`.
No Docker engine is needed: `make image` (scripts/build_image.sh) builds with buildah on a local
Debian base, and `buildah run --isolation chroot` starts the image's entrypoint with the host's
network, so TorchServe gets free loopback ports through TS_* environment overrides
(config.properties has enable_envvars_config=true). TorchServe keeps token authorization on (the
image's default config); the key is read from the container's file system.
Set CLIP_TTA_TEST_IMAGE=localhost/clip-tta:TAG to test an image that is already built, and
CLIP_TTA_KEEP_IMAGE=1 to keep the one the test builds. It then runs the image again with
SERVER=kserve (the InferenceService's mode) and checks the KServe adapter gives the same answer.
A second test runs the rendered cpu overlay's pod and the InferenceService's predictor from the image
with a read-only root and only the manifests' writable mounts (`unshare --mount` + chroot, root).
Measured (2 cores, load ~10-14 from other work): build 1096 s, 6.61 GB; the read-only test 205 s
(archive + TorchServe ready 128 s after start), the writable-root test 230 s (first answer 123 s).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.torchserve import BIN, REPO, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),  # the build alone takes ~10 min on 2 cores
    pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah not installed (apt-get install buildah)"),
]
LABELS = ["cat", "dog", "coffee", "rocket", "astronaut"]
ENV = {**os.environ, "STORAGE_DRIVER": os.environ.get("STORAGE_DRIVER", "vfs")}


def buildah(*args: str, timeout: float = 300) -> str:
    return subprocess.run(["buildah", *args], check=True, capture_output=True, text=True, timeout=timeout,
                          env=ENV).stdout.strip()


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """Build with `make image`'s script (report time and size), or reuse CLIP_TTA_TEST_IMAGE."""
    if os.environ.get("CLIP_TTA_TEST_IMAGE"):
        yield os.environ["CLIP_TTA_TEST_IMAGE"]
        return
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (apt-get install mmdebstrap) for the local Debian base")
    name = "localhost/clip-tta:slow-test"
    start = time.monotonic()
    subprocess.run(["bash", str(REPO / "scripts" / "build_image.sh")], check=True, timeout=3600, cwd=REPO,
                   env={**ENV, "IMAGE": name})
    size = buildah("images", "--format", "{{.Size}}", name)
    print(f"\nimage {name}: built in {time.monotonic() - start:.0f} s, {size}")
    try:
        yield name
    finally:
        if os.environ.get("CLIP_TTA_KEEP_IMAGE") != "1":
            buildah("rmi", "-f", name)


def container_processes(mark: str) -> list[int]:
    """Host pids of the container's processes (chroot isolation shares the host's pid namespace):
    those that inherited the marker variable the test started the entrypoint with."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_image_serves_predictions_as_non_root(image: str, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # mounted into the container, read by its non-root user
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    photo = tmp_path / "cat.jpg"
    from tests.integration.conftest import jpeg_bytes

    photo.write_bytes(jpeg_bytes("chelsea"))
    ports = {key: free_port() for key in ("inference", "management", "metrics", "tta", "grpc_i", "grpc_m", "worker")}
    env = {
        "MODEL": "tiny-random", "LABELS_FILE": "/labels/labels.txt", "NAME": "clip",
        "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports['inference']}",
        "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports['management']}",
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports['metrics']}",
        "TTA_METRICS_ADDRESS": "127.0.0.1", "TTA_METRICS_PORT": str(ports["tta"]),
        "TS_GRPC_INFERENCE_PORT": str(ports["grpc_i"]), "TS_GRPC_MANAGEMENT_PORT": str(ports["grpc_m"]),
        "TS_INITIAL_WORKER_PORT": str(ports["worker"]), "HF_HUB_OFFLINE": "1",
    }
    mark = f"CLIP_TTA_IMAGE_TEST={uuid.uuid4().hex}"
    started = time.monotonic()
    ctr = buildah("from", image)
    process = None
    log = tmp_path / "container.log"
    try:
        root = Path(buildah("mount", ctr))
        assert buildah("run", "--isolation", "chroot", ctr, "id", "-u") != "0"  # the image's default user
        args = ["buildah", "run", "--isolation", "chroot", "-v", f"{tmp_path}:/labels:ro"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        args += ["--env", mark]
        with open(log, "wb") as out:
            process = subprocess.Popen([*args, ctr, "/app/docker/entrypoint.sh"], stdout=out,
                                       stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        key_file, keys = root / "app" / "key_file.json", None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # archive build + TorchServe start + worker load
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            if keys is None and key_file.is_file():
                try:
                    keys = json.loads(key_file.read_text())
                except ValueError:
                    keys = None  # being written
            if keys and "serve: ready" in log.read_text(errors="replace"):
                break
            time.sleep(1)  # poll interval of a deadline loop
        else:
            pytest.fail(f"not ready in 600 s:\n{log.read_text(errors='replace')[-4000:]}")
        print(f"TorchServe in the image answering {time.monotonic() - started:.0f} s after start "
              f"(archive built from MODEL=tiny-random at start)")

        reply = requests.post(f"{env['TS_INFERENCE_ADDRESS']}/predictions/clip", data=photo.read_bytes(),
                              headers={"Authorization": f"Bearer {keys['inference']['key']}",
                                       "Content-Type": "image/jpeg"}, timeout=120)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["method"] == "zeroshot" and {t["label"] for t in answer["top_k"]} == set(LABELS)
        # the same code on the host gives the same answer (tiny-random weights are seeded)
        host = subprocess.run([str(BIN / "tta"), "predict", "--model", "tiny-random", "--labels-file", str(labels),
                               str(photo)], check=True, capture_output=True, text=True, timeout=300).stdout
        expected = json.loads(host.splitlines()[0])
        assert answer["label"] == expected["label"]
        assert [t["label"] for t in answer["top_k"]] == [t["label"] for t in expected["top_k"]]
        assert answer["score"] == pytest.approx(expected["score"], abs=1e-3)

        unauthorised = requests.post(f"{env['TS_INFERENCE_ADDRESS']}/predictions/clip", data=photo.read_bytes(),
                                     headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert unauthorised.status_code in (400, 401)  # token authorization stays on in the image

        pids = container_processes(mark)
        commands = {pid: cmdline(pid) for pid in pids}
        assert any("org.pytorch.serve.ModelServer" in c for c in commands.values()), commands
        assert any("model_service_worker" in c for c in commands.values()), commands
        assert all(uid_of(pid) != 0 for pid in pids), {pid: (uid_of(pid), c) for pid, c in commands.items()}

        # SIGTERM (what `docker stop` / the kubelet send): drain, stop TorchServe, exit
        serve = next(pid for pid, c in commands.items() if "scripts/serve.sh" in c)
        os.kill(serve, signal.SIGTERM)
        assert process.wait(timeout=120) == 0
        assert "probe: drain done" in log.read_text(errors="replace")
        assert not container_processes(mark)

        # SERVER=kserve (the InferenceService's mode): same image, KServe's model server, same answer
        kserve_log = tmp_path / "kserve.log"
        port = free_port()
        with open(kserve_log, "wb") as out:
            process = subprocess.Popen(
                [*args, "--env", "SERVER=kserve", "--env", f"HTTP_PORT={port}", "--env", "ARCHIVE_ARGS=--no-grpc",
                 "--env", "TTA_METRICS_PORT=0", ctr, "/app/docker/entrypoint.sh"],
                stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert process.poll() is None, kserve_log.read_text(errors="replace")[-4000:]
            try:
                if requests.get(f"{url}/v2/models/clip/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)  # poll interval of a deadline loop
        else:
            pytest.fail(f"KServe not ready in 600 s:\n{kserve_log.read_text(errors='replace')[-4000:]}")
        reply = requests.post(f"{url}/v1/models/clip:predict", timeout=120,
                              json={"image": base64.b64encode(photo.read_bytes()).decode()})
        assert reply.status_code == 200, reply.text
        assert reply.json()["label"] == expected["label"]
        kserve_pids = container_processes(mark)
        assert kserve_pids and all(uid_of(pid) != 0 for pid in kserve_pids)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        for pid in container_processes(mark):
            os.kill(pid, signal.SIGKILL)
        buildah("umount", ctr)
        buildah("rm", ctr)


# --- a read-only root with exactly the manifests' writable mounts ---------------------------------------
def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values and args."""
    import re

    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


class Pod:
    """Run a pod spec's containers from the image the way a container runtime does for the pods: the
    image's root file system read-only, the pod's volumes mounted where the manifest says (emptyDirs as
    fresh folders shared by the pod's containers, a ConfigMap as its files, PVCs as folders), the pod's
    uid/gid/fsGroup, the container's env, the image's entrypoint. A mount namespace (`unshare --mount`)
    + chroot; the host network, so TorchServe's ports are moved to free ones through TS_* variables."""

    def __init__(self, root: Path, pod: dict, volumes: dict[str, Path], image_env: dict[str, str], workdir: str,
                 mark: str) -> None:
        self.root, self.pod, self.volumes, self.image_env, self.workdir, self.mark = (
            root, pod, volumes, image_env, workdir, mark)
        ctx = pod["securityContext"]
        self.user = f"{ctx['runAsUser']}:{ctx['runAsGroup']}"
        self.groups = str(ctx.get("fsGroup", ctx["runAsGroup"]))

    def script(self, container: dict, extra_mounts: dict[str, Path], command: list[str], env: dict[str, str]) -> str:
        import shlex

        root = shlex.quote(str(self.root))
        mounts = [(m["mountPath"], self.volumes[m["name"]], bool(m.get("readOnly")))
                  for m in container.get("volumeMounts", [])]
        mounts += [(path, host, True) for path, host in extra_mounts.items()]
        lines = ["set -e"]
        for path, _, _ in mounts:  # mount points, made before the root turns read-only (as runc does)
            lines.append(f"mkdir -p {root}{shlex.quote(path)}")
        lines += [f"mount --bind {root} {root}", f"mount -o remount,bind,ro {root}",
                  f"mount -t proc proc {root}/proc", f"mount --rbind /dev {root}/dev",
                  f"mount --rbind /sys {root}/sys"]
        for path, host, read_only in mounts:
            target = f"{root}{shlex.quote(path)}"
            lines.append(f"mount --bind {shlex.quote(str(host))} {target}")
            if read_only:
                lines.append(f"mount -o remount,bind,ro {target}")
        env_args = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        inner = f"cd {shlex.quote(self.workdir)} && exec " + " ".join(shlex.quote(c) for c in command)
        lines.append(f"exec chroot --userspec={self.user} --groups={self.groups} {root} "
                     f"/usr/bin/env -i {env_args} /bin/sh -c {shlex.quote(inner)}")
        return "\n".join(lines)

    def env(self, container: dict, overrides: dict[str, str]) -> dict[str, str]:
        env = dict(self.image_env)
        for item in container.get("env", []):
            env[item["name"]] = expand(item.get("value", ""), env)
        env.update(overrides)
        env[self.mark.split("=")[0]] = self.mark.split("=")[1]
        return env

    def start(self, container: dict, overrides: dict[str, str], log: Path, extra_mounts: dict[str, Path],
              command: list[str] | None = None) -> subprocess.Popen:
        env = self.env(container, overrides)
        command = command or [expand(a, env) for a in (container.get("args") or [])] or ["/app/docker/entrypoint.sh"]
        script = self.script(container, extra_mounts, command, env)
        with open(log, "ab") as out:
            return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, container: dict, overrides: dict[str, str], log: Path, extra_mounts: dict[str, Path],
            command: list[str] | None = None, timeout: float = 600) -> int:
        process = self.start(container, overrides, log, extra_mounts, command)
        try:
            return process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def pod_volumes(pod: dict, docs: list[dict], tmp: Path) -> dict[str, Path]:
    """A host folder per volume of the pod: emptyDir fresh, configMap filled with its data, PVC empty."""
    out = {}
    for volume in pod["volumes"]:
        folder = tmp / "volumes" / volume["name"]
        folder.mkdir(parents=True)
        if "configMap" in volume:
            (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
            for key, text in cm["data"].items():
                (folder / key).write_text(text, encoding="utf-8")
            folder.chmod(0o755)
        else:
            os.chown(folder, -1, int(pod["securityContext"].get("fsGroup", 0)))
            folder.chmod(0o2775)  # the fsGroup's, group-writable: what the kubelet does for emptyDirs and PVCs
        out[volume["name"]] = folder
    return out


def wait_until(check, process: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{what}: exited {process.returncode}:\n" + log.read_text(errors="replace")[-4000:]
        if check():
            return
        time.sleep(1)  # poll interval of a deadline loop
    pytest.fail(f"{what}: not ready in {timeout:.0f} s:\n" + log.read_text(errors="replace")[-4000:])


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare (mounts)")
def test_image_serves_with_a_read_only_root_and_the_manifests_mounts(image: str, tmp_path: Path) -> None:
    """The single-replica cpu overlay's pod (archive init container, then TorchServe) and the KServe
    InferenceService's predictor, run from the image with a read-only root: both answer a prediction."""
    from tests.integration.conftest import jpeg_bytes
    from tests.integration.test_k8s import K8S, render, without_redis

    tmp_path.chmod(0o755)
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    (labels_dir / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    photo = jpeg_bytes("chelsea")
    (tmp_path / "overlay").mkdir()
    docs = render(without_redis("cpu", tmp_path / "overlay"))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    ctr = buildah("from", image)
    mark = f"CLIP_TTA_IMAGE_TEST={uuid.uuid4().hex}"
    processes: list[subprocess.Popen] = []
    try:
        root = Path(buildah("mount", ctr))
        config = json.loads(buildah("inspect", "--type", "image", image))["OCIv1"]["config"]
        image_env = dict(e.split("=", 1) for e in config.get("Env", []))
        runner = Pod(root, pod, pod_volumes(pod, docs, tmp_path), image_env, config.get("WorkingDir") or "/", mark)
        extra = {"/labels": labels_dir}
        # the root really is read-only, and only the manifest's mounts are writable
        (archive,) = pod["initContainers"]
        probe_log = tmp_path / "probe.log"
        assert runner.run(archive, {}, probe_log, extra, ["sh", "-c", "touch /app/x"], timeout=60) != 0
        assert "Read-only file system" in probe_log.read_text(errors="replace")
        assert runner.run(archive, {}, probe_log, extra, ["sh", "-c", "touch /tmp/x /models/x"], timeout=60) == 0

        started = time.monotonic()
        init_log = tmp_path / "archive.log"
        common = {"MODEL": "tiny-random", "LABELS_FILE": "/labels/labels.txt"}
        assert runner.run(archive, common, init_log, extra) == 0, init_log.read_text(errors="replace")[-4000:]
        assert (runner.volumes["models"] / "clip.mar").is_file()

        ports = {key: free_port() for key in ("inference", "management", "metrics", "tta", "grpc_i", "grpc_m", "worker")}
        (server,) = pod["containers"]
        overrides = {
            **common,
            "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports['inference']}",
            "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports['management']}",
            "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports['metrics']}",
            "TTA_METRICS_ADDRESS": "127.0.0.1", "TTA_METRICS_PORT": str(ports["tta"]),
            "TS_GRPC_INFERENCE_PORT": str(ports["grpc_i"]), "TS_GRPC_MANAGEMENT_PORT": str(ports["grpc_m"]),
            "TS_INITIAL_WORKER_PORT": str(ports["worker"]),
        }
        log = tmp_path / "torchserve.log"
        process = runner.start(server, overrides, log, extra)
        processes.append(process)
        ready = server["readinessProbe"]["exec"]["command"]  # the kubelet's exec probe, in the container

        def probe() -> bool:
            return runner.run(server, overrides, probe_log, extra, ready, timeout=60) == 0

        wait_until(probe, process, log, 600, "TorchServe (read-only root)")
        print(f"read-only pod: archive built and TorchServe ready {time.monotonic() - started:.0f} s after start")
        reply = requests.post(f"{overrides['TS_INFERENCE_ADDRESS']}/predictions/clip", data=photo,
                              headers={"Content-Type": "image/jpeg"}, timeout=120)  # the cluster config: no token
        assert reply.status_code == 200, reply.text
        assert {t["label"] for t in reply.json()["top_k"]} == set(LABELS)
        assert (runner.volumes["tmp"] / "ts" / "logs").is_dir()  # TorchServe's run dir is on the emptyDir
        assert all(uid_of(pid) == pod["securityContext"]["runAsUser"] for pid in container_processes(mark))
        serve = next(pid for pid in container_processes(mark) if "scripts/serve.sh" in cmdline(pid))
        os.kill(serve, signal.SIGTERM)
        assert process.wait(timeout=120) == 0
        assert "probe: drain done" in log.read_text(errors="replace")

        # the InferenceService's predictor (KServe adapter), with its Secret token file
        kserve = render(K8S / "kserve")
        (isvc,) = [d for d in kserve if d["kind"] == "InferenceService"]
        predictor = isvc["spec"]["predictor"]
        (tmp_path / "kserve").mkdir()
        volumes = pod_volumes(predictor, kserve, tmp_path / "kserve")
        token = uuid.uuid4().hex
        (volumes["token"] / "token").write_text(token)
        kserve_runner = Pod(root, predictor, volumes, image_env, config.get("WorkingDir") or "/", mark)
        (container,) = predictor["containers"]
        port = free_port()
        args = next(e["value"] for e in container["env"] if e["name"] == "ARCHIVE_ARGS").replace("--device cuda ", "")
        kserve_log = tmp_path / "kserve.log"
        process = kserve_runner.start(container, {**common, "HTTP_PORT": str(port), "ARCHIVE_ARGS": args,
                                                  "TTA_METRICS_PORT": "0"}, kserve_log, extra)
        processes.append(process)
        url = f"http://127.0.0.1:{port}"

        def kserve_ready() -> bool:
            try:
                return requests.get(f"{url}{container['readinessProbe']['httpGet']['path']}", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(kserve_ready, process, kserve_log, 600, "KServe (read-only root)")
        body = {"image": base64.b64encode(photo).decode()}
        assert requests.post(f"{url}/v1/models/clip:predict", json=body, timeout=120).status_code == 401
        reply = requests.post(f"{url}/v1/models/clip:predict", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["label"] in LABELS
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)
        for pid in container_processes(mark):
            os.kill(pid, signal.SIGKILL)
        buildah("umount", ctr)
        buildah("rm", ctr)
