"""`tta eval DATA --methods zeroshot,tpt,zero --model M`: accuracy and latency per method.

DATA is a labelled folder (``class_name/image.jpg``; underscores in folder names become spaces
in the class names) or a built-in set (``digits``: scikit-learn's handwritten digits, test split,
optionally shifted with ``--shift noise|blur|contrast|rotate``). Every method sees the same
images in the same order (classes interleaved, so stream methods see a mixed stream) and starts
from a fresh state. This is how a deployment picks its method: the accuracy gain bought by each
millisecond on the deployment's own images and hardware.

``--methods ...,auto --sweep`` calibrates `auto`'s gate: one traced run with the gate at 1 records
every tier's answer, gate value and milliseconds per image; each threshold of ``--thresholds`` is
then priced by replaying those traces (the tiers' answers do not depend on the threshold: every
tier starts from the same seeded views), so the whole curve costs one run. The chosen threshold is
the cheapest (mean ms) whose accuracy is within ``--tolerance`` of the best fixed method (or of the
best threshold when no fixed method is evaluated); `auto` is then run for real at that threshold,
and the command prints the ``--method-defaults`` to deploy it. ``--plot`` draws accuracy against
mean cost.

``--features A.npz [B.npz ...]`` evaluates stored CLIP features instead (`tta.offline`): every
method that can answer from an embedding runs through `Engine.predict_features` in the papers'
online protocol (seeded orders, hyper-parameters chosen on val, gains with paired intervals, ECE);
methods that need pixels are listed as skipped with the reason. ``--calibrate`` fits the zero-shot
temperature on val and prints the deployment flags that use it. ``--plot`` then draws the gains.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta.errors import BadRequest, TTAError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BUILTIN_SETS = ("digits",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", help="a folder of class_name/image files, or a built-in set: digits")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (see `tta methods`) (default: zeroshot,tpt,zero; with "
                             "--features every registered method that runs on embeddings)")
    parser.add_argument("--features", nargs="+", metavar="BUNDLE.npz",
                        help="stored CLIP feature bundles (test/val/16-shot/text classifier) instead of DATA: the "
                             "papers' online protocol through the served methods (see tta.offline)")
    parser.add_argument("--orders", type=int, default=3, help="--features: seeded test-stream orders (default: %(default)s)")
    parser.add_argument("--no-tune", action="store_true",
                        help="--features: keep the methods' defaults instead of choosing from val_grid on val")
    parser.add_argument("--calibrate", action="store_true",
                        help="--features: fit the zero-shot temperature on val; its effect on ECE and on auto's sweep")
    parser.add_argument("--model", default=None,
                        help="CLIP spec (default: tiny-digits for 'digits', tiny-random otherwise)")
    parser.add_argument("--templates", default="single", help="'single' or 'imagenet' (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    parser.add_argument("--option", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                        help="method option; without METHOD it applies to every method that has KEY (repeatable)")
    parser.add_argument("--shift", choices=("none", "noise", "blur", "contrast", "rotate"), default="none",
                        help="distribution shift for the built-in set (default: %(default)s)")
    parser.add_argument("--severity", type=int, default=3, help="shift severity 1-5 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the views; image i uses seed+i")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: %(default)s)")
    parser.add_argument("--onnx", metavar="PATH", help="ONNX image encoder; used when faster here (measured)")
    parser.add_argument("--csv", metavar="PATH", help="write the per-method summary as CSV")
    parser.add_argument("--json", metavar="PATH", help="write the summary and per-image predictions as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--sweep", action="store_true",
                        help="calibrate auto's gate over --thresholds (needs auto in --methods)")
    parser.add_argument("--thresholds", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,1",
                        help="gate thresholds for --sweep (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="--sweep picks the cheapest threshold within this accuracy of the best (default: %(default)s)")
    parser.add_argument("--plot", metavar="PNG", help="with --sweep: accuracy vs mean cost figure; with --features: gain per method and dataset")


def latency_stats(lat: list[float], scale: float = 1.0) -> dict[str, float]:
    """Mean, median and p95 (x `scale`) of sorted latencies; NaN when there are none."""
    n = len(lat)
    if not n:
        return {"latency_ms_mean": float("nan"), "latency_ms_median": float("nan"), "latency_ms_p95": float("nan")}
    return {"latency_ms_mean": scale * statistics.fmean(lat), "latency_ms_median": scale * statistics.median(lat),
            "latency_ms_p95": scale * lat[min(n - 1, int(0.95 * n))]}


@dataclass
class MethodResult:
    """Running totals of one method over the evaluated images."""

    method: str
    latencies_s: list[float] = field(default_factory=list)
    correct: int = 0
    zeroshot_correct: int = 0
    changed: int = 0
    predictions: list[str] = field(default_factory=list)
    escalated: int = 0  # auto: answers from a tier above the first
    encoded: list[int] = field(default_factory=list)  # auto: images encoded per request
    traces: list[list[dict[str, Any]]] = field(default_factory=list)  # auto with trace=True
    threshold: float | None = None

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies_s)
        lat = sorted(self.latencies_s)
        nan = float("nan")
        return {
            "method": self.method,
            "threshold": self.threshold,
            "n": n,
            "accuracy": self.correct / n if n else nan,
            "zeroshot_accuracy": self.zeroshot_correct / n if n else nan,
            "changed_by_adaptation": self.changed / n if n else nan,
            **latency_stats(lat, scale=1000.0),
            "escalation_rate": self.escalated / n if n and self.encoded else None,
            "encoded_images_mean": statistics.fmean(self.encoded) if self.encoded else None,
        }


def _interleave(per_class: list[list[Any]]) -> Iterator[Any]:
    """Round-robin over classes: a limited run still covers every class, streams are mixed."""
    longest = max((len(items) for items in per_class), default=0)
    for i in range(longest):
        for items in per_class:
            if i < len(items):
                yield items[i]


def folder_dataset(root: Path, limit: int | None) -> tuple[list[str], list[tuple[str, int, Any]]]:
    """Class names and (name, label index, loader) items of a class_name/image folder."""
    from tta.images import load_image_file

    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = []
    for index, folder in enumerate(classes):
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        per_class.append([(str(f), index, lambda f=f: load_image_file(str(f))) for f in files])
    if not any(per_class):
        raise BadRequest(f"no images under {root}: expected {root}/CLASS_NAME/IMAGE.jpg", code="bad_dataset")
    items = list(_interleave(per_class))[:limit]
    return [c.name.replace("_", " ") for c in classes], items


def digits_dataset(limit: int | None, shift: str, severity: int) -> tuple[list[str], list[tuple[str, int, Any]]]:
    from tta.testing.digits import DIGIT_CLASSNAMES, digits_split, shift_images

    images, labels = digits_split("test")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if shift != "none":
        images = shift_images(images, shift, severity=severity)
    items = [(f"digits/test/{i}", int(y), lambda img=img: img) for i, (img, y) in enumerate(zip(images, labels, strict=True))]
    return list(DIGIT_CLASSNAMES), items


def method_options(pairs: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """'[METHOD.]KEY=VALUE' pairs -> per-method overrides (unscoped keys go where they exist)."""
    from tta.commands.predict import parse_option_pairs
    from tta.methods.base import get_method_class

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in parse_option_pairs(pairs).items():
        scope, dot, name = key.rpartition(".")
        targets = [scope] if dot else methods
        if dot and scope not in out:
            raise BadRequest(f"--option {key}: method '{scope}' is not in --methods", code="bad_options")
        applied = False
        for method in targets:
            fields = get_method_class(method).Options.__dataclass_fields__
            if name in fields:
                out[method][name] = value
                applied = True
        if not applied:
            raise BadRequest(f"--option {key}: no selected method has an option '{name}'", code="bad_options")
    return out


def _progress(total: int, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=disable, unit="img", dynamic_ncols=True)


def evaluate(
    clip: Any, classnames: list[str], items: list[tuple[str, int, Any]], methods: list[str],
    options: dict[str, dict[str, Any]], templates: str = "single", seed: int = 0, progress: bool = True,
) -> tuple[list[MethodResult], list[dict[str, Any]]]:
    """Run every method over the same items; returns per-method results and per-image records."""
    from tta.engine import Engine
    from tta.text import LabelSet

    labels = LabelSet.create(classnames, templates=templates)
    results = [MethodResult(m) for m in methods]
    records = [{"image": name, "label": classnames[y]} for name, y, _ in items]
    bar = _progress(len(items) * len(methods), disable=not progress)
    try:
        for result in results:
            engine = Engine(clip, labels, default_method=result.method,
                            max_labels=max(1000, len(classnames)))  # fresh stream state per method
            engine.method(result.method).parse_options(options[result.method])
            result.threshold = options[result.method].get("threshold") if result.method == "auto" else None
            bar.set_description(result.method)
            if items:  # untimed warm-up: first-call costs (label set's text features, allocator) are not the method's
                engine.predict(items[0][2](), options=options[result.method], seed=seed, top_k=1)
                if engine.method(result.method).scope == "stream":
                    engine.reset_state(result.method)
            for i, (_, y, load) in enumerate(items):
                image = load()
                start = time.perf_counter()
                pred = engine.predict(image, options=options[result.method], seed=seed + i, top_k=1)
                result.latencies_s.append(time.perf_counter() - start)
                result.correct += pred.label == classnames[y]
                result.zeroshot_correct += pred.zeroshot_label == classnames[y]
                result.changed += pred.changed_by_adaptation
                result.predictions.append(pred.label)
                if "escalated" in pred.extra:
                    result.escalated += bool(pred.extra["escalated"])
                    result.encoded.append(int(pred.extra.get("encoded_images", 0)))
                    if "trace" in pred.extra:
                        result.traces.append(pred.extra["trace"])
                records[i][result.method] = pred.label
                bar.update(1)
    finally:
        bar.close()
    return results, records


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'method':<10} {'gate':>5} {'n':>5} {'accuracy':>9} {'zero-shot':>9} {'changed':>8} {'escal.':>7} "
              f"{'mean ms':>9} {'p50 ms':>9} {'p95 ms':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        gate = f"{r['threshold']:.2f}" if r.get("threshold") is not None else "-"
        esc = f"{r['escalation_rate']:.3f}" if r.get("escalation_rate") is not None else "-"
        lines.append(f"{r['method']:<10} {gate:>5} {r['n']:>5} {r['accuracy']:>9.4f} {r['zeroshot_accuracy']:>9.4f} "
                     f"{r['changed_by_adaptation']:>8.3f} {esc:>7} {r['latency_ms_mean']:>9.1f} "
                     f"{r['latency_ms_median']:>9.1f} {r['latency_ms_p95']:>9.1f}")
    return "\n".join(lines)


def sweep_rows(traced: MethodResult, truth: list[str], zeroshot_truth: list[str], thresholds: list[float]
               ) -> list[dict[str, Any]]:
    """Price each gate threshold by replaying the traced run (gate at 1: every tier's answer,
    gate value and ms per image). A tier answers when its gate >= threshold (never at 1), as in
    `auto`; an image's cost is the median cost of the tiers it runs plus the median overhead."""
    rows = []
    n = len(traced.traces)
    # Per-tier medians, not each image's own ms: the tiers do the same work for every image, and a
    # shared machine's noise would otherwise move the curve more than the thresholds do.
    tier_ms = [statistics.median(trace[j]["ms"] for trace in traced.traces) for j in range(len(traced.traces[0]))]
    overhead_ms = statistics.median(t * 1000.0 - sum(step["ms"] for step in trace)
                                    for t, trace in zip(traced.latencies_s, traced.traces, strict=True))
    for threshold in thresholds:
        costs, correct, escalated, changed = [], 0, 0, 0
        for i, trace in enumerate(traced.traces):
            k = len(trace) - 1
            for j, step in enumerate(trace[:-1]):
                if threshold < 1.0 and step["gate"] >= threshold:
                    k = j
                    break
            costs.append(max(overhead_ms, 0.0) + sum(tier_ms[: k + 1]))
            correct += trace[k]["label"] == truth[i]
            changed += trace[k]["label"] != zeroshot_truth[i]
            escalated += k > 0
        lat = sorted(costs)
        rows.append({
            "method": "auto-sweep", "threshold": threshold, "n": n,
            "accuracy": correct / n, "zeroshot_accuracy": traced.zeroshot_correct / n, "changed_by_adaptation": changed / n,
            **latency_stats(lat), "escalation_rate": escalated / n,
            "encoded_images_mean": None,
        })
    return rows


