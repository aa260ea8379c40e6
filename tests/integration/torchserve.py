"""Start and stop a real TorchServe on free loopback ports in a private directory.

Each server gets its own working directory (key_file.json and logs land there) and its own
TMPDIR, because `torchserve` keeps its pid file in the temp directory and refuses to start a
second server that shares it. The repository's config.properties is the template: the test
changes only addresses, paths and the model list, so the shipped settings are the ones tested.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tta.testing.redis_server import free_port  # noqa: F401 (re-exported: tests import it from here)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def build_archive(out: Path, name: str, *extra: str) -> Path:
    """`tta archive` through its real command line."""
    cmd = [str(BIN / "tta"), "archive", "--model", "tiny-random", "--name", name, "--out", str(out), "-f", *extra]
    tmp = out.parent / f"{name}-archiver-tmp"  # the archiver stages in $TMPDIR/<name>: keep it private
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    return out / f"{name}.mar"


@dataclass
class TorchServe:
    workdir: Path
    model: str
    inference_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    tta_metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def predict_url(self) -> str:
        return f"{self.url}/predictions/{self.model}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys['inference']}"}

    @property
    def admin(self) -> dict[str, str]:
        """Headers of a privileged state action (reset/import/export/feedback): the inference key
        for the frontend plus the management key as the admin credential (tta.serving.admin)."""
        return {**self.auth, "X-TTA-Admin-Token": self.keys["management"]}

    def env(self) -> dict[str, str]:
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({
            "TMPDIR": str(tmp), "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"), "TTA_METRICS_PORT": str(self.tta_metrics_port),
            "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / "prom"), "HF_HUB_OFFLINE": "1",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        })
        return env

    def write_config(self, model_store: Path, archive: str) -> Path:
        text = (REPO / "config.properties").read_text(encoding="utf-8")
        replacements = {
            "inference_address": f"http://127.0.0.1:{self.inference_port}",
            "management_address": f"http://127.0.0.1:{self.management_port}",
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            "model_store": str(model_store),
            "load_models": f"{self.model}={archive}",
        }
        for key, value in replacements.items():
            text, count = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
            assert count == 1, f"config.properties has no single '{key}=' line"
        # Keep gRPC and the worker sockets (/tmp/.ts.sock.<port>) off the defaults other servers use.
        text += (f"\ngrpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
                 f"initial_worker_port={free_port()}\ninitial_distribution_port={free_port()}\n")
        path = self.workdir / "config.properties"
        path.write_text(text, encoding="utf-8")
        return path

    def start(self, model_store: Path, archive: str, timeout_s: float = 240.0) -> TorchServe:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "prom").mkdir(exist_ok=True)
        config = self.write_config(model_store, archive)
        cmd = [str(BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(config),
               "--model-store", str(model_store)]
        self._stdout = open(self.workdir / "torchserve.out", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(cmd, cwd=self.workdir, env=self.env(), stdout=self._stdout,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(timeout_s)
        except Exception:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Poll key_file.json, then /ping (authorised) until Healthy, or fail with the log tail."""
        deadline = time.monotonic() + timeout_s
        key_file = self.workdir / "key_file.json"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"torchserve exited ({self.process.returncode}):\n{self.log_tail()}")
            if not self.keys and key_file.is_file():
                try:
                    data = json.loads(key_file.read_text())
                    self.keys = {"inference": data["inference"]["key"], "management": data["management"]["key"]}
                except (ValueError, KeyError):
                    pass
            out = self.workdir / "torchserve.out"
            if out.is_file() and "Load model failed" in out.read_text(errors="replace"):
                raise RuntimeError(f"the model failed to load:\n{self.log_tail()}")
            if self.keys and self.model_ready():
                return
            time.sleep(0.25)  # poll interval of a deadline loop, not a fixed wait
        raise TimeoutError(f"TorchServe model {self.model} not ready after {timeout_s}s:\n{self.log_tail()}")

    def model_ready(self) -> bool:
        """/ping says Healthy even with no model loaded, so ask the management API for a READY worker."""
        try:
            reply = requests.get(f"http://127.0.0.1:{self.management_port}/models/{self.model}",
                                 headers={"Authorization": f"Bearer {self.keys['management']}"}, timeout=2)
        except requests.RequestException:
            return False
        if reply.status_code != 200:
            return False
        workers = [w for entry in reply.json() for w in entry.get("workers", [])]
        return any(w.get("status") == "READY" for w in workers)

    def log_tail(self, chars: int = 6000) -> str:
        parts = []
        for path in (self.workdir / "torchserve.out", self.workdir / "logs" / "model_log.log"):
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    @contextlib.contextmanager
    def running(self, model_store: Path, archive: str, timeout_s: float = 240.0) -> Iterator[TorchServe]:
        """Started for the `with` block, stopped afterwards even when a test fails."""
        self.start(model_store, archive, timeout_s)
        try:
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        """`torchserve --stop` (same TMPDIR, so the same pid file), then make sure all is gone."""
        if self.process is None:
            return
        subprocess.run([str(BIN / "torchserve"), "--stop", "--foreground"], cwd=self.workdir, env=self.env(),
                       capture_output=True, timeout=90)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._stdout.close()
        self.process = None
