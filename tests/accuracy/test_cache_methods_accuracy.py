"""Cache methods on a shifted digits stream with the tiny digits CLIP: do they help, and at what cost?

The stream is the digits test split (540 images), each image shifted by one of noise, blur,
contrast or rotation at severity 4 (a quarter each), in a fixed shuffled order. Every method runs
through `Engine.predict` one image at a time, as a server would, on a fresh engine:
- `gda` is first given 48 labelled examples per class (shifted train images) through the
  feedback path, then classifies the stream;
- `tda`, `tfup`, `tfup-t` see only the unlabelled stream; their accuracy over the second half of
  the stream is reported.
Numbers come from a 3 M-parameter CLIP trained on 8x8 digits: they show the mechanics work, not
what the methods do for a real CLIP (real-feature accuracy: the evidence tests).

The claims are paired statistics over the same 540 images (tests/stats.py), with margins a
different CPU's slightly different digits weights cannot cross (measured on an Intel Xeon,
docs/portability.md):
- GDA beats zero-shot: one-sided 99.9 % lower bound of the accuracy gain > 0 (measured +8.7
  points, bound +3.0, i.e. 16 images of net margin);
- TDA / TFUP are non-inferior to zero-shot: one-sided 99.9 % lower bound of the difference above
  -5 points (measured: they change 5 and 2 answers of 540; bound -1.1 points). "At least as
  accurate" on raw accuracies was a coin flip on one or two images and is not claimed.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.stats import Z_999, paired
from tta.engine import Engine
from tta.testing.digits import DIGIT_CLASSNAMES, SHIFT_KINDS, digits_split, shift_images
from tta.text import LabelSet

SEVERITY = 4
SHOTS = 48
NON_INFERIORITY = 0.05  # TDA/TFUP may not be worse than zero-shot by this much (99.9 % one-sided)


def _shifted(split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_split(split)
    parts, targets = [], []
    for i, kind in enumerate(SHIFT_KINDS):
        index = torch.arange(len(images))[i :: len(SHIFT_KINDS)]
        parts.append(shift_images(images[index], kind, SEVERITY, seed=seed + i))
        targets.append(labels[index])
    images, labels = torch.cat(parts), torch.cat(targets)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order], labels[order]


def _run(engine: Engine, method: str, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    correct = []
    start = time.perf_counter()
    for image, label in zip(images, labels, strict=True):
        correct.append(engine.predict(image, method=method).label == DIGIT_CLASSNAMES[int(label)])
    latency_ms = (time.perf_counter() - start) * 1000.0 / len(images)
    hits = torch.tensor(correct, dtype=torch.float32)
    half = len(hits) // 2
    return {"accuracy": float(hits.mean()), "second_half": float(hits[half:].mean()), "latency_ms": latency_ms,
            "hits": hits.bool()}


@pytest.fixture(scope="module")
def results(digits_clip) -> dict[str, dict[str, float]]:
    images, labels = _shifted("test", seed=0)
    label_set = LabelSet.create(DIGIT_CLASSNAMES)
    out: dict[str, dict[str, float]] = {}
    for method in ("zeroshot", "tda", "tfup", "tfup-t"):
        out[method] = _run(Engine(digits_clip, label_set), method, images, labels)
    # GDA's zero-shot term uses the repo's fixed scale 100 by default (real CLIPs learn ~100); the
    # digits CLIP learned ~14, so it is deployed with its own scale (logit_scale 0), as a model
    # trained with another temperature should be: with 100 its zero-shot term drowns the GDA term
    engine = Engine(digits_clip, label_set, method_defaults={"gda": {"logit_scale": 0.0}})
    support, support_labels = _shifted("train", seed=100)
    start = time.perf_counter()
    per_class = [(support_labels == k).nonzero().flatten()[:SHOTS] for k in range(len(DIGIT_CLASSNAMES))]
    for shot in range(SHOTS):  # labelled feedback arrives mixed over the classes
        for k, index in enumerate(per_class):
            engine.feedback(support[index[shot]], DIGIT_CLASSNAMES[k], "gda")
    feedback_ms = (time.perf_counter() - start) * 1000.0 / (SHOTS * len(DIGIT_CLASSNAMES))
    out["gda"] = _run(engine, "gda", images, labels)
    out["gda"]["feedback_ms"] = feedback_ms
    out["gda"]["refit_ms"] = float(engine.state_summary("gda")["last_refit_ms"])
    return out


def test_print_table(results, capsys) -> None:
    lines = [f"cache methods, digits CLIP, shifted stream (severity {SEVERITY}, 540 images; gda: {SHOTS} labels/class)",
             f"{'method':<9} {'accuracy':>8} {'2nd half':>8} {'ms/req':>7}"]
    for method, r in results.items():
        lines.append(f"{method:<9} {r['accuracy']:8.3f} {r['second_half']:8.3f} {r['latency_ms']:7.1f}")
    g = results["gda"]
    lines.append(f"gda feedback {g['feedback_ms']:.1f} ms/example (last refit incl. alpha CV {g['refit_ms']:.1f} ms)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert len(lines) == 2 + len(results) + 1


def test_gda_from_48_labels_per_class_beats_zero_shot(results) -> None:
    stat = paired(results["gda"]["hits"], results["zeroshot"]["hits"])
    assert stat.n == 540
    assert stat.lower(Z_999) > 0, f"gda vs zero-shot: {stat}"


@pytest.mark.parametrize("method", ["tda", "tfup"])
def test_unlabelled_cache_methods_are_not_worse_than_zero_shot(results, method: str) -> None:
    for part in (slice(None), slice(270, None)):  # the whole stream and its second half
        stat = paired(results[method]["hits"][part], results["zeroshot"]["hits"][part])
        assert stat.lower(Z_999) > -NON_INFERIORITY, f"{method} vs zero-shot on {part}: {stat}"
