"""A real Prometheus (Debian package `prometheus`) for the monitoring tests, on a free loopback port
in a private directory, and the `promtool` binary.

CI installs the package and sets TTA_REQUIRE_PROMETHEUS=1, so there a missing binary fails the
test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tta.testing.redis_server import free_port, terminate


def binary(name: str) -> str:
    """Path of `name`; skip (locally) or fail (CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (Debian/Ubuntu: apt-get install prometheus)"
        if os.environ.get("TTA_REQUIRE_PROMETHEUS"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class Prometheus:
    """`prometheus` scraping `targets` every `interval`, evaluating `rule_files` as often."""

    workdir: Path
    targets: Sequence[str]
    rule_files: Sequence[Path] = ()
    interval: str = "1s"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval,
                       "scrape_timeout": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": "clip-tta", "static_configs": [{"targets": list(self.targets)}]}],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    @contextmanager
    def running(self, timeout_s: float = 60.0) -> Iterator[Prometheus]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
        self.process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait(lambda: requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200, timeout_s, "ready")
            yield self
        finally:
            terminate(self.process, 30)
            log.close()

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def wait(self, condition: Any, timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
        """Poll `condition()` until truthy (connection errors count as not yet); its value."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_tail()}")
            try:
                value = condition()
            except requests.RequestException:
                value = None
            if value:
                return value
            time.sleep(poll_s)  # poll interval of a deadline loop
        raise TimeoutError(f"prometheus: {what} not reached in {timeout_s}s\n{self.log_tail()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises on a PromQL error (the expression must at least evaluate)."""
        return self._result("query", {"query": expr}, timeout_s=10)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self._result("query_range", {"query": expr, "start": start, "end": end, "step": step}, timeout_s=30)

    def _result(self, endpoint: str, params: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
        reply = requests.get(f"{self.url}/api/v1/{endpoint}", params=params, timeout=timeout_s).json()
        if reply.get("status") != "success":
            raise AssertionError(f"{params['query']}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]["result"]

    def alerts(self) -> dict[str, str]:
        """{alertname: state} of active alerts ('pending' / 'firing'); inactive ones are absent."""
        reply = requests.get(f"{self.url}/api/v1/alerts", timeout=10).json()
        out: dict[str, str] = {}
        for alert in reply["data"]["alerts"]:
            name, state = alert["labels"]["alertname"], alert["state"]
            out[name] = "firing" if "firing" in (state, out.get(name)) else state
        return out

    def targets_up(self) -> bool:
        reply = requests.get(f"{self.url}/api/v1/targets", timeout=10).json()
        active = reply["data"]["activeTargets"]
        return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)
