"""Server-level numbers: requests/s and p50/p95 latency through a real TorchServe on 127.0.0.1.

    python -m bench.server_bench --model ViT-B-16-random --classes 100 --requests 8 --concurrency 2
    python -m bench.server_bench --batch-sizes 1,8,32 --requests 64 --concurrency 32 --rounds 2

Builds an archive with `tta archive`, starts TorchServe with the repository's config.properties
(tests/integration/torchserve.py), then for each method sends `--requests` JSON requests (a
skimage photo, per-request seed) from `--concurrency` client threads. Writes
bench/results/server.json.

With `--batch-sizes`, one TorchServe serves one archive per TorchServe batchSize (same model,
labels and method; one worker each) and the same zero-shot load is sent to each in turn,
interleaved over `--rounds` so a shared machine's load drifts over all of them alike; requests/s
and p50/p95 per batch size and their ratios to batchSize 1 go to bench/results/server_batching.json.
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


def _archive(model: str, classes: int, store: Path, work: Path, name: str = "clip", batch_size: int = 1,
             max_batch_delay: int = 50) -> str:
    from tta.text import imagenet_classnames

    labels = work / "labels.txt"
    labels.write_text("\n".join(imagenet_classnames()[:classes]) + "\n", encoding="utf-8")
    tmp = work / "archiver-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "tta"), "archive", "--model", model, "--name", name, "--labels-file", str(labels),
           "--out", str(store), "--workers", "1", "--batch-size", str(batch_size),
           "--max-batch-delay", str(max_batch_delay), "--response-timeout", "600", "-f"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp)})
    return f"{name}.mar"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_method(server: TorchServe, method: str, options: dict, requests_n: int, concurrency: int,
               images: list[bytes], url: str | None = None, latencies_out: list[float] | None = None) -> dict:
    import requests

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=max(10, concurrency)))
    url = url or server.predict_url

    def one(i: int) -> float:
        body = {"image": base64.b64encode(images[i % len(images)]).decode(), "method": method,
                "options": options, "seed": i, "top_k": 1}
        start = time.perf_counter()
        reply = session.post(url, json=body, headers=server.auth, timeout=900)
        elapsed = time.perf_counter() - start
        if reply.status_code != 200:
            raise RuntimeError(f"{method}: HTTP {reply.status_code}: {reply.text[:300]}")
        return elapsed

    one(10_000)  # warm-up: per-label-set caches of this method
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = list(pool.map(one, range(requests_n)))
    wall = time.perf_counter() - start
    if latencies_out is not None:
        latencies_out.extend(latencies)
    return {"method": method, "options": options, "requests": requests_n, "concurrency": concurrency,
            "rps": round(requests_n / wall, 4), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(_percentile(latencies, 0.95), 3), "wall_s": round(wall, 1)}


def wait_models_ready(server: TorchServe, names: list[str], timeout_s: float = 900.0) -> None:
    """Every named model has a READY worker (the helper waits for its first model only)."""
    import requests

    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending and time.monotonic() < deadline:
        name = pending[0]
        reply = requests.get(f"http://127.0.0.1:{server.management_port}/models/{name}",
                             headers={"Authorization": f"Bearer {server.keys['management']}"}, timeout=5)
        workers = [w for e in reply.json() for w in e.get("workers", [])] if reply.status_code == 200 else []
        if any(w.get("status") == "READY" for w in workers):
            pending.pop(0)
        else:
            time.sleep(0.5)  # poll interval of a deadline loop
    if pending:
        raise TimeoutError(f"models not ready: {pending}")


def batching_bench(args: argparse.Namespace, images: list[bytes]) -> dict:
    """Same zero-shot load against one archive per batchSize, interleaved rounds, one server."""
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    names = [f"clip_b{b}" for b in sizes]
    latencies: dict[int, list[float]] = {b: [] for b in sizes}
    walls: dict[int, float] = {b: 0.0 for b in sizes}
    with tempfile.TemporaryDirectory(prefix="tta-server-bench-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        archives = [_archive(args.model, args.classes, store, work, name, b, args.max_batch_delay)
                    for name, b in zip(names, sizes, strict=True)]
        load = ",".join(f"{n}={a}" for n, a in zip(names, archives, strict=True))
        server = TorchServe(work / "ts", names[0])
        with server.running(store, load.split("=", 1)[1], timeout_s=900):
            wait_models_ready(server, names)
            for _ in range(args.rounds):
                for name, b in zip(names, sizes, strict=True):
                    url = f"{server.url}/predictions/{name}"
                    r = run_method(server, "zeroshot", {}, args.requests, args.concurrency, images, url=url,
                                   latencies_out=latencies[b])
                    walls[b] += r["wall_s"]
            log_text = (server.workdir / "logs" / "model_log.log").read_text(errors="replace")
    rows = []
    for b in sizes:
        n = len(latencies[b])
        rows.append({"batch_size": b, "requests": n, "rps": round(n / walls[b], 4),
                     "p50_s": round(statistics.median(latencies[b]), 3),
                     "p95_s": round(_percentile(latencies[b], 0.95), 3)})
    base = rows[0]
    for r in rows:
        r["rps_vs_first"] = round(r["rps"] / base["rps"], 3)
        r["p50_vs_first"] = round(r["p50_s"] / base["p50_s"], 3)
    shared = log_text.count("shared encoder pass")
    return {"mode": "batching", "model": args.model, "n_classes": args.classes, "method": "zeroshot",
            "concurrency": args.concurrency, "rounds": args.rounds, "max_batch_delay_ms": args.max_batch_delay,
            "device": "cpu (no GPU this session)", "cores": os.cpu_count(),
            "shared_pass_log_lines": shared, "results": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.server_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16-random")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--methods", default="zeroshot,tpt")
    p.add_argument("--options", default='{"tpt": {"n_views": 16}}', help="JSON {method: options}")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--out", default=None, help="default: bench/results/server.json (server_batching.json)")
    p.add_argument("--batch-sizes", default=None, help="e.g. 1,8,32: compare TorchServe batchSize (zero-shot)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds for --batch-sizes")
    p.add_argument("--max-batch-delay", type=int, default=100, help="ms, for --batch-sizes")
    args = p.parse_args(argv)
    options = json.loads(args.options)
    images = _photo_jpegs(4)
    if args.batch_sizes:
        out = batching_bench(args, images)
        out.update({"load_average_at_end": os.getloadavg(),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        path = args.out or str(ROOT / "bench" / "results" / "server_batching.json")
        Path(path).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
        print(f"{'batchSize':>9} {'n':>4} {'rps':>8} {'p50 s':>8} {'p95 s':>8} {'rps x':>6} {'p50 x':>6}")
        for r in out["results"]:
            print(f"{r['batch_size']:>9} {r['requests']:>4} {r['rps']:>8.3f} {r['p50_s']:>8.2f} {r['p95_s']:>8.2f} "
                  f"{r['rps_vs_first']:>6.2f} {r['p50_vs_first']:>6.2f}")
        print(f"log lines with a shared encoder pass: {out['shared_pass_log_lines']}")
        return 0
    args.out = args.out or str(ROOT / "bench" / "results" / "server.json")
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
