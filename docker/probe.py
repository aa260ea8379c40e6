"""Readiness and drain checks for the TorchServe that scripts/serve.sh starts.

Standard library only: Kubernetes runs `ready` as an exec probe every few seconds and `drain` as the
preStop hook, so both must start fast and need nothing from the environment.

  probe.py ready [--model clip]
      exit 0 when a worker of the model is READY. TorchServe's /ping (and /v2/health/ready) answer
      "Healthy" while the model is still loading, so readiness asks the management API instead.
  probe.py drain [--model clip] [--delay 5] [--timeout 120]
      wait --delay seconds (the Service stops sending new requests to a terminating pod), then
      until nothing is queued (TorchServe's pendingRequests) and nothing is being processed (the
      handler's tta_requests_in_flight gauge) on two polls in a row, or until --timeout. TorchServe
      itself resets open connections on SIGTERM, so this is what lets in-flight requests finish.

The management address comes from TS_MANAGEMENT_ADDRESS or the TS_CONFIG file (what serve.sh
starts TorchServe with); the key from ./key_file.json when token authorization is on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

POLL_S = 0.5


def management_address() -> str:
    if os.environ.get("TS_MANAGEMENT_ADDRESS"):
        return os.environ["TS_MANAGEMENT_ADDRESS"].rstrip("/")
    config = Path(os.environ.get("TS_CONFIG", "config.properties"))
    if config.is_file():
        match = re.search(r"^management_address=(\S+)", config.read_text(encoding="utf-8"), flags=re.M)
        if match:
            return match.group(1).rstrip("/")
    return "http://127.0.0.1:8081"


def get(url: str, key: str | None = None, timeout: float = 2.0) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 (loopback URLs we build)
        return reply.read()


def management_key() -> str | None:
    try:
        return json.loads(Path(os.environ.get("KEY_FILE", "key_file.json")).read_text())["management"]["key"]
    except (OSError, ValueError, KeyError):
        return None  # token authorization off (the cluster config), or not written yet


def describe(model: str) -> list[dict]:
    return json.loads(get(f"{management_address()}/models/{model}", management_key()))


def ready(model: str) -> bool:
    try:
        return any(w.get("status") == "READY" for entry in describe(model) for w in entry.get("workers", []))
    except (OSError, ValueError, urllib.error.URLError):
        return False


def pending(model: str) -> int:
    return sum(int((entry.get("jobQueueStatus") or {}).get("pendingRequests", 0)) for entry in describe(model))


def in_flight() -> float | None:
    """Sum of tta_requests_in_flight on the tta metrics port; None when that exporter is off."""
    port = int(os.environ.get("TTA_METRICS_PORT", "8083"))
    if port <= 0:
        return None
    try:
        text = get(f"http://127.0.0.1:{port}/metrics").decode()
    except (OSError, urllib.error.URLError):
        return None
    return sum(float(m.group(1)) for m in re.finditer(r"^tta_requests_in_flight(?:\{[^}]*\})? (\S+)$", text, re.M))


def drain(model: str, delay: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    time.sleep(max(0.0, min(delay, timeout)))
    idle_polls = 0
    while time.monotonic() < deadline:
        try:
            busy = pending(model) + (in_flight() or 0.0)
        except (OSError, ValueError, urllib.error.URLError):
            return True  # TorchServe no longer answers: nothing left to drain
        idle_polls = idle_polls + 1 if busy == 0 else 0
        if idle_polls >= 2:
            return True
        time.sleep(POLL_S)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("ready", "drain"))
    parser.add_argument("--model", default=os.environ.get("NAME", "clip"))
    parser.add_argument("--delay", type=float, default=5.0, help="drain: seconds before polling")
    parser.add_argument("--timeout", type=float, default=120.0, help="drain: give up after this many seconds")
    args = parser.parse_args(argv)
    if args.command == "ready":
        return 0 if ready(args.model) else 1
    drained = drain(args.model, args.delay, args.timeout)
    print(f"probe: drain {'done' if drained else 'timed out'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
