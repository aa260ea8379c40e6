"""What validating stream state costs (tta.state.schema), next to the work it guards, in one run.

    python -m bench.bench_validation            # ImageNet size: 1000 classes, d=512, TDA caches full
    python -m bench.bench_validation --quick    # small sizes, seconds

1. Per operation (every stream request, and every log entry a replica replays): `validate_op`
   of one TDA update against the apply of that operation (`_apply_op`: both caches offered) and
   against the adapted logits of the request, interleaved op by op (machine noise hits all alike).
2. Per import / snapshot restore: `validate_state` of a full TDA state against the import itself
   (`_import_state` after a clear), interleaved, several rounds.

Writes bench/results/state_validation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_state import DIM, OPTIONS, make_tda  # noqa: E402


def _timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_op(classes: int, n: int) -> dict[str, float]:
    method = make_tda(classes)
    gen = torch.Generator().manual_seed(1)
    validate, apply, logits = [], [], []
    for _ in range(n):
        feature = torch.nn.functional.normalize(torch.randn(DIM, generator=gen), dim=0)
        probs = torch.rand(classes, generator=gen).softmax(0)
        op = method.update_op(feature, int(torch.randint(0, classes, (1,), generator=gen)), 0.05, probs, OPTIONS)
        validate.append(_timed(lambda: method.validate_op(op)))  # noqa: B023
        apply.append(_timed(lambda: method._apply_op(op)))  # noqa: B023
        logits.append(_timed(lambda: method.adapted_logits(feature, probs.log(), OPTIONS)))  # noqa: B023
    v, a, lg = (statistics.median(x) * 1e6 for x in (validate, apply, logits))
    return {"validate_us_p50": round(v, 1), "apply_us_p50": round(a, 1), "adapted_logits_us_p50": round(lg, 1),
            "validate_over_apply": round(v / a, 3), "validate_over_apply_plus_logits": round(v / (a + lg), 3)}


def per_import(classes: int, rounds: int) -> dict[str, float]:
    method = make_tda(classes)
    state = method._export_with_meta()
    validate, load = [], []
    for _ in range(rounds):
        validate.append(_timed(lambda: method.validate_state(state)))
        method._clear_state()
        load.append(_timed(lambda: method._import_state(state)))
    v, lo = statistics.median(validate) * 1e3, statistics.median(load) * 1e3
    return {"entries": len(method.pos) + len(method.neg), "validate_ms_p50": round(v, 2), "import_ms_p50": round(lo, 2),
            "validate_over_import": round(v / lo, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    classes, n, rounds = (50, 200, 3) if args.quick else (1000, 2000, 7)
    result = {"classes": classes, "dim": DIM, "ops": n, "rounds": rounds, "torch_threads": 1,
              "machine": platform.processor() or platform.machine(), "per_op": per_op(classes, n),
              "per_import": per_import(classes, rounds)}
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "state_validation.json"
    if not args.quick:
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
