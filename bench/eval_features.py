"""Stream methods on real CLIP ViT-B/16 features: gain over zero-shot, several stream orders,
hyper-parameters chosen on the validation split only.

    uv run --frozen python -m bench.eval_features                       # all four bundles
    uv run --frozen python -m bench.eval_features --bundles dtd --test 500 --orders 2   # quick

Each method runs through `Engine.predict_features` (the method's own code, state and options) on
the bundle's original-view embeddings; dpe and boostadapter with one view (`n_views=1`: dpe's step
then sees the original view only, boostadapter has no boosting views, since a feature bundle has
no augmented views). Protocol per bundle and method:
1. tune: every combination of the method's `val_grid` (tda: the same pos_alpha x pos_beta grid as
   boostadapter) streams the first `--val` validation samples in one seeded order on a fresh
   engine; the best accuracy wins (ties: the first, i.e. closest to the grid's order);
2. test: the chosen options stream the first `--test` test samples of `--orders` seeded
   permutations, each on a fresh engine; reported: mean and standard deviation over orders of
   the accuracy, and of the gain over zero-shot on the same samples.
Writes bench/results/eval_features.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.feature_stream import BUNDLES, load_bundle  # noqa: E402
from tta.engine import Engine  # noqa: E402
from tta.methods.base import get_method_class  # noqa: E402
from tta.models import embedding_model  # noqa: E402
from tta.state import StateConfig, configure  # noqa: E402
from tta.text import LabelSet  # noqa: E402

METHODS = ("tda", "dota", "dpe", "boostadapter")
ONE_VIEW = {"dpe": {"n_views": 1}, "boostadapter": {"n_views": 1}}
EXTRA_GRIDS = {"tda": {"pos_alpha": (1.0, 2.0, 5.0), "pos_beta": (3.0, 5.0, 8.0)}}


def stream_accuracy(method: str, options: dict[str, Any], feats: torch.Tensor, labels: torch.Tensor,
                    text: torch.Tensor, order: torch.Tensor) -> float:
    """Accuracy of one pass over `order` on a fresh engine (fresh stream state)."""
    clip = embedding_model(text.shape[1])
    names = LabelSet.create([f"class {i}" for i in range(text.shape[0])])
    engine = Engine(clip, names, default_method=method, method_defaults={method: options} if options else None)
    engine.text_cache.put(clip, names, text)
    correct = 0
    for i in order.tolist():
        prediction = engine.predict_features(feats[i], method=method, seed=i)
        correct += int(names.names.index(prediction.label) == int(labels[i]))
    return correct / len(order)


def grid(method: str) -> list[dict[str, Any]]:
    space = EXTRA_GRIDS.get(method) or dict(get_method_class(method).val_grid)
    if not space:
        return [{}]
    keys = sorted(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundles", default=",".join(BUNDLES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--test", type=int, default=1000, help="test samples per order (0 = all)")
    parser.add_argument("--val", type=int, default=400, help="validation samples for tuning")
    parser.add_argument("--orders", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a shared CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_features.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    configure(StateConfig())
    results: dict[str, Any] = {"meta": {"test": args.test, "val": args.val, "orders": args.orders,
                                        "one_view": ONE_VIEW, "extra_grids": EXTRA_GRIDS}, "bundles": {}}
    for name in args.bundles.split(","):
        bundle = load_bundle(name)
        n_test = bundle.test.shape[0] if args.test <= 0 else min(args.test, bundle.test.shape[0])
        orders = [torch.randperm(bundle.test.shape[0], generator=torch.Generator().manual_seed(s))[:n_test]
                  for s in range(args.orders)]
        val_order = torch.randperm(bundle.val.shape[0], generator=torch.Generator().manual_seed(100))[:args.val]
        zs = [stream_accuracy("zeroshot", {}, bundle.test, bundle.test_labels, bundle.text, o) for o in orders]
        rows: dict[str, Any] = {"zeroshot": {"acc_mean": 100 * statistics.mean(zs), "per_order": zs}}
        print(f"{name}: zero-shot {100 * statistics.mean(zs):.2f} ({n_test} test samples x {args.orders} orders)")
        for method in args.methods.split(","):
            start = time.perf_counter()
            base = dict(ONE_VIEW.get(method, {}))
            scored = []
            for candidate in grid(method):
                options = {**base, **candidate}
                scored.append((stream_accuracy(method, options, bundle.val, bundle.val_labels, bundle.text, val_order),
                               candidate))
            best_val, chosen = max(scored, key=lambda s: s[0])  # max keeps the first of equal scores
            options = {**base, **chosen}
            accs = [stream_accuracy(method, options, bundle.test, bundle.test_labels, bundle.text, o) for o in orders]
            gains = [100 * (a - z) for a, z in zip(accs, zs, strict=True)]
            rows[method] = {"options": options, "val_acc": 100 * best_val, "acc_mean": 100 * statistics.mean(accs),
                            "acc_std": 100 * statistics.pstdev(accs), "gain_mean": statistics.mean(gains),
                            "gain_std": statistics.pstdev(gains), "per_order": accs,
                            "seconds": round(time.perf_counter() - start, 1)}
            print(f"  {method:13s} {100 * statistics.mean(accs):6.2f} +- {100 * statistics.pstdev(accs):.2f}  "
                  f"gain {statistics.mean(gains):+.2f} +- {statistics.pstdev(gains):.2f}  val-chosen {chosen}  "
                  f"({rows[method]['seconds']} s)", flush=True)
        results["bundles"][name] = {"n_test": n_test, "classes": int(bundle.text.shape[0]), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
