"""Triton's perf_analyzer (the OIP load generator) against `tta serve --server kserve`, bounded.

    PERF_ANALYZER=/path/to/perf_analyzer python -m bench.bench_perf_analyzer --model tiny-random

perf_analyzer asks the model configuration extension first (``GET /v2/models/NAME/config`` or
gRPC ``ModelConfig``), then drives ``infer`` at each concurrency of `--concurrency` with a fixed
number of requests per measurement window. It is a C++ binary, not a Python package: the
``tritonclient`` manylinux wheels up to 2.49 carry it as ``tritonclient-*.data/data/bin/
perf_analyzer`` (later wheels and the ``perf-analyzer`` name on PyPI do not), linked against
``libb64.so.0d`` (Debian ``libb64-0d``) and ``libcudart.so.12`` (the
``nvidia-cuda-runtime-cu12`` wheel; it runs on a CPU-only machine). docs/oip.md has the steps.

The server runs without a bearer token (perf_analyzer 2.49 sends ``-H`` headers over HTTP only).
Writes bench/results/perf_analyzer.json (perf_analyzer's CSV rows, per protocol and concurrency).
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.server_bench import _photo_jpegs  # noqa: E402
from tests.integration.kserve_server import KServe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.bench_perf_analyzer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--concurrency", default="1:8:7", help="perf_analyzer --concurrency-range start:end:step")
    p.add_argument("--protocols", default="http,grpc")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batch-delay", type=int, default=50)
    p.add_argument("--window-requests", type=int, default=40, help="requests per measurement window")
    p.add_argument("--stability", type=int, default=100,
                   help="perf_analyzer --stability-percentage: windows may differ this much (a shared 2-core "
                        "machine rarely gives 3 windows within its default 10%%)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "perf_analyzer.json"))
    args = p.parse_args(argv)
    binary = os.environ.get("PERF_ANALYZER", "perf_analyzer")
    image = base64.b64encode(_photo_jpegs(1)[0]).decode("ascii")
    results = []
    with tempfile.TemporaryDirectory(prefix="tta-perf-analyzer-") as tmp:
        work = Path(tmp)
        labels = work / "labels.txt"
        labels.write_text("cat\ndog\nastronaut\ncoffee cup\nrocket\n", encoding="utf-8")
        data = work / "input.json"  # one BYTES element: the image as base64 text (the server decodes it)
        data.write_text(json.dumps({"data": [{"image": {"content": [image], "shape": [1]}}]}), encoding="utf-8")
        server = KServe(work / "ks", "clip")
        with server.running(labels, "--batch-size", str(args.batch_size), "--max-batch-delay",
                            str(args.max_batch_delay), clip=args.model, timeout_s=900, require_token=False):
            for protocol in args.protocols.split(","):
                port = server.http_port if protocol == "http" else server.grpc_port
                report = work / f"{protocol}.csv"
                cmd = [binary, "-m", "clip", "-x", "1.0", "-u", f"127.0.0.1:{port}", "-i", protocol,
                       "--input-data", str(data), "--shape", "image:1",
                       "--concurrency-range", args.concurrency, "--measurement-mode", "count_windows",
                       "--measurement-request-count", str(args.window_requests), "--max-trials", "8",
                       "--stability-percentage", str(args.stability), "-f", str(report)]
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                print(run.stdout[-3000:], run.stderr[-2000:], flush=True)
                if run.returncode != 0:
                    results.append({"protocol": protocol, "error": (run.stderr or run.stdout)[-2000:]})
                    continue
                with report.open(newline="", encoding="utf-8") as f:
                    results += [{"protocol": protocol, **row} for row in csv.DictReader(f)]
    out = {"tool": "perf_analyzer (tritonclient 2.49.0 wheel)", "model": args.model, "server": "kserve",
           "window_requests": args.window_requests, "stability_percentage": args.stability,
           "batch": f"{args.batch_size} / {args.max_batch_delay} ms", "body": "one base64 photo per request",
           "cores": os.cpu_count(), "load_average_at_end": os.getloadavg(),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
