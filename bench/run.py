"""Per-request latency and peak memory of the methods, with ratios measured in one run.

    python -m bench.run                 # the full table (ViT-B-16-random; tens of minutes on 2 cores)
    python -m bench.run --quick         # seconds: tiny-random, 10 classes, few views, in-process

Each configuration (method, implementation, classes, views) runs in its own subprocess, so its
peak RSS (``ru_maxrss``: model + activations + allocator) is its own. Latency is the median over
``--requests`` requests of one image each (skimage photos, view seed = request index) after one
warm-up request that also builds the per-label-set caches (ours pays those once per label set,
so the first request is reported separately as ``latency_s_first``). The straightforward TPT
(bench/reference_tpt.py) is the baseline; it gets no warm-up (its requests are all alike and it
is the slow one). ``top1_agrees_with_baseline`` compares each request's top-1 with the baseline's
on the same image and views (TPT) or with eager PyTorch (the ONNX Runtime encoder).

Writes bench/results/latest.json: {"machine": ..., "records": [...], "ratios": [...], "skipped": [...]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache"
PARTIAL = RESULTS / "partial.jsonl.tmp"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera")
HEAVY_METHODS = ("difftpt", "rlcf")  # generative / two-model methods: bench/bench_heavy.py


@dataclass
class Config:
    """One cell of the table."""

    method: str
    impl: str  # "baseline" (reference TPT), "ours", "onnx" (ours + ONNX Runtime image encoder)
    model: str
    n_classes: int
    n_views: int
    requests: int = 3
    threads: int = 1  # torch threads in the worker (0: torch's default)

    @property
    def key(self) -> tuple:
        return (self.method, self.impl, self.n_classes, self.n_views)


@dataclass
class Record:
    method: str
    impl: str
    model: str
    n_classes: int
    n_views: int
    device: str
    latency_s_median: float | None
    peak_rss_mb: float | None
    top1_agrees_with_baseline: bool | None = None
    latency_s_first: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)
    status: str = "ok"
    max_prob_diff_vs_baseline: float | None = None
    cpu_s_median: float | None = None  # process CPU seconds per request (one thread: = latency on an idle core)
    cpu_s: list[float] = field(default_factory=list)
    probs: list[list[float]] = field(default_factory=list)  # per request; dropped from latest.json


# --- one configuration (runs inside the worker process) --------------------------------------------

def _photos(n: int) -> list[torch.Tensor]:
    from skimage import data

    out = []
    for i in range(n):
        array = getattr(data, PHOTOS[i % len(PHOTOS)])()
        if array.ndim == 2:
            array = array[..., None].repeat(3, axis=-1)
        out.append(torch.from_numpy(array[..., :3].copy()).permute(2, 0, 1).contiguous())
    return out


def _classnames(n: int) -> list[str]:
    from tta.text import imagenet_classnames

    names = list(imagenet_classnames())
    if n <= len(names):
        return names[:n]
    return names + [f"class {i}" for i in range(len(names), n)]


def onnx_file(model: str) -> Path:
    return CACHE / f"{model.replace('/', '_').replace(':', '_')}-image-encoder.onnx"


def _method_options(method: str, n_views: int) -> dict[str, Any]:
    from tta.methods.base import get_method_class

    fields = get_method_class(method).Options.__dataclass_fields__
    return {"n_views": n_views} if "n_views" in fields else {}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across exec,
    so a worker forked from a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_MODELS: dict[str, Any] = {}


def _load(spec: str) -> Any:
    """In-process runs (--quick) share one model; a worker process loads it once anyway."""
    from tta.models import load_model

    if spec not in _MODELS:
        _MODELS[spec] = load_model(spec)
    return dataclasses.replace(_MODELS[spec], info={}, image_encoder=None)


def run_config(cfg: Config) -> Record:
    """Time one configuration in this process; peak RSS is this process's (meaningful in a worker)."""
    from tta.engine import Engine
    from tta.text import LabelSet
    from tta.views import ViewSpec, make_views

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    clip = _load(cfg.model)
    names = _classnames(cfg.n_classes)
    images = _photos(cfg.requests + 1)
    latencies, top1, probs, cpu = [], [], [], []
    if cfg.impl == "baseline":
        from bench.reference_tpt import ReferencePrompt, reference_tpt

        prompt = ReferencePrompt(clip, names)
        for i in range(cfg.requests):
            start, cpu0 = time.perf_counter(), time.process_time()
            views = make_views(images[i], clip.image_size, clip.mean, clip.std, ViewSpec(n_views=cfg.n_views),
                               generator=torch.Generator().manual_seed(i))
            out = reference_tpt(clip, prompt, views)
            latencies.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu0)
            top1.append(int(out["probs"].argmax()))
            probs.append(out["probs"].tolist())
        first = latencies[0]
    else:
        if cfg.impl == "onnx":
            from tta.onnx_encoder import enable_if_faster

            if enable_if_faster(clip, onnx_file(cfg.model), mode="on") is None:
                raise RuntimeError(f"no usable ONNX encoder at {onnx_file(cfg.model)}")
        labels = LabelSet.create(names)
        engine = Engine(clip, labels, default_method=cfg.method, max_labels=max(1000, cfg.n_classes))
        engine.text_cache = PrefilledTextCache(clip, labels)
        options = _method_options(cfg.method, cfg.n_views)
        warmup = _method_options(cfg.method, min(cfg.n_views, 2))
        start = time.perf_counter()
        engine.predict(images[-1], options=warmup, seed=10_000)  # allocator, thread pools, label-set caches
        first = time.perf_counter() - start
        for i in range(cfg.requests):
            start, cpu0 = time.perf_counter(), time.process_time()
            pred = engine.predict(images[i], options=options, seed=i, top_k=1)
            latencies.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu0)
            top1.append(int(pred.probs.argmax()))
            probs.append(pred.probs.tolist())
    peak = peak_rss_mb()
    return Record(cfg.method, cfg.impl, cfg.model, cfg.n_classes, cfg.n_views, str(clip.device),
                  statistics.median(latencies), round(peak, 1), None, first, latencies, top1, probs=probs,
                  cpu_s_median=statistics.median(cpu), cpu_s=cpu)


