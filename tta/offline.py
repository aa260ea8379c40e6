"""Offline evidence on stored CLIP features: the papers' online protocol through the served code.

A feature bundle (`load_bundle`: test / val features and labels, a 16-shot labelled cache and a
zero-shot text classifier of one backbone, e.g. ``../shared/data/clip-vitb16-features``) is served
by an `Engine` over `tta.models.embedding_model` with the bundle's classifier in its text cache.
Every answer comes from `Engine.predict_features`, one sample at a time in stream order: the same
method objects, options and state code a server runs, never a re-implementation.

The protocol (TDA's and the cache papers'): one pass over the test stream, batch size 1, in a
random order; `orders` seeded orders, reported as mean and spread. A method that learns from
labelled feedback (GDA) first gets the 16-shot cache through `Engine.feedback_many`, the served
feedback path. Hyper-parameters are chosen on the validation split only, from each method's
`Method.val_grid` (highest val top-1; ties go to the first candidate, which is the default).

Statistics (`ece`, `paired_gain`, `fit_temperature`) are plain functions so tests can check them
against hand-computed cases.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta.errors import BadRequest

log = logging.getLogger(__name__)

FEATURES_ENV = "TTA_FEATURES_DIR"
FEATURES_SUBDIR = Path("shared") / "data" / "clip-vitb16-features"
BUNDLE_KEYS = ("test_features", "test_labels", "val_features", "val_labels", "cache_keys_16shot",
               "cache_labels_16shot", "text_weights")
LOGIT_SCALE = 100.0  # OpenAI CLIP's learnt logit scale (exp(4.6052)), the one the bundles' backbone has
Z_95 = 1.959963984540054  # two-sided 95 % normal quantile
ECE_BINS = 15
VAL_ORDER_SEED = 0  # the validation stream's order; test orders use seeds 1..orders

PROTOCOL = ("one pass over the test stream, batch 1, seeded random orders 1..R; a fresh engine per pass; "
            "labelled-feedback methods get the 16-shot cache through Engine.feedback_many first; "
            "hyper-parameters chosen on val (order seed 0) from Method.val_grid, highest top-1, ties to the "
            "default; gain CI: paired normal interval of per-image correctness differences averaged over orders; "
            "ECE: 15 equal-width bins of the answer's top-1 probability, mean over orders")


def features_dir(start: Path | None = None) -> Path | None:
    """The feature bundles' folder: env TTA_FEATURES_DIR, else ``<ancestor>/shared/data/clip-vitb16-features``
    of the repository (``../shared`` of a checkout, whatever the worktree depth); None when absent."""
    env = os.environ.get(FEATURES_ENV)
    if env:
        path = Path(env)
        return path if path.is_dir() else None
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        candidate = parent / FEATURES_SUBDIR
        if candidate.is_dir():
            return candidate
    return None


@dataclass
class Split:
    features: torch.Tensor  # [N, d] float32 (stored float16; unit norm within float16 rounding)
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class Bundle:
    """One dataset's stored features (see the bundles' README for provenance)."""

    name: str
    text: torch.Tensor  # [C, d] zero-shot classifier
    test: Split
    val: Split
    shots: Split  # the labelled few-shot cache

    @property
    def n_classes(self) -> int:
        return int(self.text.shape[0])

    @property
    def names(self) -> list[str]:
        """Class names of the label set: the bundles store indices only."""
        return [f"class {i}" for i in range(self.n_classes)]


def load_bundle(path: str | Path) -> Bundle:
    """A bundle ``NAME_vitb16.npz`` (numpy, no pickle); `BadRequest` when a key is missing."""
    path = Path(path)
    if not path.is_file():
        raise BadRequest(f"feature bundle {path} does not exist", code="bad_dataset")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in BUNDLE_KEYS if k not in data.files]
        if missing:
            raise BadRequest(f"{path} lacks {missing} (a feature bundle has {list(BUNDLE_KEYS)})", code="bad_dataset")

        def split(features: str, labels: str) -> Split:
            return Split(torch.from_numpy(data[features].astype(np.float32)),
                         torch.from_numpy(data[labels].astype(np.int64)))

        bundle = Bundle(name=path.stem.removesuffix("_vitb16"), text=torch.from_numpy(data["text_weights"].astype(np.float32)),
                        test=split("test_features", "test_labels"), val=split("val_features", "val_labels"),
                        shots=split("cache_keys_16shot", "cache_labels_16shot"))
    for part in (bundle.test, bundle.val, bundle.shots):
        if part.features.shape[1] != bundle.text.shape[1] or int(part.labels.max()) >= bundle.n_classes:
            raise BadRequest(f"{path}: features or labels do not fit the classifier", code="bad_dataset")
    return bundle


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def ece(confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |accuracy - mean
    confidence| weighted by the bin's share of samples (bins (k/B, (k+1)/B], the first one closed)."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return float("nan")
    index = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for k in range(bins):
        mask = index == k
        if mask.any():
            total += mask.mean() * abs(hit[mask].mean() - conf[mask].mean())
    return float(total)


def paired_gain(correct: np.ndarray, reference: np.ndarray, z: float = Z_95) -> dict[str, float]:
    """Gain in top-1 over `reference` on the same images, with a paired normal interval.

    `correct`: [R, N] (R seeded orders) or [N]; `reference`: [N] or [R, N]. Per image, the
    correctness difference is averaged over the orders, d_i = mean_r (c_ri - ref_ri); the gain is
    mean_i d_i and its interval gain +- z * sd(d) / sqrt(N) (sd with N - 1). Pairing removes the
    image-difficulty variance both answers share, which is most of it.
    """
    c = np.atleast_2d(np.asarray(correct, dtype=np.float64))
    ref = np.atleast_2d(np.asarray(reference, dtype=np.float64))
    d = (c - ref).mean(axis=0)
    n = d.size
    gain = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"gain": gain, "se": se, "low": gain - z * se, "high": gain + z * se, "n": n}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T minimising the mean NLL of softmax(logits / T) (float64).

    The NLL is convex in 1/T, so its derivative in 1/T is increasing: found by bisection on that
    derivative over [1/high, 1/low] (60 halvings: exact to float64 rounding, deterministic).
    """
    z = logits.detach().double()
    y = labels.detach().long()
    true = z.gather(1, y[:, None])[:, 0]

    def slope(beta: float) -> float:  # d/dbeta mean(logsumexp(beta z) - beta z_y)
        p = (beta * z).softmax(-1)
        return float(((p * z).sum(-1) - true).mean())

    lo, hi = 1.0 / high, 1.0 / low
    if slope(lo) >= 0:
        return high
    if slope(hi) <= 0:
        return low
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 1.0 / (0.5 * (lo + hi))


