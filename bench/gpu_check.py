"""Every GPU figure the project lacks, in one call of at most 8 minutes on one H100/H200.

    python -m bench.gpu_check                      # on CUDA: bench/results/gpu.json + gpu.md
    python -m bench.gpu_check --dry-run            # the same plan on CPU, tiny sizes, in seconds

The plan (each step timed and its peak memory recorded; a failing step is recorded, not fatal):
1. ``cuda_tests``: the suite's CUDA tests (``pytest -m gpu``) in a subprocess (the dry run only
   selects them: on CPU they skip);
2. ``autocast_parity``: zero-shot under bf16/fp16 autocast and TPT with ``precision=bf16/fp16``
   against fp32 on real photos (scikit-image) with ViT-B-16-random: top-1 agreement (also counted
   only where fp32's top-2 margin exceeds the measured probability error, since a random-weights
   model has near-ties) and the max probability error;
3. ``tpt_latency``: TPT at 1000 classes x 64 views, one step, fp32 and bf16, through
   `Engine.predict` (median of repeats after a warm-up; goal < 100 ms);
4. ``zeroshot_throughput``: zero-shot images/s at batch 1/8/32/128 through `Engine.predict_batch`;
5. ``oom_retry``: the engine's out-of-memory path (halve the views twice, then zero-shot) under
   a forced small cap (`torch.cuda.set_per_process_memory_fraction`); on CPU (dry run) an image
   encoder that raises `torch.OutOfMemoryError` above a view count stands in for the cap;
6. ``peak_memory``: `torch.cuda.max_memory_allocated` per step and overall.

The GPU machines have torch, torchvision, numpy, timm, transformers, scikit-image and pytest but not
open_clip: carry its wheels (``bash scripts/gpu_wheels.sh``; docs/gpu-check.md has the command).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# scikit-image's bundled photos (grayscale ones as RGB) and the class names to score them against
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "logo", "camera", "coins", "page")
PHOTO_LABELS = ("astronaut", "cat", "coffee cup", "rocket", "galaxy", "tissue sample", "retina", "color wheel",
                "logo", "photographer", "coins", "page of text", "dog", "car", "tree", "bird")

log = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the real check on CUDA, or the dry run on CPU (same steps, tiny sizes)."""

    device: str
    model: str
    classes: int
    views: int
    batches: tuple[int, ...]
    repeats: int
    oom_views: int
    budget_s: float
    photos: int


GPU_PLAN = Plan("cuda", "ViT-B-16-random", 1000, 64, (1, 8, 32, 128), 10, 256, 420.0, len(PHOTOS))
DRY_PLAN = Plan("cpu", "tiny-random", 20, 8, (1, 2, 4), 2, 16, 300.0, 4)


def _photos(n: int | None = None) -> list[torch.Tensor]:
    from skimage import data

    out = []
    for name in PHOTOS[:n]:
        try:
            array = getattr(data, name)()
        except Exception as exc:  # a photo that would need a download: the others suffice
            log.warning("skimage.data.%s unavailable (%s)", name, exc)
            continue
        image = torch.from_numpy(array.copy())
        image = image.unsqueeze(-1).expand(-1, -1, 3) if image.ndim == 2 else image[..., :3]
        out.append(image.permute(2, 0, 1).contiguous())
    return out