class PrefilledTextCache:
    """The engine's zero-shot classifier for the bench's label set, computed with the truncated
    text encoder (equal to `tta.text.class_embeddings` within 1e-5, tests/unit/test_speedups.py).
    Building it the 77-token way is a one-off per label set (minutes for 1000 classes on one core)
    that no per-request number includes; the bench skips it to fit its time budget."""

    def __init__(self, clip: Any, labels: Any) -> None:
        from tta.prompts import PromptLearner

        self.labels = labels
        self.features = PromptLearner(clip, labels.names).initial_text_features()

    def get(self, clip: Any, labels: Any) -> torch.Tensor:
        if labels != self.labels:
            from tta.text import class_embeddings

            return class_embeddings(clip, labels)
        return self.features


# --- orchestration -------------------------------------------------------------------------------

def run_in_subprocess(cfg: Config, timeout_s: float) -> Record:
    cmd = [sys.executable, "-m", "bench.run", "--worker", json.dumps(asdict(cfg))]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=_worker_env())
    except subprocess.TimeoutExpired:
        return _failed(cfg, f"timeout after {timeout_s:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        log.warning("%s failed: %s\n%s", cfg.key, reason, proc.stderr[-2000:])
        return _failed(cfg, reason)
    record = Record(**json.loads(lines[-1]))
    with PARTIAL.open("a", encoding="utf-8") as handle:  # survives an interrupted run
        handle.write(json.dumps({k: v for k, v in asdict(record).items() if k != "probs"}) + "\n")
    log.info("%-9s %-8s C=%-5d V=%-3d %.3f s  %.0f MB  (%.0f s wall)", cfg.method, cfg.impl, cfg.n_classes,
             cfg.n_views, record.latency_s_median, record.peak_rss_mb, time.perf_counter() - start)
    return record


def _worker_env() -> dict[str, str]:
    """Workers may cache bytecode (outside the venv): compiling torch on every start costs ~20 s."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(CACHE / "pycache"))
    return env


def _failed(cfg: Config, reason: str) -> Record:
    return Record(cfg.method, cfg.impl, cfg.model, cfg.n_classes, cfg.n_views, "cpu", None, None, status=reason)


def plan(args: argparse.Namespace, methods: list[str]) -> list[Config]:
    """Configurations; forward-only methods other than zeroshot cost the same at any label-set size
    (image encoding dominates), so `--side-classes` may restrict them to fewer sizes."""
    out: list[Config] = []
    side = set(args.side_classes or args.classes)
    onnx = set(args.onnx_classes or args.classes) if args.onnx else set()

    def add(method: str, impl: str, c: int, v: int, requests: int) -> None:
        out.append(Config(method, impl, args.model, c, v, requests, args.threads))

    large_views = set(args.large_view_classes or args.classes)
    for n_classes in args.classes:
        if "zeroshot" in methods:
            add("zeroshot", "ours", n_classes, 1, args.zeroshot_requests)
            if args.onnx:
                add("zeroshot", "onnx", n_classes, 1, args.zeroshot_requests)
        for n_views in args.views:
            if n_views > min(args.views) and n_classes not in large_views:
                continue
            for method in methods:
                if method == "tpt" and n_classes <= args.baseline_max_classes:
                    add("tpt", "baseline", n_classes, n_views, args.baseline_requests)
                if method == "tpt" or (method != "zeroshot" and n_classes in side):
                    add(method, "ours", n_classes, n_views, args.requests)
                    if method in ("tpt", "zero") and n_classes in onnx:
                        add(method, "onnx", n_classes, n_views, args.requests)
    return out


def run_all(configs: list[Config], args: argparse.Namespace) -> list[Record]:
    """Two lanes when --jobs 2: the slow baseline configurations in one, the rest in the other
    (each worker has its own thread budget; at most one baseline holds its large memory at a time)."""
    if args.quick:
        return [run_config(c) for c in configs]
    if args.jobs <= 1:
        return [run_in_subprocess(c, args.timeout) for c in configs]
    from concurrent.futures import ThreadPoolExecutor

    base = [c for c in configs if c.impl == "baseline"]
    rest = [c for c in configs if c.impl != "baseline"]
    if args.jobs == 2:
        lanes = [base, rest]
    else:  # the two largest baselines get a lane of their own; with 4, TPT apart from the rest
        big = sorted(base, key=lambda c: c.n_classes * (77 + c.n_views))[-2:]
        lanes = [big, [c for c in base if c not in big]]
        if args.jobs == 3:
            lanes.append(rest)
        else:
            lanes += [[c for c in rest if c.method == "tpt"], [c for c in rest if c.method != "tpt"]]
    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        futures = [pool.submit(lambda lane=lane: [run_in_subprocess(c, args.timeout) for c in lane]) for lane in lanes]
        done = {r.method + r.impl + str(r.n_classes) + "/" + str(r.n_views): r for f in futures for r in f.result()}
    return [done[c.method + c.impl + str(c.n_classes) + "/" + str(c.n_views)] for c in configs]


def agreement(records: list[Record]) -> None:
    """Fill `top1_agrees_with_baseline`: TPT vs the reference TPT, ONNX vs eager, per request."""
    by_key = {(r.method, r.impl, r.n_classes, r.n_views): r for r in records if r.status == "ok"}
    for r in records:
        if r.status != "ok":
            continue
        if r.method == "tpt" and r.impl != "baseline":
            ref = by_key.get(("tpt", "baseline", r.n_classes, r.n_views))
        elif r.impl == "onnx":
            ref = by_key.get((r.method, "ours", r.n_classes, r.n_views))
        else:
            continue
        if ref is not None:
            n = min(len(ref.top1), len(r.top1))
            r.top1_agrees_with_baseline = n > 0 and r.top1[:n] == ref.top1[:n]
            diffs = [max(abs(a - b) for a, b in zip(p, q, strict=True)) for p, q in zip(r.probs[:n], ref.probs[:n],
                                                                                     strict=True)]
            r.max_prob_diff_vs_baseline = max(diffs) if diffs else None


def ratios(records: list[Record]) -> list[dict[str, Any]]:
    """ours/baseline for TPT and method/zeroshot, from this run's medians."""
    ok = {(r.method, r.impl, r.n_classes, r.n_views): r for r in records if r.status == "ok"}
    out = []
    for (method, impl, c, v), r in ok.items():
        base = ok.get(("tpt", "baseline", c, v))
        if method == "tpt" and impl != "baseline" and base is not None:
            out.append({"what": f"tpt {impl} vs baseline", "n_classes": c, "n_views": v,
                        "speedup": round(base.latency_s_median / r.latency_s_median, 2),
                        "speedup_cpu": round(base.cpu_s_median / r.cpu_s_median, 2),
                        "memory_ratio": round(base.peak_rss_mb / r.peak_rss_mb, 2)})
        zs = ok.get(("zeroshot", "ours", c, 1))
        if zs is not None and not (method == "zeroshot" and impl == "ours"):
            out.append({"what": f"{method} {impl} / zeroshot", "n_classes": c, "n_views": v,
                        "latency_ratio": round(r.latency_s_median / zs.latency_s_median, 1),
                        "cpu_ratio": round(r.cpu_s_median / zs.cpu_s_median, 1)})
    return out


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gb, "torch_threads": args.threads or torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(), "load_average_at_start": os.getloadavg(), "model": args.model,
        "requests_per_config": args.requests, "baseline_requests_per_config": args.baseline_requests,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _lookups(rat: list[dict[str, Any]]) -> tuple[dict, dict]:
    speed = {(x["n_classes"], x["n_views"], x["what"].split(" ")[1]): (x["speedup_cpu"], x["speedup"])
             for x in rat if "speedup" in x}
    vs_zs = {(x["what"].split(" ")[0], x["what"].split(" ")[1], x["n_classes"], x["n_views"]): x["cpu_ratio"]
             for x in rat if "cpu_ratio" in x}
    return speed, vs_zs


def format_table(records: list[Record], rat: list[dict[str, Any]]) -> str:
    """Speed-ups and /zeroshot ratios from CPU seconds (wall-clock speed-up in brackets)."""
    speed, vs_zs = _lookups(rat)
    header = (f"{'method':<9} {'impl':<9} {'classes':>7} {'views':>5} {'p50 s':>8} {'cpu s':>8} {'RSS MB':>7} "
              f"{'top1=base':>9} {'x faster (wall)':>16} {'/zeroshot':>9}")
    lines = [header, "-" * len(header)]
    for r in records:
        if r.status != "ok":
            lines.append(f"{r.method:<9} {r.impl:<9} {r.n_classes:>7} {r.n_views:>5}   {r.status}")
            continue
        agree = "" if r.top1_agrees_with_baseline is None else ("yes" if r.top1_agrees_with_baseline else "NO")
        fast = speed.get((r.n_classes, r.n_views, r.impl)) if r.method == "tpt" else None
        zs = vs_zs.get((r.method, r.impl, r.n_classes, r.n_views))
        lines.append(
            f"{r.method:<9} {r.impl:<9} {r.n_classes:>7} {r.n_views:>5} {r.latency_s_median:>8.3f} "
            f"{r.cpu_s_median:>8.3f} {r.peak_rss_mb:>7.0f} {agree:>9} "
            f"{'' if fast is None else f'{fast[0]:.2f} ({fast[1]:.2f})':>16} {'' if zs is None else f'{zs:.1f}':>9}"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The README table from a saved latest.json (so the README is regenerated, not retyped)."""
    speed, vs_zs = _lookups(report["ratios"])
    lines = ["| method | impl | classes | views | CPU s / request | wall s (p50) | peak RSS MB | top-1 = baseline | "
             "speed-up vs baseline, CPU (wall) | CPU x zeroshot |", "|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|"]
    for r in report["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['impl']} | {r['n_classes']} | {r['n_views']} | {r['status']} | | | | | |")
            continue
        agree = {None: "", True: "yes", False: "**no**"}[r["top1_agrees_with_baseline"]]
        fast = speed.get((r["n_classes"], r["n_views"], r["impl"])) if r["method"] == "tpt" else None
        zs = vs_zs.get((r["method"], r["impl"], r["n_classes"], r["n_views"]))
        lines.append(f"| {r['method']} | {r['impl']} | {r['n_classes']} | {r['n_views']} | {r['cpu_s_median']:.2f} | "
                     f"{r['latency_s_median']:.2f} | {r['peak_rss_mb']:.0f} | {agree} | "
                     f"{'' if fast is None else f'**{fast[0]:.2f}x** ({fast[1]:.2f}x)'} | "
                     f"{'' if zs is None else f'{zs:.1f}'} |")
    return "\n".join(lines)


def ensure_onnx(model: str) -> Path:
    """Export the model's image encoder once (cached under bench/.cache)."""
    from tta.models import load_model
    from tta.onnx_encoder import export_image_encoder

    path = onnx_file(model)
    if not path.is_file():
        export_image_encoder(load_model(model), path)
    return path


def encoder_choice(model: str, threads: int) -> dict[str, Any]:
    """The load-time measurement a server would make (batch 8), recorded with the machine."""
    from tta.models import load_model
    from tta.onnx_encoder import OnnxImageEncoder, time_encoders

    if threads:
        torch.set_num_threads(threads)
    clip = load_model(model)
    return time_encoders(clip, OnnxImageEncoder(onnx_file(model)), batch=8, repeats=3).to_dict()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="ViT-B-16-random")
    p.add_argument("--classes", default="10,100,300,1000")
    p.add_argument("--views", default="16,64")
    p.add_argument("--methods", default="zeroshot,zero,tpt,tda",
                   help="methods to run; 'all' = every registered one except difftpt/rlcf (bench_heavy.py)")
    p.add_argument("--requests", type=int, default=3, help="timed requests per configuration")
    p.add_argument("--baseline-requests", type=int, default=3)
    p.add_argument("--baseline-max-classes", type=int, default=300,
                   help="largest label set for the reference TPT (1000 does not fit 24 GiB on CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (0: torch's default); 1 keeps timings sane on a shared machine")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2, 3, 4),
                   help="parallel lanes: 2 = baselines | the rest; 3 = the two largest baselines | other baselines | "
                        "the rest; 4 = ... | TPT | the rest (CPU seconds per request stay comparable; wall-clock does not)")
    p.add_argument("--zeroshot-requests", type=int, default=3, help="timed requests for zeroshot (cheap)")
    p.add_argument("--large-view-classes", default="",
                   help="label-set sizes that also run the larger view counts (default: all)")
    p.add_argument("--side-classes", default="", help="label-set sizes for zero/tda/... (default: --classes)")
    p.add_argument("--onnx-classes", default="", help="label-set sizes for the ONNX rows (default: --classes)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX Runtime rows")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per configuration")
    p.add_argument("--out", default=str(RESULTS / "latest.json"))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny-random, 10 classes, in-process")
    p.add_argument("--markdown", metavar="JSON", help="print the README table of a saved run and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.classes, args.views, args.requests, args.baseline_requests = "tiny-random", "10", "4", 1, 1
    args.classes = [int(x) for x in str(args.classes).split(",")]
    args.views = [int(x) for x in str(args.views).split(",")]
    args.side_classes = [int(x) for x in args.side_classes.split(",") if x]
    args.large_view_classes = [int(x) for x in args.large_view_classes.split(",") if x]
    args.onnx_classes = [int(x) for x in args.onnx_classes.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text(encoding="utf-8"))))
        return 0
    if args.worker:
        record = run_config(Config(**json.loads(args.worker)))
        print(json.dumps(asdict(record)), flush=True)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    from tta.methods.base import list_methods

    registered = list_methods()
    methods = [m for m in registered if m not in HEAVY_METHODS] if args.methods == "all" else args.methods.split(",")
    missing = [m for m in methods if m not in registered]
    methods = [m for m in methods if m in registered]
    info = machine(args)
    if args.onnx:
        ensure_onnx(args.model)
        info["onnx_encoder_choice"] = encoder_choice(args.model, args.threads)
    records = run_all(plan(args, methods), args)
    agreement(records)
    rat = ratios(records)
    skipped = [{"what": f"tpt baseline at {c} classes",
                "why": f"above --baseline-max-classes={args.baseline_max_classes}: the full-context fp32 reference "
                       "keeps every activation of 77 tokens x C classes (measured 5.2 GB at 100 classes and 9.8 GB at "
                       "300 with 16 views; 1000 was killed for memory on a 24 GiB machine)"}
               for c in args.classes if c > args.baseline_max_classes and "tpt" in methods]
    skipped += [{"what": m, "why": "not registered when this run was made"} for m in missing]
    info["load_average_at_end"] = os.getloadavg()
    if args.quick:
        info["note"] = "quick smoke run in one process: peak RSS is cumulative, not per configuration"
    saved = [{k: v for k, v in asdict(r).items() if k != "probs"} for r in records]
    out = {"machine": info, "records": saved, "ratios": rat, "skipped": skipped}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"# {info['cpu']} ({info['cores']} cores, {info['memory_gib']} GiB), torch {info['torch']}, "
          f"threads {info['torch_threads']}, model {args.model}, device cpu; load avg {info['load_average_at_start']}")
    print(format_table(records, rat))
    for s in skipped:
        print(f"skipped: {s['what']}: {s['why']}")
    if "onnx_encoder_choice" in info:
        c = info["onnx_encoder_choice"]
        print(f"image encoder at load (batch {c['batch']}): eager {c['eager_s']:.3f} s, onnx {c['onnx_s']:.3f} s "
              f"-> {c['chosen']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