# --------------------------------------------------------------------------------------------
# Serving a bundle
# --------------------------------------------------------------------------------------------
class Deployment:
    """One bundle served like a deployment: a stand-in CLIP with the bundle's classifier."""

    def __init__(self, bundle: Bundle) -> None:
        from tta.models import embedding_model
        from tta.text import LabelSet

        self.bundle = bundle
        self.clip = embedding_model(int(bundle.text.shape[1]), logit_scale=LOGIT_SCALE, name=f"features:{bundle.name}")
        self.labels = LabelSet.create(bundle.names)
        self.index = {name: i for i, name in enumerate(self.labels.names)}

    def engine(self, method_defaults: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
        """A fresh engine (fresh stream state) with these deployment defaults."""
        from tta.engine import Engine

        engine = Engine(self.clip, self.labels, method_defaults=method_defaults,
                        max_labels=max(1000, self.bundle.n_classes))
        engine.text_cache.put(self.clip, self.labels, self.bundle.text)
        return engine


@dataclass
class StreamRun:
    """One pass of one method over one split in one order (arrays indexed by sample, not order)."""

    method: str
    order_seed: int
    pred: np.ndarray
    zeroshot_pred: np.ndarray
    confidence: np.ndarray  # top-1 probability of the answer
    ms: np.ndarray  # Engine.predict_features wall time per sample
    escalated: int | None = None  # auto: answers from a tier above the first
    feedback_ms: float = 0.0  # the labelled cache through the feedback path (0: the method takes none)
    zeroshot_probs: np.ndarray | None = None  # [N, C] when asked for (calibration)

    def correct(self, labels: np.ndarray) -> np.ndarray:
        return self.pred == labels


def order(n: int, seed: int) -> np.ndarray:
    """The stream order of a seeded pass."""
    return np.random.default_rng(seed).permutation(n)


def feed_labelled(engine: Any, deployment: Deployment, method: str) -> float:
    """The labelled cache through the method's feedback path (ms); 0.0 when it takes no feedback."""
    shots = deployment.bundle.shots
    names = [deployment.labels.names[int(y)] for y in shots.labels]
    start = time.perf_counter()
    try:
        engine.feedback_many(names, method, features=shots.features)
    except BadRequest as exc:
        if exc.code != "feedback_unsupported":
            raise
        return 0.0
    return (time.perf_counter() - start) * 1000.0


def run_stream(deployment: Deployment, method: str, method_defaults: Mapping[str, Mapping[str, Any]],
               split: Split, seed: int, keep_probs: bool = False, tick: Callable[[], None] | None = None) -> StreamRun:
    """A fresh engine, the labelled cache if the method learns from it, then one pass in seeded order."""
    engine = deployment.engine(method_defaults)
    feedback_ms = feed_labelled(engine, deployment, method)
    n = len(split)
    pred = np.empty(n, dtype=np.int64)
    zs = np.empty(n, dtype=np.int64)
    conf = np.empty(n, dtype=np.float64)
    ms = np.empty(n, dtype=np.float64)
    probs = np.empty((n, deployment.bundle.n_classes), dtype=np.float32) if keep_probs else None
    escalated = 0
    seen_gate = False
    index = deployment.index
    for i in order(n, seed):
        start = time.perf_counter()
        answer = engine.predict_features(split.features[i], method=method, top_k=1)
        ms[i] = (time.perf_counter() - start) * 1000.0
        pred[i] = index[answer.label]
        zs[i] = index[answer.zeroshot_label]
        conf[i] = answer.score
        if "escalated" in answer.extra:
            seen_gate = True
            escalated += bool(answer.extra["escalated"])
        if probs is not None:
            probs[i] = answer.zeroshot_probs.numpy()
        if tick is not None:
            tick()
    return StreamRun(method, seed, pred, zs, conf, ms, escalated if seen_gate else None, feedback_ms, probs)


def feature_options(method: str) -> dict[str, Any]:
    """The options `method` runs under on embeddings (its class's `feature_options`, e.g. one view)."""
    from tta.methods.base import get_method_class

    return dict(get_method_class(method).feature_options)


def feature_note(method: str) -> str:
    """What running `method` on embeddings leaves out ("" when nothing)."""
    from tta.methods.base import get_method_class

    return get_method_class(method).feature_options_note


def feature_reason(method: str, options: Mapping[str, Any] | None = None) -> str | None:
    """Why `method` (with `options` over its defaults) cannot run on embeddings; None = it can."""
    from tta.methods.base import get_method_class
    from tta.models import embedding_model

    cls = get_method_class(method)
    opts = cls.Options.from_dict(dict(options or {}))
    return cls(embedding_model(8), opts).feature_input_reason(opts)


def grid_candidates(method: str, base: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every combination of the method's `val_grid` over `base` (one, `base` itself, when empty)."""
    from tta.methods.base import get_method_class

    grid = get_method_class(method).val_grid
    base = dict(base or {})
    if not grid:
        return [base]
    keys = list(grid)
    return [{**base, **dict(zip(keys, values, strict=True))} for values in itertools.product(*(grid[k] for k in keys))]


def choose_on_val(deployment: Deployment, method: str, base: Mapping[str, Any],
                  deployment_defaults: Mapping[str, Mapping[str, Any]], tick: Callable[[], None] | None = None
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The candidate with the best val top-1 (first wins ties) and every candidate's val top-1."""
    labels = deployment.bundle.val.labels.numpy()
    table = []
    best: dict[str, Any] | None = None
    best_acc = -1.0
    for candidate in grid_candidates(method, base):
        defaults = {**deployment_defaults, method: candidate}
        run = run_stream(deployment, method, defaults, deployment.bundle.val, VAL_ORDER_SEED, tick=tick)
        acc = float(run.correct(labels).mean())
        table.append({"options": candidate, "val_top1": acc})
        if acc > best_acc + 1e-12:
            best, best_acc = candidate, acc
    assert best is not None
    return best, table


@dataclass
class MethodReport:
    """One method on one bundle, over the seeded test orders."""

    method: str
    options: dict[str, Any]
    val: list[dict[str, Any]] = field(default_factory=list)
    runs: list[StreamRun] = field(default_factory=list)

    def summary(self, labels: np.ndarray, zeroshot_correct: np.ndarray) -> dict[str, Any]:
        correct = np.stack([r.correct(labels) for r in self.runs])
        per_order = correct.mean(axis=1)
        gain = paired_gain(correct, zeroshot_correct)
        eces = [ece(r.confidence, r.correct(labels)) for r in self.runs]
        changed = [float((r.pred != r.zeroshot_pred).mean()) for r in self.runs]
        ms = np.concatenate([r.ms for r in self.runs])
        out = {
            "method": self.method, "options": self.options, "orders": len(self.runs),
            "top1": float(per_order.mean()), "top1_per_order": [float(v) for v in per_order],
            "top1_spread": float(per_order.max() - per_order.min()),
            "top1_sd": float(statistics.stdev(per_order)) if len(per_order) > 1 else 0.0,
            "gain": gain["gain"], "gain_low": gain["low"], "gain_high": gain["high"], "gain_se": gain["se"],
            "ece": float(np.mean(eces)), "changed": float(np.mean(changed)),
            "ms_per_sample": float(ms.mean()), "ms_per_sample_median": float(np.median(ms)),
            "feedback_ms": float(np.mean([r.feedback_ms for r in self.runs])),
            "val_top1": max((v["val_top1"] for v in self.val), default=None),
            "val_candidates": len(self.val),
        }
        esc = [r.escalated for r in self.runs if r.escalated is not None]
        if esc:
            out["escalation_rate"] = float(np.mean(esc) / len(labels))
        return out


def runnable_methods(methods: Iterable[str] | None, overrides: Mapping[str, Mapping[str, Any]]
                     ) -> tuple[list[str], dict[str, str]]:
    """(methods that run on embeddings, {method: reason} for those that need pixels); the
    registry's order with stream methods before `auto` (its stream tier uses their chosen defaults)."""
    from tta.methods.base import list_methods

    names = list(methods) if methods is not None else list_methods()
    run, skipped = [], {}
    for name in names:
        reason = feature_reason(name, {**feature_options(name), **overrides.get(name, {})})
        if reason is None:
            run.append(name)
        else:
            skipped[name] = reason
    run.sort(key=lambda m: (m == "auto", m != "zeroshot"))
    return run, skipped


def evaluate_bundle(bundle: Bundle, methods: Iterable[str] | None = None, orders: int = 3,
                    overrides: Mapping[str, Mapping[str, Any]] | None = None, tune: bool = True,
                    progress: bool = False) -> dict[str, Any]:
    """The protocol on one bundle: per method the val choice, then `orders` seeded test passes."""
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    deployment = Deployment(bundle)
    run, skipped = runnable_methods(methods, overrides)
    labels = bundle.test.labels.numpy()
    chosen: dict[str, dict[str, Any]] = {}
    reports: list[MethodReport] = []
    total = sum((len(grid_candidates(m)) if tune else 0) * len(bundle.val) + orders * len(bundle.test) for m in run)
    bar = _bar(total, f"{bundle.name}", progress)
    try:
        for method in run:
            base = {**feature_options(method), **overrides.get(method, {})}
            report = MethodReport(method, base)
            if tune:
                report.options, report.val = choose_on_val(deployment, method, base, chosen, tick=bar.update)
            chosen[method] = report.options
            for seed in range(1, orders + 1):
                report.runs.append(run_stream(deployment, method, chosen, bundle.test, seed, tick=bar.update))
            reports.append(report)
    finally:
        bar.close()
    zeroshot_correct = reports[0].runs[0].zeroshot_pred == labels
    for report in reports:  # every method's zero-shot answer is the same served zero-shot answer
        for r in report.runs:
            if not np.array_equal(r.zeroshot_pred, reports[0].runs[0].zeroshot_pred):
                log.warning("%s: zero-shot answers differ between methods", report.method)
    return {
        "dataset": bundle.name, "n_test": len(bundle.test), "n_val": len(bundle.val), "n_classes": bundle.n_classes,
        "n_shots": len(bundle.shots), "zeroshot_top1": float(zeroshot_correct.mean()),
        "results": [r.summary(labels, zeroshot_correct) for r in reports],
        "skipped": skipped, "chosen": chosen,
        "notes": {m: note for m in run if (note := feature_note(m))},
    }


def average(datasets: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method, the mean over datasets of top-1, gain, ECE, changed share and ms; the average
    gain's interval treats the datasets as independent: se = sqrt(sum se_d^2) / D."""
    methods = [r["method"] for r in datasets[0]["results"]]
    out = []
    for method in methods:
        rows = [next(r for r in d["results"] if r["method"] == method) for d in datasets
                if any(r["method"] == method for r in d["results"])]
        if len(rows) != len(datasets):
            continue
        se = math.sqrt(sum(r["gain_se"] ** 2 for r in rows)) / len(rows)
        gain = statistics.fmean(r["gain"] for r in rows)
        out.append({"method": method, "top1": statistics.fmean(r["top1"] for r in rows), "gain": gain,
                    "gain_low": gain - Z_95 * se, "gain_high": gain + Z_95 * se, "gain_se": se,
                    "ece": statistics.fmean(r["ece"] for r in rows),
                    "changed": statistics.fmean(r["changed"] for r in rows),
                    "ms_per_sample": statistics.fmean(r["ms_per_sample"] for r in rows)})
    return out


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
def calibrate_bundle(bundle: Bundle, thresholds: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
                     tda_options: Mapping[str, Any] | None = None, seed: int = 1,
                     progress: bool = False) -> dict[str, Any]:
    """Fit the zero-shot temperature on val; its effect on test ECE and on `auto`'s sweep
    (tiers zeroshot,tda, one seeded order) with and without it."""
    deployment = Deployment(bundle)
    bar = _bar(len(bundle.val) + len(bundle.test) * (1 + 2 * len(thresholds)), f"{bundle.name} calibrate", progress)
    try:
        val = run_stream(deployment, "zeroshot", {}, bundle.val, VAL_ORDER_SEED, keep_probs=True, tick=bar.update)
        assert val.zeroshot_probs is not None
        logits = torch.from_numpy(val.zeroshot_probs).double().clamp_min(1e-300).log()  # = logits up to a constant
        temperature = fit_temperature(logits, bundle.val.labels)
        test = run_stream(deployment, "zeroshot", {}, bundle.test, seed, keep_probs=True, tick=bar.update)
        assert test.zeroshot_probs is not None
        labels = bundle.test.labels.numpy()
        correct = test.correct(labels)
        calibrated = torch.from_numpy(test.zeroshot_probs).double().clamp_min(1e-300).log().div(temperature).softmax(-1)
        sweep = []
        for t in (None, temperature):
            for threshold in thresholds:
                options = {**feature_options("auto"), "threshold": threshold, "temperature": t}
                defaults = {"auto": options, **({"tda": dict(tda_options)} if tda_options else {})}
                r = run_stream(deployment, "auto", defaults, bundle.test, seed, tick=bar.update)
                ok = r.correct(labels)
                sweep.append({"temperature": t, "threshold": threshold, "top1": float(ok.mean()),
                              "gain": float(ok.mean() - correct.mean()), "ece": ece(r.confidence, ok),
                              "escalation_rate": (r.escalated or 0) / len(labels),
                              "ms_per_sample": float(r.ms.mean())})
    finally:
        bar.close()
    return {"dataset": bundle.name, "temperature": temperature,
            "zeroshot_ece": ece(test.confidence, correct),
            "zeroshot_ece_calibrated": ece(calibrated.max(-1).values.numpy(), correct),
            "zeroshot_top1": float(correct.mean()), "auto_sweep": sweep}


def _bar(total: int, description: str, enabled: bool) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=description, file=sys.stderr, disable=not enabled, unit="req",
                dynamic_ncols=True, mininterval=1.0)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def format_results(report: Mapping[str, Any]) -> str:
    """One bundle's table: top-1, gain with its 95 % paired interval, ECE, changed share, cost."""
    header = (f"{'method':<12} {'top-1':>7} {'sd':>5} {'gain':>7} {'95% paired CI':>17} {'ECE':>6} {'changed':>8} "
              f"{'ms/req':>7}  chosen on val")
    lines = [f"{report['dataset']}: {report['n_test']} test, {report['n_val']} val, {report['n_classes']} classes, "
             f"zero-shot {100 * report['zeroshot_top1']:.2f}", header, "-" * len(header)]
    for r in report["results"]:
        chosen = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        lines.append(f"{r['method']:<12} {100 * r['top1']:>7.2f} {100 * r['top1_sd']:>5.2f} {100 * r['gain']:>+7.2f} "
                     f"[{100 * r['gain_low']:>+6.2f}, {100 * r['gain_high']:>+6.2f}] {100 * r['ece']:>6.2f} "
                     f"{100 * r['changed']:>7.2f}% {r['ms_per_sample']:>7.2f}  {chosen}")
    for method, note in report.get("notes", {}).items():
        lines.append(f"{method:<12} note: {note}")
    for method, reason in report.get("skipped", {}).items():
        lines.append(f"{method:<12} skipped: {reason}")
    return "\n".join(lines)


def format_average(rows: Sequence[Mapping[str, Any]], n: int) -> str:
    header = f"{'method':<12} {'top-1':>7} {'gain':>7} {'95% CI':>17} {'ECE':>6} {'changed':>8} {'ms/req':>7}"
    lines = [f"average over {n} datasets", header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<12} {100 * r['top1']:>7.2f} {100 * r['gain']:>+7.2f} "
                     f"[{100 * r['gain_low']:>+6.2f}, {100 * r['gain_high']:>+6.2f}] {100 * r['ece']:>6.2f} "
                     f"{100 * r['changed']:>7.2f}% {r['ms_per_sample']:>7.2f}")
    return "\n".join(lines)


def format_calibration(cal: Mapping[str, Any]) -> str:
    lines = [f"{cal['dataset']}: zero-shot temperature {cal['temperature']:.4f} (fitted on val, NLL); test ECE "
             f"{100 * cal['zeroshot_ece']:.2f} -> {100 * cal['zeroshot_ece_calibrated']:.2f}",
             f"  auto (tiers zeroshot,tda) sweep, one order: {'T':>7} {'gate':>5} {'top-1':>7} {'gain':>7} "
             f"{'ECE':>6} {'escal.':>7} {'ms/req':>7}"]
    for r in cal["auto_sweep"]:
        t = "none" if r["temperature"] is None else f"{r['temperature']:.3f}"
        lines.append(f"  {'':<37}{t:>7} {r['threshold']:>5.2f} {100 * r['top1']:>7.2f} {100 * r['gain']:>+7.2f} "
                     f"{100 * r['ece']:>6.2f} {r['escalation_rate']:>7.3f} {r['ms_per_sample']:>7.2f}")
    return "\n".join(lines)


def csv_rows(reports: Sequence[Mapping[str, Any]], averages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows (dataset, method, figures) for a CSV file; the average rows have dataset 'average'."""
    keys = ("top1", "top1_sd", "top1_spread", "gain", "gain_low", "gain_high", "ece", "changed", "ms_per_sample",
            "feedback_ms", "val_top1")
    rows = []
    for report in reports:
        for r in report["results"]:
            rows.append({"dataset": report["dataset"], "method": r["method"], **{k: r.get(k) for k in keys},
                         "options": ";".join(f"{k}={v}" for k, v in r["options"].items())})
    for r in averages:
        rows.append({"dataset": "average", "method": r["method"], **{k: r.get(k) for k in keys}, "options": ""})
    return rows


def plot_gains(path: str | Path, reports: Sequence[Mapping[str, Any]], averages: Sequence[Mapping[str, Any]],
               title: str, published: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Gain over zero-shot (points) per method per dataset with 95 % paired intervals; published
    gains, where given ({method: {dataset: gain}}), as hollow markers beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r["method"] for r in averages if r["method"] != "zeroshot"]
    groups = [(rep["dataset"], {r["method"]: r for r in rep["results"]}) for rep in reports]
    groups.append(("average", {r["method"]: r for r in averages}))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(groups)), 4.4), dpi=120)
    width = 0.8 / max(1, len(methods))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, method in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for g, (_, rows) in enumerate(groups):
            if method in rows:
                r = rows[method]
                xs.append(g - 0.4 + width * (j + 0.5))
                ys.append(100 * r["gain"])
                lo.append(100 * (r["gain"] - r["gain_low"]))
                hi.append(100 * (r["gain_high"] - r["gain"]))
        color = colors[j % len(colors)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, capsize=3, label=method)
        if published and method in published:
            px = [g - 0.4 + width * (j + 0.5) + 0.25 * width for g, (name, _) in enumerate(groups)
                  if name in published[method]]
            py = [100 * published[method][name] for name, _ in groups if name in published[method]]
            ax.plot(px, py, "D", mfc="none", color=color, markersize=6)
    if published:
        ax.plot([], [], "D", mfc="none", color="gray", label="published gain (paper, its own baseline)")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=2.0)  # labelled GDA gains are ~10x the unlabelled ones
    ax.set_xticks(range(len(groups)), [name for name, _ in groups])
    ax.set_ylabel("top-1 gain over zero-shot (points)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
