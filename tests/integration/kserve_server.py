"""Start and stop `tta serve --server kserve` on free ports in a private directory (tests, bench)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.integration.torchserve import BIN, free_port


@dataclass
class KServe:
    """`tta serve --server kserve` in a subprocess, on free ports, logging to its work directory."""

    workdir: Path
    model: str
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))  # privileged state actions
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}  # gRPC metadata keys must be lower-case

    @property
    def admin(self) -> dict[str, str]:
        """Headers of a privileged state action (reset/import/export/feedback; tta.serving.admin)."""
        return {**self.auth, "x-tta-admin-token": self.admin_token}

    @property
    def log(self) -> Path:
        return self.workdir / "kserve.log"

    @contextlib.contextmanager
    def running(self, labels_file: Path, *extra: str, clip: str = "tiny-random",
                timeout_s: float = 180.0, require_token: bool = True) -> Iterator[KServe]:
        """Serving for the `with` block (a bearer token required unless `require_token` is
        false: tools such as perf_analyzer send no metadata over gRPC), stopped afterwards."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        token_file = self.workdir / "token"
        token_file.write_text(self.token, encoding="utf-8")
        cmd = [str(BIN / "tta"), "-v", "serve", "--server", "kserve", "--model", clip, "--name", self.model,
               "--labels-file", str(labels_file), "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), *(("--token-file", str(token_file)) if require_token else ()), *extra]
        env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "TTA_METRICS_PORT")}
        env.update(HF_HUB_OFFLINE="1", TMPDIR=str(self.workdir), TTA_STATE_DIR="", TTA_ADMIN_TOKEN=self.admin_token)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            try:
                self.wait_ready(timeout_s)
                yield self
            finally:
                self.stop()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tta serve exited ({self.process.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/v2/models/{self.model}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)  # poll interval of a deadline loop
        raise TimeoutError(f"KServe model not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
