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
