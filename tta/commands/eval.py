"""`tta eval DATA --methods zeroshot,tpt,zero --model M`: accuracy and latency per method.

DATA is a labelled folder (``class_name/image.jpg``; underscores in folder names become spaces
in the class names) or a built-in set (``digits``: scikit-learn's handwritten digits, test split,
optionally shifted with ``--shift noise|blur|contrast|rotate``). Every method sees the same
images in the same order (classes interleaved, so stream methods see a mixed stream) and starts
from a fresh state. This is how a deployment picks its method: the accuracy gain bought by each
millisecond on the deployment's own images and hardware.
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
    parser.add_argument("data", help="a folder of class_name/image files, or a built-in set: digits")
    parser.add_argument("--methods", default="zeroshot,tpt,zero",
                        help="comma-separated methods (see `tta methods`) (default: %(default)s)")
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


@dataclass
class MethodResult:
    """Running totals of one method over the evaluated images."""

    method: str
    latencies_s: list[float] = field(default_factory=list)
    correct: int = 0
    zeroshot_correct: int = 0
    changed: int = 0
    predictions: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies_s)
        lat = sorted(self.latencies_s)
        return {
            "method": self.method,
            "n": n,
            "accuracy": self.correct / n if n else float("nan"),
            "zeroshot_accuracy": self.zeroshot_correct / n if n else float("nan"),
            "changed_by_adaptation": self.changed / n if n else float("nan"),
            "latency_ms_median": 1000 * statistics.median(lat) if n else float("nan"),
            "latency_ms_p95": 1000 * lat[min(n - 1, int(0.95 * n))] if n else float("nan"),
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
            bar.set_description(result.method)
            for i, (_, y, load) in enumerate(items):
                image = load()
                start = time.perf_counter()
                pred = engine.predict(image, options=options[result.method], seed=seed + i, top_k=1)
                result.latencies_s.append(time.perf_counter() - start)
                result.correct += pred.label == classnames[y]
                result.zeroshot_correct += pred.zeroshot_label == classnames[y]
                result.changed += pred.changed_by_adaptation
                result.predictions.append(pred.label)
                records[i][result.method] = pred.label
                bar.update(1)
    finally:
        bar.close()
    return results, records


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'method':<10} {'n':>5} {'accuracy':>9} {'zero-shot':>9} {'changed':>8} {'p50 ms':>9} {'p95 ms':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<10} {r['n']:>5} {r['accuracy']:>9.4f} {r['zeroshot_accuracy']:>9.4f} "
                     f"{r['changed_by_adaptation']:>8.3f} {r['latency_ms_median']:>9.1f} {r['latency_ms_p95']:>9.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        from tta.methods.base import get_method_class
        from tta.models import load_model, resolve_device

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise BadRequest("--methods is empty", code="bad_options")
        for method in methods:
            get_method_class(method)  # unknown method: fail before loading anything
        options = method_options(args.option, methods)
        if args.limit is not None and args.limit < 1:
            raise BadRequest("--limit must be at least 1", code="bad_options")
        if args.data in BUILTIN_SETS:
            classnames, items = digits_dataset(args.limit, args.shift, args.severity)
            model_spec = args.model or "tiny-digits"
        else:
            root = Path(args.data)
            if not root.is_dir():
                raise BadRequest(f"{args.data} is neither a folder nor a built-in set {BUILTIN_SETS}", code="bad_dataset")
            if args.shift != "none":
                raise BadRequest("--shift applies to built-in sets only", code="bad_options")
            classnames, items = folder_dataset(root, args.limit)
            model_spec = args.model or "tiny-random"
        clip = load_model(model_spec, device=resolve_device(args.device))
        if args.onnx:
            from tta.onnx_encoder import enable_if_faster

            choice = enable_if_faster(clip, args.onnx)
            if choice is not None:
                print(f"image encoder: {choice.chosen} (eager {choice.eager_s:.3f} s, onnx {choice.onnx_s:.3f} s)",
                      file=sys.stderr)
        results, records = evaluate(clip, classnames, items, methods, options, args.templates, args.seed,
                                    progress=not args.no_progress)
    except TTAError as exc:
        print(f"tta: error: {exc}", file=sys.stderr)
        return 2
    rows = [r.summary() for r in results]
    print(f"{args.data}: {len(items)} images, {len(classnames)} classes, model {model_spec}, device {clip.device}")
    print(format_table(rows))
    meta = {"data": args.data, "model": model_spec, "device": str(clip.device), "n_images": len(items),
            "n_classes": len(classnames), "shift": args.shift, "options": options}
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "results": rows, "images": records}, indent=2) + "\n",
                                   encoding="utf-8")
    return 0
