"""TorchServe vs KServe, side by side: the same deployment, the same OIP v2 requests, one run.

    python -m bench.bench_servers --model ViT-B-16-random --classes 100 --requests 12 --concurrency 2

Both servers run at once on 127.0.0.1 (TorchServe from a `tta archive` with batchSize 4 /
maxBatchDelay 50 and one worker; KServe from `tta serve --server kserve` with the same knobs),
so the machine's load is the same for both. Each round sends `--requests` zero-shot
``POST /v2/models/clip/infer`` bodies (one base64 photo each) from `--concurrency` threads to one
server, then the other, alternating first; requests/s and p50/p95 per server and the KServe /
TorchServe ratios go to bench/results/servers.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.server_bench import _archive, _percentile, _photo_jpegs  # noqa: E402
from tests.integration.kserve_server import KServe  # noqa: E402
from tests.integration.torchserve import TorchServe  # noqa: E402


def load(url: str, headers: dict[str, str], images: list[bytes], n: int, concurrency: int) -> tuple[float, list[float]]:
    """Wall seconds and per-request latencies of `n` OIP requests from `concurrency` threads."""
    import requests

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=max(10, concurrency)))

    def one(i: int) -> float:
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(images[i % len(images)]).decode()]}],
                "parameters": {"method": "zeroshot", "top_k": 1}}
        start = time.perf_counter()
        reply = session.post(url, json=body, headers=headers, timeout=600)
        if reply.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {reply.status_code}: {reply.text[:300]}")
        return time.perf_counter() - start

    one(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = list(pool.map(one, range(n)))
    return time.perf_counter() - start, latencies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.bench_servers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16-random")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "servers.json"))
    args = p.parse_args(argv)
    images = _photo_jpegs(4)
    walls = {"torchserve": 0.0, "kserve": 0.0}
    latencies: dict[str, list[float]] = {"torchserve": [], "kserve": []}
    with tempfile.TemporaryDirectory(prefix="tta-servers-bench-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        archive = _archive(args.model, args.classes, store, work, "clip", 4, 50)
        torchserve = TorchServe(work / "ts", "clip")
        kserve = KServe(work / "ks", "clip")
        with torchserve.running(store, archive, timeout_s=900), \
                kserve.running(work / "labels.txt", "--batch-size", "4", "--max-batch-delay", "50",
                               clip=args.model, timeout_s=900):
            targets = {"torchserve": (f"{torchserve.url}/v2/models/clip/infer", torchserve.auth),
                       "kserve": (f"{kserve.url}/v2/models/clip/infer", kserve.auth)}
            for round_ in range(args.rounds):
                order = ["torchserve", "kserve"] if round_ % 2 == 0 else ["kserve", "torchserve"]
                for name in order:
                    url, headers = targets[name]
                    wall, lat = load(url, headers, images, args.requests, args.concurrency)
                    walls[name] += wall
                    latencies[name].extend(lat)
    rows = {name: {"requests": len(latencies[name]), "rps": round(len(latencies[name]) / walls[name], 4),
                   "p50_s": round(statistics.median(latencies[name]), 3),
                   "p95_s": round(_percentile(latencies[name], 0.95), 3)} for name in walls}
    ratio = {"rps": round(rows["kserve"]["rps"] / rows["torchserve"]["rps"], 3),
             "p50": round(rows["kserve"]["p50_s"] / rows["torchserve"]["p50_s"], 3)}
    out = {"model": args.model, "n_classes": args.classes, "method": "zeroshot", "body": "OIP v2 JSON, base64",
           "concurrency": args.concurrency, "rounds": args.rounds, "batch": "4 / 50 ms on both",
           "device": "cpu", "cores": os.cpu_count(), "load_average_at_end": os.getloadavg(),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": rows,
           "kserve_vs_torchserve": ratio}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"{'server':>10} {'n':>4} {'rps':>8} {'p50 s':>8} {'p95 s':>8}")
    for name, r in rows.items():
        print(f"{name:>10} {r['requests']:>4} {r['rps']:>8.3f} {r['p50_s']:>8.2f} {r['p95_s']:>8.2f}")
    print(f"kserve / torchserve: rps x{ratio['rps']}, p50 x{ratio['p50']} (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
