"""Server-level numbers: requests/s and p50/p95 latency through a real TorchServe on 127.0.0.1.

    python -m bench.server_bench --model ViT-B-16-random --classes 100 --requests 8 --concurrency 2

Builds an archive with `tta archive`, starts TorchServe with the repository's config.properties
(tests/integration/torchserve.py), then for each method sends `--requests` JSON requests (a
skimage photo, per-request seed) from `--concurrency` client threads. Writes
bench/results/server.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.torchserve import BIN, TorchServe  # noqa: E402


def _photo_jpegs(n: int) -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket")[:n]:
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _archive(model: str, classes: int, store: Path, work: Path) -> str:
    from tta.text import imagenet_classnames

    labels = work / "labels.txt"
    labels.write_text("\n".join(imagenet_classnames()[:classes]) + "\n", encoding="utf-8")
    tmp = work / "archiver-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "tta"), "archive", "--model", model, "--name", "clip", "--labels-file", str(labels),
           "--out", str(store), "--workers", "1", "--batch-size", "1", "--response-timeout", "600", "-f"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp)})
    return "clip.mar"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_method(server: TorchServe, method: str, options: dict, requests_n: int, concurrency: int,
               images: list[bytes]) -> dict:
    import requests

    session = requests.Session()

    def one(i: int) -> float:
        body = {"image": base64.b64encode(images[i % len(images)]).decode(), "method": method,
                "options": options, "seed": i, "top_k": 1}
        start = time.perf_counter()
        reply = session.post(server.predict_url, json=body, headers=server.auth, timeout=900)
        elapsed = time.perf_counter() - start
        if reply.status_code != 200:
            raise RuntimeError(f"{method}: HTTP {reply.status_code}: {reply.text[:300]}")
        return elapsed

    one(10_000)  # warm-up: per-label-set caches of this method
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = list(pool.map(one, range(requests_n)))
    wall = time.perf_counter() - start
    return {"method": method, "options": options, "requests": requests_n, "concurrency": concurrency,
            "rps": round(requests_n / wall, 4), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(_percentile(latencies, 0.95), 3), "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.server_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16-random")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--methods", default="zeroshot,tpt")
    p.add_argument("--options", default='{"tpt": {"n_views": 16}}', help="JSON {method: options}")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "server.json"))
    args = p.parse_args(argv)
    options = json.loads(args.options)
    images = _photo_jpegs(4)
    with tempfile.TemporaryDirectory(prefix="tta-server-bench-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        archive = _archive(args.model, args.classes, store, work)
        server = TorchServe(work / "ts", "clip").start(store, archive, timeout_s=900)
        try:
            results = [run_method(server, m, options.get(m, {}), args.requests, args.concurrency, images)
                       for m in args.methods.split(",")]
        finally:
            server.stop()
    out = {"model": args.model, "n_classes": args.classes, "device": "cpu", "cores": os.cpu_count(),
           "load_average_at_end": os.getloadavg(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"{'method':<9} {'options':<18} {'conc':>4} {'n':>3} {'rps':>8} {'p50 s':>8} {'p95 s':>8}")
    for r in results:
        print(f"{r['method']:<9} {json.dumps(r['options']):<18} {r['concurrency']:>4} {r['requests']:>3} "
              f"{r['rps']:>8.3f} {r['p50_s']:>8.2f} {r['p95_s']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
