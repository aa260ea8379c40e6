"""Cost of the heavy methods (DiffTPT, RLCF) against TPT and zero-shot, measured in one run.

Each method runs in its own child process (so peak memory is the method's own), on the same
images with the same seed: one warm-up request (it loads the generator / reward model; its time
is reported as `load_s`), then `--repeats` passes over the images. Latency is the median
per-request wall time through `Engine.predict`; peak memory is the process's peak resident set
above its level before the method's first request (CPU), or the CUDA allocator's peak (GPU).
Ratios are against zeroshot and tpt of the same run.

    .venv/bin/python bench/bench_heavy.py                 # CPU, tiny models (default)
    .venv/bin/python bench/bench_heavy.py --device cuda --model ViT-B-16-random \\
        --reward-model ViT-L-14-random --generator sd-random --n-generated 63 --diffusion-steps 50

Writes bench/results/heavy_latest.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "heavy_latest.json"
LABELS = ("cat", "dog", "astronaut", "coffee cup", "rocket", "car", "tree", "house", "bird", "fish")
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
METHODS = ("zeroshot", "tpt", "difftpt", "difftpt-lite", "rlcf", "rlcf-image")

log = logging.getLogger("bench_heavy")


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is this method's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _method_options(args: argparse.Namespace, name: str) -> tuple[str, dict[str, Any]]:
    common = {"n_views": args.n_views}
    if name == "zeroshot":
        return name, {}
    if name == "tpt":
        return name, common
    if name in ("difftpt", "difftpt-lite"):  # lite: a serving-sized budget (few views, few steps)
        lite = name == "difftpt-lite"
        return "difftpt", {**common, "generator": args.generator,
                           "n_generated": args.lite_generated if lite else args.n_generated,
                           "max_generated": max(64, args.n_generated),
                           "diffusion_steps": args.lite_steps if lite else args.diffusion_steps,
                           "time_budget_ms": 1e9}
    variant = "image" if name == "rlcf-image" else "prompt"
    return "rlcf", {**common, "reward_model": args.reward_model, "variant": variant}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this process; returns the JSON record."""
    import torch
    from skimage import data

    from tta.engine import Engine
    from tta.models import load_model, resolve_device
    from tta.text import LabelSet

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    clip = load_model(args.model, device=device)
    method, options = _method_options(args, args.child)
    engine = Engine(clip, LabelSet.create(LABELS), method_defaults={method: options})
    images = [torch.from_numpy(getattr(data, n)().copy()).permute(2, 0, 1).contiguous() for n in PHOTOS]
    engine.predict(images[0], method="zeroshot")  # text features and kernels warm for everyone
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    base_rss = _rss_mb("VmRSS")
    reset_ok = _reset_peak_rss()
    start = time.perf_counter()
    warm = engine.predict(images[0], method=method, seed=0)
    load_s = time.perf_counter() - start
    latencies, stages, extras = [], {}, []
    for _ in range(args.repeats):
        for i, image in enumerate(images):
            t0 = time.perf_counter()
            pred = engine.predict(image, method=method, seed=i)
            latencies.append((time.perf_counter() - t0) * 1000.0)
            for k, v in pred.timings_ms.items():
                stages.setdefault(k, []).append(v)
            extras.append({k: v for k, v in pred.extra.items() if k in ("fallback", "generated_views")})
    record = {
        "method": args.child, "options": options, "requests": len(latencies),
        "latency_ms_median": statistics.median(latencies), "latency_ms_min": min(latencies),
        "latency_ms_max": max(latencies), "load_s": load_s - statistics.median(latencies) / 1000.0,
        "stages_ms_median": {k: statistics.median(v) for k, v in stages.items()},
        "fallbacks": sum(1 for e in extras if "fallback" in e),
        "warmup_extra": {k: v for k, v in warm.extra.items() if k in ("fallback", "generated_views")},
    }
    if cuda:
        record["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
        record["peak_mem_kind"] = "cuda max_memory_allocated above the pre-request level"
    else:
        peak = _rss_mb("VmHWM")
        record["peak_mem_mb"] = peak - base_rss
        record["peak_mem_kind"] = "process peak RSS above the pre-request level" + ("" if reset_ok else
                                                                                    " (peak not resettable)")
    return record


def _table(records: list[dict[str, Any]]) -> str:
    by = {r["method"]: r for r in records}
    zs, tpt = by.get("zeroshot"), by.get("tpt")
    lines = [f"{'method':<11} {'median ms':>10} {'x zeroshot':>10} {'x tpt':>7} {'peak MiB':>9} "
             f"{'x tpt mem':>9} {'load s':>7}  stages (median ms)"]
    for r in records:
        lat, mem = r["latency_ms_median"], r["peak_mem_mb"]
        rz = lat / zs["latency_ms_median"] if zs else float("nan")
        rt = lat / tpt["latency_ms_median"] if tpt else float("nan")
        mt = mem / tpt["peak_mem_mb"] if tpt and tpt["peak_mem_mb"] > 0 else float("nan")
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages_ms_median"].items() if k not in ("total", "text"))
        lines.append(f"{r['method']:<11} {lat:>10.1f} {rz:>10.1f} {rt:>7.2f} {mem:>9.1f} {mt:>9.2f} "
                     f"{r['load_s']:>7.2f}  {stages}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--reward-model", default="tiny-random")
    parser.add_argument("--generator", default="tiny-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n-views", type=int, default=64)
    parser.add_argument("--n-generated", type=int, default=63)
    parser.add_argument("--diffusion-steps", type=int, default=50)
    parser.add_argument("--lite-generated", type=int, default=8, help="difftpt-lite: generated views")
    parser.add_argument("--lite-steps", type=int, default=10, help="difftpt-lite: diffusion steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids spin-wait on a busy box)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    records = []
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONPATH": str(REPO)}
    for name in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", name] + [a for a in (argv or sys.argv[1:])]
        log.info("measuring %s ...", name)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            log.error("%s failed:\n%s", name, out.stderr[-2000:])
            continue
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = _table(records)
    print(table)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_avg": os.getloadavg()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "records": records, "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
