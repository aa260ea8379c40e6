"""Batching off vs on, TorchServe and KServe side by side, at several client concurrencies.

    python -m bench.bench_batching --models tiny-random,ViT-B-16-random --concurrency 1,4,8,32

For each model, in one run on 127.0.0.1: one TorchServe serving one archive with batchSize 1
(off) and one per `--ts-delays` maxBatchDelay with batchSize `--batch-size` (on), and two
`tta serve --server kserve` processes (``--batch-size 1`` and ``--batch-size B
--max-batch-delay D``). Every cell (server x batching x concurrency) gets `--rounds` rounds of
zero-shot OIP ``POST /v2/models/NAME/infer`` requests (JSON, one base64 photo each) from
`concurrency` client threads; the rounds of all cells of one concurrency are interleaved (order
rotated per round) so a shared machine's load drifts over all of them alike. Requests per cell:
``max(--requests, 2 x concurrency)``, split over the rounds. The run's noise is stated per cell
as the spread of its rounds' requests/s (|r1 - r2| / mean for two rounds).

Writes bench/results/batching.json: per cell requests/s, p50/p95, the rounds' requests/s, and
per (model, server, concurrency) the on/off ratio with the two cells' noise beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_servers import load  # noqa: E402
from bench.server_bench import _archive, _percentile, _photo_jpegs, wait_models_ready  # noqa: E402
from tests.integration.kserve_server import KServe  # noqa: E402
from tests.integration.torchserve import TorchServe  # noqa: E402


def targets_for(model: str, args: argparse.Namespace, work: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Start the servers of one model; {cell name: (url, headers)} in a fixed order."""
    store = work / "store"
    store.mkdir(parents=True)
    ts_names = {"off": ("clip_off", 1, 50)}
    for delay in args.ts_delays:
        ts_names[f"on d{delay}"] = (f"clip_d{delay}", args.batch_size, delay)
    cells: dict[str, Any] = {}
    if "torchserve" in args.servers:
        archives = {k: _archive(model, args.classes, store, work, name, b, d) for k, (name, b, d) in ts_names.items()}
        torchserve = TorchServe(work / "ts", ts_names["off"][0])
        load_spec = ",".join(f"{ts_names[k][0]}={a}" for k, a in archives.items()).split("=", 1)[1]
        stack.enter_context(torchserve.running(store, load_spec, timeout_s=1200))
        wait_models_ready(torchserve, [n for n, _, _ in ts_names.values()], timeout_s=1200)
        for key, (name, _, _) in ts_names.items():
            cells[f"torchserve {key}"] = (f"{torchserve.url}/v2/models/{name}/infer", torchserve.auth)
    else:
        from tta.text import imagenet_classnames

        (work / "labels.txt").write_text("\n".join(imagenet_classnames()[:args.classes]) + "\n", encoding="utf-8")
    if "kserve" not in args.servers:
        return cells
    ks_off = stack.enter_context(KServe(work / "ks-off", "clip").running(
        work / "labels.txt", "--batch-size", "1", clip=model, timeout_s=1200))
    ks_on = stack.enter_context(KServe(work / "ks-on", "clip").running(
        work / "labels.txt", "--batch-size", str(args.batch_size), "--max-batch-delay", str(args.kserve_delay),
        clip=model, timeout_s=1200))
    cells["kserve off"] = (f"{ks_off.url}/v2/models/clip/infer", ks_off.auth)
    cells[f"kserve on d{args.kserve_delay}"] = (f"{ks_on.url}/v2/models/clip/infer", ks_on.auth)
    return cells