def choose_threshold(sweep: list[dict[str, Any]], fixed: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The cheapest swept threshold whose accuracy is within `tolerance` of the best fixed method
    (or of the best threshold when no fixed method ran)."""
    target = max((r["accuracy"] for r in fixed), default=max(r["accuracy"] for r in sweep))
    good = [r for r in sweep if r["accuracy"] >= target - tolerance - 1e-12]
    if not good:  # nothing close enough: the most accurate threshold
        best = max(r["accuracy"] for r in sweep)
        good = [r for r in sweep if r["accuracy"] == best]
    return min(good, key=lambda r: (r["latency_ms_mean"], -r["accuracy"]))


def plot_sweep(path: str, sweep: list[dict[str, Any]], fixed: list[dict[str, Any]], chosen: dict[str, Any] | None,
               title: str) -> None:
    """Accuracy against mean cost: auto's thresholds as a curve, each fixed method as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    xs = [r["latency_ms_mean"] for r in sweep]
    ax.plot(xs, [100 * r["accuracy"] for r in sweep], "o-", color="tab:blue", label="auto (gate threshold)")
    for r in sweep:
        ax.annotate(f"{r['threshold']:g}", (r["latency_ms_mean"], 100 * r["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    for r in fixed:
        auto = r["method"] == "auto"
        # fixed methods do the same work for every image: their median is the noise-free mean cost
        cost = r.get("robust_cost_ms") or (r["latency_ms_mean"] if auto else r["latency_ms_median"])
        label = f"auto @ {r['threshold']:g} (measured)" if auto else r["method"]
        ax.plot([cost], [100 * r["accuracy"]], "*" if auto else "s", markersize=11 if auto else 7, label=label)
    if chosen is not None:
        ax.axvline(chosen["latency_ms_mean"], color="tab:blue", linestyle=":", linewidth=1,
                   label=f"chosen threshold {chosen['threshold']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per request (ms, log scale; per-tier / per-method medians)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.features:
        return run_features(args)
    if not args.data:
        print("tta: error: give DATA (a folder or a built-in set) or --features BUNDLE.npz", file=sys.stderr)
        return 2
    try:
        from tta.methods.base import get_method_class
        from tta.models import load_model, resolve_device

        methods = [m.strip() for m in (args.methods or "zeroshot,tpt,zero").split(",") if m.strip()]
        if not methods:
            raise BadRequest("--methods is empty", code="bad_options")
        for method in methods:
            get_method_class(method)  # unknown method: fail before loading anything
        options = method_options(args.option, methods)
        if args.sweep and "auto" not in methods:
            raise BadRequest("--sweep calibrates auto: add auto to --methods", code="bad_options")
        thresholds = _thresholds(args.thresholds)
        classnames, items, model_spec = _dataset(args)
        clip = load_model(model_spec, device=resolve_device(args.device))
        if args.onnx:
            from tta.onnx_encoder import enable_if_faster

            choice = enable_if_faster(clip, args.onnx)
            if choice is not None:
                print(f"image encoder: {choice.chosen} (eager {choice.eager_s:.3f} s, onnx {choice.onnx_s:.3f} s)",
                      file=sys.stderr)
        sweep: list[dict[str, Any]] = []
        chosen: dict[str, Any] | None = None
        fixed = [m for m in methods if not (args.sweep and m == "auto")]
        results, records = evaluate(clip, classnames, items, fixed, options, args.templates, args.seed,
                                    progress=not args.no_progress)
        if args.sweep:
            sweep, chosen = _calibrate(args, clip, classnames, items, methods, options, thresholds, results, records)
    except TTAError as exc:
        print(f"tta: error: {exc}", file=sys.stderr)
        return 2
    rows = [r.summary() for r in results]
    print(f"{args.data}: {len(items)} images, {len(classnames)} classes, model {model_spec}, device {clip.device}")
    print(format_table(rows))
    meta = {"data": args.data, "model": model_spec, "device": str(clip.device), "n_images": len(items),
            "n_classes": len(classnames), "shift": args.shift, "options": options}
    _write(args, meta, rows, sweep, chosen, records, f"{args.data} ({args.shift}), {model_spec}, {len(items)} images")
    return 0


def _dataset(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, int, Any]], str]:
    """Class names, items and the default model spec of DATA (a folder or a built-in set)."""
    if args.limit is not None and args.limit < 1:
        raise BadRequest("--limit must be at least 1", code="bad_options")
    if args.data in BUILTIN_SETS:
        classnames, items = digits_dataset(args.limit, args.shift, args.severity)
        return classnames, items, args.model or "tiny-digits"
    root = Path(args.data)
    if not root.is_dir():
        raise BadRequest(f"{args.data} is neither a folder nor a built-in set {BUILTIN_SETS}", code="bad_dataset")
    if args.shift != "none":
        raise BadRequest("--shift applies to built-in sets only", code="bad_options")
    classnames, items = folder_dataset(root, args.limit)
    return classnames, items, args.model or "tiny-random"


def _calibrate(args: argparse.Namespace, clip: Any, classnames: list[str], items: list[tuple[str, int, Any]],
               methods: list[str], options: dict[str, dict[str, Any]], thresholds: list[float],
               results: list[MethodResult], records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Traced run at gate 1 -> replayed sweep -> chosen threshold -> a measured run of auto there.
    Appends the measured auto result to `results` (in --methods order) and its answers to `records`."""
    truth = [classnames[y] for _, y, _ in items]
    traced_opts = {"auto": {**options["auto"], "threshold": 1.0, "trace": True}}
    (traced,), _ = evaluate(clip, classnames, items, ["auto"], traced_opts, args.templates, args.seed,
                            progress=not args.no_progress)
    zeroshot_labels = [trace[0]["label"] for trace in traced.traces]
    sweep = sweep_rows(traced, truth, zeroshot_labels, thresholds)
    chosen = choose_threshold(sweep, [r.summary() for r in results], args.tolerance)
    options["auto"] = {**options["auto"], "threshold": chosen["threshold"]}
    (measured,), auto_records = evaluate(clip, classnames, items, ["auto"], options, args.templates,
                                         args.seed, progress=not args.no_progress)
    results.append(measured)
    results.sort(key=lambda r: methods.index(r.method))
    for record, extra in zip(records, auto_records, strict=True):
        record["auto"] = extra["auto"]
    return sweep, chosen


def _write(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]], sweep: list[dict[str, Any]],
           chosen: dict[str, Any] | None, records: list[dict[str, Any]], title: str) -> None:
    if sweep and chosen is not None:
        options = meta["options"]["auto"]
        print(f"\nauto gate sweep ({options.get('gate', 'max_prob')}; cost replayed from one traced run):")
        print(format_table(sweep))
        defaults = json.dumps({"auto": options})
        print(f"\nchosen threshold {chosen['threshold']:g}: accuracy {chosen['accuracy']:.4f}, "
              f"mean {chosen['latency_ms_mean']:.1f} ms, escalation {chosen['escalation_rate']:.3f}")
        print(f"deploy it with: tta archive ... --method-defaults '{defaults}'")
    table = rows + sweep
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    if args.json:
        body = {**meta, "results": rows, "images": records}
        if sweep:
            body.update({"sweep": sweep, "chosen": chosen})
        Path(args.json).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    if args.plot and sweep:
        plot_sweep(args.plot, sweep, rows, chosen, f"{title}: accuracy vs cost")


def _thresholds(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise BadRequest(f"--thresholds must be numbers in [0, 1], got {text!r}", code="bad_options") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise BadRequest("--thresholds must be numbers in [0, 1]", code="bad_options")
    return values


def run_features(args: argparse.Namespace) -> int:
    """`tta eval --features A.npz [B.npz ...]`: the online protocol on stored features (tta.offline)."""
    from tta import offline
    from tta.methods.base import get_method_class, list_methods

    try:
        if args.data:
            raise BadRequest("give DATA or --features, not both", code="bad_options")
        if args.orders < 1:
            raise BadRequest("--orders must be at least 1", code="bad_options")
        methods = list_methods() if not args.methods or args.methods == "all" else \
            [m.strip() for m in args.methods.split(",") if m.strip()]
        for method in methods:
            get_method_class(method)
        overrides = method_options(args.option, methods)
        bundles = [offline.load_bundle(path) for path in args.features]
        reports, calibrations = [], []
        for bundle in bundles:
            report = offline.evaluate_bundle(bundle, methods, orders=args.orders, overrides=overrides,
                                             tune=not args.no_tune, progress=not args.no_progress)
            reports.append(report)
            print(offline.format_results(report) + "\n")
            if args.calibrate:
                cal = offline.calibrate_bundle(bundle, tda_options=report["chosen"].get("tda"),
                                               progress=not args.no_progress)
                calibrations.append(cal)
                print(offline.format_calibration(cal))
                defaults = json.dumps({"auto": {**offline.feature_options("auto"), "temperature": round(cal["temperature"], 4)}})
                print(f"  deploy it with: tta archive ... --method-defaults '{defaults}' "
                      f"--drift-temperature {cal['temperature']:.4f}\n")
    except TTAError as exc:
        print(f"tta: error: {exc}", file=sys.stderr)
        return 2
    averages = offline.average(reports)
    if len(reports) > 1:
        print(offline.format_average(averages, len(reports)))
    body = {"protocol": offline.PROTOCOL, "datasets": reports, "average": averages, "calibration": calibrations}
    if args.json:
        Path(args.json).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    if args.csv:
        rows = offline.csv_rows(reports, averages)
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        offline.plot_gains(args.plot, reports, averages, "gain over zero-shot, 95% paired intervals")
    return 0

