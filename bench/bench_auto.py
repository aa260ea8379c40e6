"""`auto` against the fixed methods on the tiny digits CLIP under shift, held-out calibration.

    python -m bench.bench_auto [--shifts rotate,noise] [--severity 3]

For each shift the digits test split is cut in two interleaved halves: the gate's threshold is
calibrated on one (`tta eval --sweep`'s replay: one traced run at gate 1, every threshold priced
from it, cheapest within 0.5 points of the best fixed method), then zeroshot, zero, tpt and `auto`
at that threshold run on the other half, side by side in one process. Cost is reported two ways:
the measured mean milliseconds (noisy on a shared machine) and a robust mean, the median
per-request cost of each method (all requests of a fixed method do the same work; for `auto`, the
median cost of each tier times how often it runs, plus its median overhead). Writes
bench/results/auto_digits.json and bench/results/auto_digits_<shift>_<tiers>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tta.commands.eval import (  # noqa: E402
    MethodResult,
    choose_threshold,
    digits_dataset,
    evaluate,
    plot_sweep,
    sweep_rows,
)
from tta.models import load_model  # noqa: E402

THRESHOLDS = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


def robust_cost(result: MethodResult) -> float:
    """Median ms per request for a fixed method; tier medians x reach rate for a traced auto."""
    if not result.traces:
        return 1000.0 * statistics.median(result.latencies_s)
    tiers = len(result.traces[0])
    tier_ms = [statistics.median(t[j]["ms"] for t in result.traces if len(t) > j) for j in range(tiers)]
    overhead = statistics.median(s * 1000.0 - sum(step["ms"] for step in t)
                                 for s, t in zip(result.latencies_s, result.traces, strict=True))
    return max(overhead, 0.0) + statistics.fmean(sum(tier_ms[: len(t)]) for t in result.traces)


def row(result: MethodResult) -> dict:
    out = result.summary()
    out["robust_cost_ms"] = robust_cost(result)
    return out


def bench_shift(clip, shift: str, severity: int, tiers: str, views: int, fixed: list[str], tolerance: float,
                gate: str = "max_prob") -> dict:
    classnames, items = digits_dataset(None, shift, severity)
    calib, test = items[0::2], items[1::2]
    options = {"zeroshot": {}, "zero": {"n_views": views}, "tpt": {"n_views": views}, "tda": {},
               "auto": {"tiers": tiers, "gate": gate}}
    opts = {m: options[m] for m in fixed}
    # calibration half: fixed methods (for the accuracy target) and a traced auto run
    cal_fixed, _ = evaluate(clip, classnames, calib, fixed, opts, progress=False)
    traced_opts = {"auto": {"tiers": tiers, "gate": gate, "threshold": 1.0, "trace": True}}
    (cal_traced,), _ = evaluate(clip, classnames, calib, ["auto"], traced_opts, progress=False)
    truth = [classnames[y] for _, y, _ in calib]
    cal_sweep = sweep_rows(cal_traced, truth, [t[0]["label"] for t in cal_traced.traces], THRESHOLDS)
    chosen = choose_threshold(cal_sweep, [r.summary() for r in cal_fixed], tolerance)
    # test half: everything side by side, auto at the chosen threshold, plus the test-half curve
    auto_opts = {"auto": {"tiers": tiers, "gate": gate, "threshold": chosen["threshold"]}}
    test_fixed, _ = evaluate(clip, classnames, test, fixed, opts, progress=False)
    (test_auto,), _ = evaluate(clip, classnames, test, ["auto"], auto_opts, progress=False)
    (test_traced,), _ = evaluate(clip, classnames, test, ["auto"], traced_opts, progress=False)
    test_truth = [classnames[y] for _, y, _ in test]
    test_sweep = sweep_rows(test_traced, test_truth, [t[0]["label"] for t in test_traced.traces], THRESHOLDS)
    rows = [row(r) for r in test_fixed]
    auto_row = row(test_auto)
    # auto's robust cost: the traced test run's tier medians, weighted by how often auto at the
    # chosen threshold reached each tier
    tier_ms = [statistics.median(t[j]["ms"] for t in test_traced.traces) for j in range(len(test_traced.traces[0]))]
    auto_row["robust_cost_ms"] = statistics.fmean(sum(tier_ms[:k]) for k in _first_stop(test_traced, chosen))
    rows.append(auto_row)
    best = max(rows[:-1], key=lambda r: (r["accuracy"], -r["robust_cost_ms"]))
    run = {
        "shift": shift, "severity": severity, "tiers": tiers, "gate": gate, "views": views,
        "calibration_images": len(calib), "test_images": len(test),
        "chosen_threshold": chosen["threshold"], "calibration_sweep": cal_sweep, "test_sweep": test_sweep,
        "results": rows, "best_fixed": best["method"],
        "auto_minus_best_accuracy_points": round(100 * (auto_row["accuracy"] - best["accuracy"]), 2),
        "auto_cost_over_best_robust": round(auto_row["robust_cost_ms"] / best["robust_cost_ms"], 3),
        "auto_cost_over_best_measured_mean": round(auto_row["latency_ms_mean"] / best["latency_ms_mean"], 3),
    }
    run["figure"] = draw(run)
    return run


def draw(run: dict) -> str:
    """The held-out curve with the fixed methods and auto at the chosen threshold (robust costs)."""
    name = f"auto_digits_{run['shift']}_{run['tiers'].replace(',', '-').replace(':', '')}.png"
    chosen = next(r for r in run["test_sweep"] if r["threshold"] == run["chosen_threshold"])
    plot_sweep(str(ROOT / "bench" / "results" / name), run["test_sweep"], run["results"], chosen,
               f"digits {run['shift']} (severity {run['severity']}), tiny-digits, tiers {run['tiers']}, "
               f"held-out {run['test_images']} images")
    return f"bench/results/{name}"


def _first_stop(traced: MethodResult, chosen: dict) -> list[int]:
    """How many tiers `auto` at the chosen threshold runs per image (replayed from the trace)."""
    out = []
    threshold = chosen["threshold"]
    for trace in traced.traces:
        k = len(trace)
        for j, step in enumerate(trace[:-1]):
            if threshold < 1.0 and step["gate"] >= threshold:
                k = j + 1
                break
        out.append(k)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.bench_auto", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shifts", default="rotate,noise")
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--tiers", default="zeroshot,zero:32;zeroshot,zero:32,tpt:64;zeroshot,zero:16,tpt:64",
                   help="';'-separated tier lists, each benchmarked (default: %(default)s)")
    p.add_argument("--gate", default="max_prob", choices=("max_prob", "margin", "entropy"))
    p.add_argument("--views", type=int, default=64, help="views of the fixed zero and tpt")
    p.add_argument("--methods", default="zeroshot,zero,tpt")
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "auto_digits.json"))
    p.add_argument("--replot", action="store_true", help="redraw the figures from --out's JSON, run nothing")
    args = p.parse_args(argv)
    if args.replot:
        for run in json.loads(Path(args.out).read_text(encoding="utf-8"))["runs"]:
            print(draw(run))
        return 0
    torch.set_num_threads(1)  # tiny model: one thread is fastest and steadiest on a busy 2-core box
    clip = load_model("tiny-digits")
    fixed = args.methods.split(",")
    start = time.time()
    runs = [bench_shift(clip, s, args.severity, tiers, args.views, fixed, args.tolerance, args.gate)
            for s in args.shifts.split(",") for tiers in args.tiers.split(";")]
    out = {"model": "tiny-digits", "device": "cpu (no GPU this session)", "cores": os.cpu_count(),
           "threads": 1, "load_average_at_end": os.getloadavg(), "wall_s": round(time.time() - start, 1),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    for run in runs:
        print(f"\ndigits {run['shift']} sev {run['severity']}: tiers {run['tiers']}, gate {run['gate']}, threshold "
              f"{run['chosen_threshold']} (calibrated on the other {run['calibration_images']} images)")
        print(f"{'method':<9} {'acc':>7} {'escal.':>7} {'robust ms':>10} {'mean ms':>9} {'p95 ms':>9} {'enc img':>8}")
        for r in run["results"]:
            esc = f"{r['escalation_rate']:.3f}" if r["escalation_rate"] is not None else "-"
            enc = f"{r['encoded_images_mean']:.1f}" if r["encoded_images_mean"] is not None else "-"
            print(f"{r['method']:<9} {r['accuracy']:>7.4f} {esc:>7} {r['robust_cost_ms']:>10.2f} "
                  f"{r['latency_ms_mean']:>9.2f} {r['latency_ms_p95']:>9.2f} {enc:>8}")
        print(f"auto - best fixed ({run['best_fixed']}): {run['auto_minus_best_accuracy_points']:+.2f} points at "
              f"{run['auto_cost_over_best_robust']:.2f}x its robust cost "
              f"({run['auto_cost_over_best_measured_mean']:.2f}x measured mean)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