def bench_model(model: str, args: argparse.Namespace, images: list[bytes], deadline: float,
                rows: list[dict[str, Any]], save: Any) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="tta-batching-bench-") as tmp, contextlib.ExitStack() as stack:
        cells = targets_for(model, args, Path(tmp), stack)
        names = list(cells)
        for concurrency in args.concurrency:
            if time.monotonic() > deadline:
                print(f"time budget spent: {model} stops before concurrency {concurrency}", flush=True)
                break
            n = max(args.requests, 2 * concurrency)
            per_round = max(concurrency, n // args.rounds)
            stats = {name: {"walls": [], "latencies": [], "rps": []} for name in names}
            for round_ in range(args.rounds):
                order = names[round_ % len(names):] + names[:round_ % len(names)]
                for name in order:
                    url, headers = cells[name]
                    wall, latencies = load(url, headers, images, per_round, concurrency)
                    stats[name]["walls"].append(wall)
                    stats[name]["latencies"].extend(latencies)
                    stats[name]["rps"].append(per_round / wall)
            for name in names:
                s = stats[name]
                rps_rounds = s["rps"]
                mean = statistics.fmean(rps_rounds)
                row = {"model": model, "server": name.split()[0], "batching": name.split(" ", 1)[1],
                       "concurrency": concurrency, "requests": len(s["latencies"]),
                       "rps": round(len(s["latencies"]) / sum(s["walls"]), 3),
                       "p50_s": round(statistics.median(s["latencies"]), 4),
                       "p95_s": round(_percentile(s["latencies"], 0.95), 4),
                       "rps_rounds": [round(r, 3) for r in rps_rounds],
                       "noise": round((max(rps_rounds) - min(rps_rounds)) / mean, 3) if len(rps_rounds) > 1 else None}
                rows.append(row)
                save()  # after every cell: a run stopped from outside keeps what it measured
                print(f"{model:>16} {name:>18} c={concurrency:<3} n={row['requests']:<4} rps {row['rps']:8.2f} "
                      f"p50 {row['p50_s']:7.3f} p95 {row['p95_s']:7.3f} noise {row['noise']}", flush=True)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """On / off per (model, server, concurrency), with the larger noise of the two cells."""
    out = []
    offs = {(r["model"], r["server"], r["concurrency"]): r for r in rows if r["batching"] == "off"}
    for r in rows:
        off = offs.get((r["model"], r["server"], r["concurrency"]))
        if r["batching"] == "off" or off is None:
            continue
        out.append({"model": r["model"], "server": r["server"], "batching": r["batching"],
                    "concurrency": r["concurrency"], "rps_on_over_off": round(r["rps"] / off["rps"], 3),
                    "p50_on_over_off": round(r["p50_s"] / off["p50_s"], 3),
                    "noise": max(x for x in (r["noise"], off["noise"], 0.0) if x is not None)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.bench_batching", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-random,ViT-B-16-random")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--concurrency", default="1,4,8,32")
    p.add_argument("--requests", type=int, default=24, help="requests per cell at least (2 x concurrency if more)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ts-delays", default="5,20,50", help="TorchServe maxBatchDelay choices (ms), one archive each")
    p.add_argument("--kserve-delay", type=int, default=50, help="KServe --max-batch-delay (ms)")
    p.add_argument("--servers", default="torchserve,kserve")
    p.add_argument("--time-budget", type=float, default=1800.0, help="seconds; later cells are skipped past it")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "batching.json"))
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.ts_delays = [int(d) for d in args.ts_delays.split(",")]
    images = _photo_jpegs(4)
    started = time.monotonic()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {}

    def save() -> None:
        out.update({"what": "zero-shot OIP v2 JSON (one base64 photo per request), batching off vs on",
                    "models": args.models.split(","), "servers": args.servers.split(","), "n_classes": args.classes,
                    "concurrency": args.concurrency, "rounds": args.rounds, "batch_size_on": args.batch_size,
                    "torchserve_max_batch_delays_ms": args.ts_delays, "kserve_max_batch_delay_ms": args.kserve_delay,
                    "device": "cpu", "cores": os.cpu_count(), "load_average_at_start": load_before,
                    "load_average_at_end": os.getloadavg(), "wall_s": round(time.monotonic() - started, 1),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": rows,
                    "ratios": ratios(rows)})
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")

    for model in args.models.split(","):
        bench_model(model, args, images, started + args.time_budget, rows, save)
    save()
    print(f"\n{'model':>16} {'server':>10} {'on':>8} {'conc':>4} {'rps x':>6} {'p50 x':>6} {'noise':>6}")
    for r in out["ratios"]:
        print(f"{r['model']:>16} {r['server']:>10} {r['batching']:>8} {r['concurrency']:>4} "
              f"{r['rps_on_over_off']:>6.2f} {r['p50_on_over_off']:>6.2f} {r['noise']:>6.2f}")
    print(f"load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; {out['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
