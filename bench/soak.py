"""Soak: a bounded mixed load against a real TorchServe on 127.0.0.1 (``make soak``).

    python -m bench.soak --requests 3000 --concurrency 8 --max-seconds 900

Builds a tiny-random archive with `tta archive`, starts TorchServe with the repository's
config.properties on free loopback ports (tests/integration/torchserve.py), then sends a fixed
number of requests (or stops at `--max-seconds`) from an asyncio httpx client: raw and JSON
zero-shot, per-request label sets, TPT, ZERO, TDA (stream state), OIP v2, state reads,
privileged actions with and without the admin credential, and the hostile corpus
(tta.testing.hostile) mixed in. Every answer is checked against what its case expects.

Reports throughput, p50/p95/p99 latency of the good requests, answers by status code, the
unexpected ones (goal: none other than the intended 4xx/503), and the worker's RSS at 10 % and
100 % of the run (goal: growth < 5 % after warm-up). Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.torchserve import TorchServe, build_archive  # noqa: E402
from tta.testing import hostile  # noqa: E402

LABELS = ("cat", "dog", "astronaut", "coffee cup", "rocket", "car", "tree", "house", "bird", "fish")
LABEL_SETS = (["cat", "dog"], ["rocket", "plane", "bird"], ["coffee", "tea", "water", "milk"],
              [f"object {i}" for i in range(12)], ["猫", "犬", "🚀"])
ADMIN = "x-tta-admin-token"


@dataclass(frozen=True)
class Kind:
    name: str
    weight: float
    expect: str  # "2xx" | "4xx" | "any"


def photos() -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((160, 120)).save(buffer, "JPEG", quality=88)
        out.append(buffer.getvalue())
    return out


class Mix:
    """Builds one request of a randomly drawn kind: (kind, body, headers, expected class)."""

    def __init__(self, server: TorchServe, images: list[bytes], seed: int) -> None:
        self.server = server
        self.images = images
        self.rng = random.Random(seed)
        self.bad = [case for case in hostile.corpus() if case.expect == "4xx"]
        self.odd = [case for case in hostile.corpus() if case.expect == "2xx"]
        self.kinds = [
            Kind("zeroshot-raw", 25, "2xx"), Kind("zeroshot-json-labels", 12, "2xx"), Kind("tpt", 8, "2xx"),
            Kind("zero", 8, "2xx"), Kind("tda", 10, "2xx"), Kind("oip", 5, "2xx"), Kind("state", 3, "2xx"),
            Kind("admin-reset", 1, "2xx"), Kind("reset-unauthenticated", 2, "4xx"),
            Kind("odd-image", 8, "2xx"), Kind("hostile", 18, "4xx"),
        ]

    def draw(self) -> tuple[str, bytes, dict[str, str], str]:
        kind = self.rng.choices(self.kinds, weights=[k.weight for k in self.kinds])[0]
        image = self.rng.choice(self.images)
        b64 = base64.b64encode(image).decode()
        seed = self.rng.randrange(1000)
        json_headers = {**self.server.auth, "Content-Type": "application/json"}
        if kind.name == "zeroshot-raw":
            return kind.name, image, {**self.server.auth, "Content-Type": "image/jpeg"}, kind.expect
        if kind.name == "zeroshot-json-labels":
            body = {"image": b64, "labels": self.rng.choice(LABEL_SETS), "top_k": 2}
        elif kind.name in ("tpt", "zero", "tda"):
            body = {"image": b64, "method": kind.name, "seed": seed}
        elif kind.name == "oip":
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                    "parameters": {"top_k": 3}}
        elif kind.name == "state":
            body = {"action": "state", "method": "tda"}
        elif kind.name == "admin-reset":
            body = {"action": "reset", "method": "tda"}
            json_headers[ADMIN] = self.server.keys["management"]
        elif kind.name == "reset-unauthenticated":
            body = {"action": "reset", "method": "tda"}
        else:
            case = self.rng.choice(self.odd if kind.name == "odd-image" else self.bad)
            return f"{kind.name}:{case.name}", case.body, {**self.server.auth, **case.headers}, case.expect
        return kind.name, json.dumps(body).encode(), json_headers, kind.expect


def worker_pids(server: TorchServe) -> list[int]:
    """PIDs of the Python model workers under the TorchServe process group."""
    assert server.process is not None
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"model_service_worker" in cmdline and int(stat[2]) == os.getpgid(server.process.pid):
            pids.append(int(entry.name))
    return sorted(pids)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def acceptable(status: int, text: str, expect: str) -> bool:
    """What the case expects (503 is always acceptable: overload); an error body names the error."""
    ok = status == 503 or (expect == "2xx" and 200 <= status < 300) or (expect == "4xx" and 400 <= status < 500) \
        or (expect == "any" and 0 < status < 500)
    if ok and status >= 400 and status != 413:  # 413 may come from the frontend's body-size limit
        try:
            parsed = json.loads(text)
        except ValueError:
            return False
        return isinstance(parsed, dict) and ("error" in parsed or "message" in parsed)  # ours, or the frontend's
    return ok


async def run_load(server: TorchServe, mix: Mix, requests: int, concurrency: int, max_seconds: float,
                   timeout_s: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    unexpected: list[dict] = []
    rss: dict[str, dict[str, float]] = {}
    pids_seen: set[int] = set()
    done = 0
    start = time.perf_counter()
    marks = {"10%": max(1, requests // 10), "100%": requests}

    def sample(label: str) -> None:
        pids = worker_pids(server)
        pids_seen.update(pids)
        rss[label] = {str(pid): round(rss_mb(pid), 1) for pid in pids}

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal done
        name, body, headers, expect = mix.draw()
        sent = time.perf_counter()
        try:
            reply = await client.post(server.predict_url, content=body, headers=headers, timeout=timeout_s)
            status, text = reply.status_code, reply.text
        except httpx.HTTPError as exc:
            status, text = 0, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - sent
        statuses[status] += 1
        good = 200 <= status < 300
        if not acceptable(status, text, expect):
            unexpected.append({"kind": name, "status": status, "expected": expect, "body": text[:300]})
        if good and expect == "2xx":
            latencies.append(elapsed)
        done += 1
        if done in marks.values():
            sample(next(k for k, v in marks.items() if v == done))

    async def lane(client: httpx.AsyncClient, quota: int) -> None:
        for _ in range(quota):
            if time.perf_counter() - start > max_seconds:
                return
            await one(client)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        quotas = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]
        await asyncio.gather(*(lane(client, q) for q in quotas))
    wall = time.perf_counter() - start
    if "100%" not in rss:
        sample("100%")
    first = sum(rss.get("10%", {}).values())
    last = sum(rss.get("100%", {}).values())
    return {
        "requests": done, "wall_s": round(wall, 1), "throughput_rps": round(done / wall, 2),
        "latency_ms_good": {q: round(1000 * percentile(latencies, v), 1)
                            for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "unexpected": len(unexpected), "unexpected_samples": unexpected[:20],
        "worker_rss_mb": rss, "worker_pids_seen": sorted(pids_seen),
        "rss_growth_pct_10_to_100": round(100.0 * (last - first) / first, 2) if first else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request client timeout (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = parser.parse_args(argv)

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tta-soak-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        labels = work / "labels.txt"
        labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
        build_archive(store, "soak", "--labels-file", str(labels), "--workers", "1", "--batch-size", "4",
                      "--max-batch-delay", "20", "--max-labels", "20",
                      "--method-defaults", '{"tpt": {"n_views": 8}, "zero": {"n_views": 8}}')
        server = TorchServe(work / "ts", "soak")
        with server.running(store, "soak.mar"):
            mix = Mix(server, photos(), args.seed)
            result = asyncio.run(run_load(server, mix, args.requests, args.concurrency, args.max_seconds,
                                          args.timeout))
    result.update({
        "model": "tiny-random", "concurrency": args.concurrency, "seed": args.seed,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_start": [round(x, 1) for x in load_start],
                    "load_average_end": [round(x, 1) for x in os.getloadavg()]},
        "mix": {k.name: k.weight for k in mix.kinds}, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "unexpected_samples"}, indent=2))
    for sample in result["unexpected_samples"]:
        print("UNEXPECTED", sample)
    growth = result["rss_growth_pct_10_to_100"]
    passed = result["unexpected"] == 0 and (growth is None or growth < 5.0)
    print("soak:", "PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