def _class_names(n: int) -> list[str]:
    """The first `n` ImageNet class names (n <= 1000): real prompt lengths for the text encoder."""
    from tta.text import imagenet_classnames

    return list(imagenet_classnames())[:n]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB; process-wide


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Check:
    """Runs the steps in order within a time budget and collects one JSON-able record per step."""

    def __init__(self, plan: Plan, dry_run: bool) -> None:
        self.plan, self.dry_run = plan, dry_run
        self.device = torch.device(plan.device)
        self.start = time.perf_counter()
        self.steps: dict[str, dict[str, Any]] = {}
        self._clip = None

    def clip(self):
        if self._clip is None:
            from tta.models import load_model

            self._clip = load_model(self.plan.model, device=self.device)
        return self._clip

    def run(self, name: str, step: Callable[[], dict[str, Any]]) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed > self.plan.budget_s:
            self.steps[name] = {"status": "skipped", "reason": f"budget of {self.plan.budget_s:.0f} s spent"}
            return
        _reset_peak(self.device)
        began = time.perf_counter()
        try:
            record = {"status": "ok", **step()}
        except Exception as exc:  # recorded; the other figures are still worth having
            log.exception("step %s failed", name)
            record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        _sync(self.device)
        record["seconds"] = round(time.perf_counter() - began, 2)
        record["peak_memory_mb"] = round(_peak_mb(self.device), 1)
        self.steps[name] = record
        log.info("%s: %s", name, json.dumps(record)[:400])

    # --- steps -----------------------------------------------------------------------------------
    def cuda_tests(self) -> dict[str, Any]:
        """`pytest -m gpu` on the files that hold CUDA tests (on CPU they skip: the plumbing is checked)."""
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                       if "mark.gpu" in p.read_text())
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=", *files]
        if not files:
            raise RuntimeError("no test file carries @pytest.mark.gpu")
        if self.dry_run:  # on CPU they would only skip; a second interpreter costs more than the rest
            return {"files": files, "command": " ".join(cmd[1:]), "executed": False,
                    "summary": f"not run in the dry run: {len(files)} file(s) selected"}
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = (out.stdout + out.stderr).strip().splitlines()
        summary = next((ln for ln in reversed(lines) if " in " in ln and ("passed" in ln or "skipped" in ln
                                                                           or "failed" in ln or "error" in ln)), "")
        if out.returncode not in (0, 5):
            raise RuntimeError(f"pytest -m gpu exited {out.returncode}: " + "\n".join(lines[-30:]))
        return {"files": files, "executed": True, "returncode": out.returncode, "summary": summary.strip("= ")}

    def autocast_parity(self) -> dict[str, Any]:
        import torch.nn.functional as F

        from tta.engine import Engine
        from tta.text import LabelSet
        from tta.views import base_view, normalize

        clip = self.clip()
        labels = LabelSet.create(PHOTO_LABELS)
        photos = _photos(self.plan.photos)
        views = torch.stack([normalize(base_view(p, clip.image_size), clip.mean, clip.std) for p in photos])
        views = views.to(self.device)
        tokens = clip.tokenizer([f"a photo of a {n}." for n in labels.names]).to(self.device)

        def zeroshot_probs(dtype: torch.dtype | None) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype or torch.float32,
                                                 enabled=dtype is not None):
                img = F.normalize(clip.model.encode_image(views).float(), dim=-1)
                txt = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)
            return (clip.logit_scale * img @ txt.t()).softmax(-1)

        out: dict[str, Any] = {"model": self.plan.model, "images": len(photos), "classes": len(labels)}
        exact = zeroshot_probs(None)
        engine = Engine(clip, labels)
        tpt_exact = [engine.predict(p, method="tpt", options={"n_views": self.plan.views}, seed=i).probs
                     for i, p in enumerate(photos)]
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if self.device.type == "cpu" and dtype is torch.float16:
                continue  # CPU autocast is bf16-only in the project (tpt.autocast_dtype)
            mixed = zeroshot_probs(dtype)
            out[f"zeroshot_{name}"] = _agreement(exact, mixed)
            tpt_mixed = [engine.predict(p, method="tpt", options={"n_views": self.plan.views, "precision": name},
                                        seed=i).probs for i, p in enumerate(photos)]
            out[f"tpt_{name}"] = _agreement(torch.stack(tpt_exact), torch.stack(tpt_mixed))
        return out

    def tpt_latency(self) -> dict[str, Any]:
        from tta.engine import Engine
        from tta.text import LabelSet

        clip = self.clip()
        engine = Engine(clip, LabelSet.create(_class_names(self.plan.classes)), max_labels=self.plan.classes)
        image = _photos(2)[1]
        out: dict[str, Any] = {"classes": self.plan.classes, "views": self.plan.views, "steps": 1,
                               "goal_ms": 100.0}
        for precision in ("fp32", "bf16"):
            options = {"n_views": self.plan.views, "steps": 1, "precision": precision}
            engine.predict(image, method="tpt", options=options, seed=0)  # warm-up: label-set work, kernels
            times = []
            for i in range(self.plan.repeats):
                _sync(self.device)
                t = time.perf_counter()
                prediction = engine.predict(image, method="tpt", options=options, seed=i)
                _sync(self.device)
                times.append((time.perf_counter() - t) * 1000.0)
            out[precision] = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
                              "max_ms": round(max(times), 2), "repeats": len(times),
                              "fallback": prediction.extra.get("fallback"),
                              "stages_ms": {k: round(v, 2) for k, v in prediction.timings_ms.items()}}
            out[precision]["meets_goal"] = out[precision]["median_ms"] < out["goal_ms"]
        return out

    def zeroshot_throughput(self) -> dict[str, Any]:
        from tta.engine import Engine, PredictRequest
        from tta.text import LabelSet

        clip = self.clip()
        engine = Engine(clip, LabelSet.create(_class_names(self.plan.classes)), max_labels=self.plan.classes,
                        max_batch_images=max(self.plan.batches))
        photos = _photos(self.plan.photos)
        out: dict[str, Any] = {"classes": self.plan.classes, "batches": {}}
        for batch in self.plan.batches:
            requests = [PredictRequest(image=photos[i % len(photos)], method="zeroshot") for i in range(batch)]
            answers = engine.predict_batch(requests)  # warm-up
            errors = [a for a in answers if isinstance(a, Exception)]
            if errors:
                raise errors[0]
            times = []
            for _ in range(self.plan.repeats):
                _sync(self.device)
                t = time.perf_counter()
                engine.predict_batch(requests)
                _sync(self.device)
                times.append(time.perf_counter() - t)
            median = statistics.median(times)
            out["batches"][str(batch)] = {"median_ms": round(median * 1000.0, 2),
                                          "images_per_s": round(batch / median, 1)}
        return out

    def oom_retry(self) -> dict[str, Any]:
        from tta.engine import Engine
        from tta.text import LabelSet

        clip = self.clip()
        labels = LabelSet.create(_class_names(self.plan.classes))
        image = _photos(1)[0]
        options = {"n_views": self.plan.oom_views, "steps": 1}
        out: dict[str, Any] = {"requested_views": self.plan.oom_views, "classes": self.plan.classes}
        if self.device.type == "cuda":
            engine = Engine(clip, labels, max_labels=self.plan.classes)
            engine.predict(image, method="zeroshot")  # text features cached before the cap
            need = {}  # reserved memory each view count needs, measured uncapped
            for views in (self.plan.oom_views, self.plan.oom_views // 2, self.plan.oom_views // 4):
                torch.cuda.empty_cache()
                base = torch.cuda.memory_reserved(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                engine.predict(image, method="tpt", options={**options, "n_views": views}, seed=0)
                need[views] = torch.cuda.max_memory_reserved(self.device) - base
            out["reserved_mb_by_views"] = {str(v): round(b / 2**20, 1) for v, b in need.items()}
            quarter, half = need[self.plan.oom_views // 4], need[self.plan.oom_views // 2]
            # between a quarter's and a half's need: full and half fail, the second retry fits
            # (if the views barely matter, below a quarter's: both retries fail, zero-shot answers)
            headroom = (quarter + half) // 2 if half > quarter * 1.1 else quarter // 2
            torch.cuda.empty_cache()
            cap = torch.cuda.memory_reserved(self.device) + headroom
            total = torch.cuda.get_device_properties(self.device).total_memory
            out["cap_mb"] = round(cap / 2**20, 1)
            torch.cuda.set_per_process_memory_fraction(cap / total, self.device)
            try:
                prediction = engine.predict(image, method="tpt", options=options, seed=0)
                out["peak_reserved_under_cap_mb"] = round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)
                torch.cuda.empty_cache()
            out["mechanism"] = "torch.cuda.set_per_process_memory_fraction"
        else:
            limit = self.plan.oom_views // 4  # full and half the views fail, a quarter runs
            out["mechanism"] = f"CPU stand-in: encoder raises torch.OutOfMemoryError above {limit} images"
            original = clip.model.encode_image

            def capped(x: torch.Tensor) -> torch.Tensor:
                if x.shape[0] > limit:
                    raise torch.OutOfMemoryError(f"stand-in cap: {x.shape[0]} images > {limit}")
                return original(x)

            import dataclasses

            engine = Engine(dataclasses.replace(clip, image_encoder=capped), labels, max_labels=self.plan.classes)
            prediction = engine.predict(image, method="tpt", options=options, seed=0)
        out.update(answered=True, label=prediction.label, oom_retries=prediction.extra.get("oom_retries", 0),
                   final_views=prediction.extra.get("n_views"), fallback=prediction.extra.get("fallback"))
        if not (out["oom_retries"] or out["fallback"]):
            raise RuntimeError(f"the cap did not trigger the out-of-memory path: {out}")
        return out

    # --- report ----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        env = {"torch": torch.__version__, "python": platform.python_version(), "dry_run": self.dry_run,
               "device": self.plan.device, "plan": self.plan.__dict__,
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                       capability=".".join(map(str, torch.cuda.get_device_capability(self.device))),
                       cuda=torch.version.cuda)
        else:
            env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        peaks = [s["peak_memory_mb"] for s in self.steps.values() if "peak_memory_mb" in s]
        return {"env": env, "steps": self.steps, "peak_memory_mb": max(peaks, default=None),
                "total_seconds": round(time.perf_counter() - self.start, 1),
                "ok": all(s["status"] == "ok" for s in self.steps.values())}


def _agreement(exact: torch.Tensor, mixed: torch.Tensor) -> dict[str, Any]:
    exact, mixed = exact.float().cpu(), mixed.float().cpu()
    error = (exact - mixed).abs().max(dim=-1).values
    top2 = exact.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * error.max()  # fp32's top-1 is beyond the measured error
    same = exact.argmax(-1) == mixed.argmax(-1)
    return {"n": len(exact), "top1_agreement": round(float(same.float().mean()), 4),
            "decided": int(decided.sum()),
            "top1_agreement_decided": round(float(same[decided].float().mean()), 4) if decided.any() else None,
            "max_prob_error": float(error.max()), "mean_prob_error": float((exact - mixed).abs().mean())}


def _parity_rows(step: dict[str, Any]) -> list[str]:
    out = []
    for key in ("zeroshot_bf16", "zeroshot_fp16", "tpt_bf16", "tpt_fp16"):
        if key in step:
            a = step[key]
            out.append(f"| {key} vs fp32 ({step['model']}, {a['n']} photos) | top-1 agreement "
                       f"{a['top1_agreement']:.0%} ({a['top1_agreement_decided']} on {a['decided']} decided), "
                       f"max prob error {a['max_prob_error']:.2e} |")
    return out


def markdown(result: dict[str, Any]) -> str:
    """The figures as one markdown table (docs/gpu-check.md shows how to read it)."""
    env, steps = result["env"], result["steps"]
    where = env.get("gpu") or f"CPU dry run ({env.get('cpu')})"
    rows = [f"GPU check on {where}, torch {env['torch']}, {env['date_utc']} ({result['total_seconds']} s)", "",
            "| figure | value |", "| --- | --- |"]

    def row(name: str, value: Any) -> None:
        rows.append(f"| {name} | {value} |")

    for name, step in steps.items():
        if step["status"] != "ok":
            row(name, f"**{step['status']}**: {step.get('error') or step.get('reason')}")
            continue
        if name == "cuda_tests":
            row("CUDA tests (`-m gpu`)", step["summary"])
        elif name == "autocast_parity":
            rows.extend(_parity_rows(step))
        elif name == "tpt_latency":
            for precision in ("fp32", "bf16"):
                p = step[precision]
                row(f"TPT {step['classes']} classes x {step['views']} views, {precision}",
                    f"{p['median_ms']} ms median ({'meets' if p['meets_goal'] else 'misses'} < {step['goal_ms']:g} ms)")
        elif name == "zeroshot_throughput":
            for batch, b in step["batches"].items():
                row(f"zero-shot predict_batch, batch {batch}", f"{b['images_per_s']} images/s ({b['median_ms']} ms)")
        elif name == "oom_retry":
            row("OOM path", f"{step['requested_views']} views -> {step['oom_retries']} retries, final views "
                            f"{step['final_views']}, fallback {step['fallback']} ({step['mechanism']})")
        row(f"peak memory during {name}", f"{step['peak_memory_mb']} MB")
    row("peak memory (all steps)", f"{result['peak_memory_mb']} MB")
    return "\n".join(rows) + "\n"


STEPS = ("cuda_tests", "autocast_parity", "tpt_latency", "zeroshot_throughput", "oom_retry")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="same plan on CPU with tiny sizes (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/gpu.json)")
    parser.add_argument("--markdown", type=Path, default=None, help="table path (default: the JSON's, .md)")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.dry_run:
        torch.set_num_threads(1)  # tiny models; a loaded CI box's OpenMP waits dwarf the work
    out = args.out or RESULTS / ("gpu_dry_run.json" if args.dry_run else "gpu.json")
    check = Check(plan, args.dry_run)
    for name in args.steps.split(","):
        if name not in STEPS:
            parser.error(f"unknown step {name!r}")
        check.run(name, getattr(check, name))
    result = check.report()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.markdown or out.with_suffix(".md")).write_text(table)
    print(table)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
