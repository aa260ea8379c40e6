"""Our dpe / boostadapter / dota / oga against the authors' own code, on identical features and views.

    uv run --frozen --with info-nce-pytorch python -m bench.check_originals \\
        --dpe-repo /tmp/orig/DPE-CLIP --boost-repo /tmp/orig/BoostAdapter --dota-repo /tmp/orig/DOTA \\
        --oga-repo /tmp/orig/OGA

Each `--*-repo` is a snapshot of the public repository (zhangce01/DPE-CLIP, taolinzhang/BoostAdapter,
skylineeeeen/DOTA, cfuchs2023/OGA); nothing of it is copied here: its module is imported from that path and its
own test loop (`run_test_dpe`, `run_test_tda(mode="boostadapter")`, `run_test_dota`) runs over a
loader of precomputed features, with a stand-in CLIP whose `encode_image` returns them. Its
`cls_acc` is replaced by a recorder of the final logits it is called with. Our method runs
through its own `predict` (`bench.feature_stream`) on the same features, in the same order.

Instrumentation, so the comparison measures algorithms rather than devices: `Tensor.cuda()` is a
no-op and `Tensor.half()` casts to float32 while an original runs (their CUDA float16 becomes CPU
float32); `wandb`, `loguru`, `IPython`, `sklearn.manifold`, `matplotlib` and `gdown` (logging, plots and downloads
only) are stubbed; `info_nce` is the real package (`--with info-nce-pytorch`).

Inputs: the first `--samples` test features of a real CLIP ViT-B/16 bundle in a seeded order, and
(where a method uses views) `--views` synthetic views per image (the feature plus Gaussian noise,
normalised: real augmented views need the images, which the bundles do not have). Hyper-parameters:
the repository's own config for that dataset. Printed per method: same top-1 on N of M samples,
the largest difference of log-probabilities (logits up to their softmax-invariant shift), and
each side's accuracy. Writes bench/results/check_originals.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.feature_stream import Bundle, FeatureDriver, load_bundle, synthetic_views  # noqa: E402
from tta.state import StateConfig, configure  # noqa: E402

log = logging.getLogger("check_originals")
STUBBED = ("wandb", "loguru", "IPython", "sklearn", "sklearn.manifold", "matplotlib", "matplotlib.pyplot", "gdown")
REPO_MODULES = ("utils", "clip", "datasets")  # each repository ships its own; never mix two


class _Anything(types.ModuleType):
    """A module whose every attribute is a do-nothing callable (logging / plotting stand-ins)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _Anything("result")


@contextlib.contextmanager
def original_code(repo: Path) -> Iterator[None]:
    """Import path = the snapshot; CUDA/float16 casts are no-ops; logging-only modules stubbed."""
    saved_cuda, saved_half = torch.Tensor.cuda, torch.Tensor.half
    saved_modules = {k: sys.modules[k] for k in list(sys.modules) if k.split(".")[0] in REPO_MODULES + STUBBED}
    for key in saved_modules:
        del sys.modules[key]
    for name in STUBBED:
        sys.modules[name] = _Anything(name)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.Tensor.half = lambda self, *a, **k: self.float()  # type: ignore[method-assign]
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        sys.path.remove(str(repo))
        torch.Tensor.cuda, torch.Tensor.half = saved_cuda, saved_half  # type: ignore[method-assign]
        for key in [k for k in sys.modules if k.split(".")[0] in REPO_MODULES + STUBBED]:
            del sys.modules[key]
        sys.modules.update(saved_modules)


class FeatureCLIP:
    """Stand-in for the repos' CLIP: `encode_image` returns the features it is given."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.clone()


def _record(into: list[torch.Tensor]) -> Callable[..., float]:
    def cls_acc(output: torch.Tensor, target: torch.Tensor, topk: int = 1) -> float:
        into.append(output.detach().float().reshape(-1).clone())
        return 100.0 * float(int(output.reshape(-1).argmax()) == int(target.reshape(-1)[0]))
    return cls_acc


def _loader(samples: list[torch.Tensor], labels: torch.Tensor) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Batch size 1 as the repos load: a list of [1, d] views (row 0 the original) and the target."""
    return [([row[None] for row in views], labels[i:i + 1]) for i, views in enumerate(samples)]


def _config(repo: Path, sub: str, dataset: str) -> dict[str, Any]:
    return yaml.safe_load((repo / sub / f"{dataset}.yaml").read_text())


def run_ours(method: str, options: dict[str, Any], samples: list[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
    driver = FeatureDriver(method, text, options)
    out = []
    for i, views in enumerate(samples):
        probs, _ = driver.predict(views, seed=i)
        out.append(probs.clamp_min(1e-30).log())
    driver.close()
    return out


def compare(name: str, original: list[torch.Tensor], ours: list[torch.Tensor], labels: torch.Tensor) -> dict[str, Any]:
    assert len(original) == len(ours), (len(original), len(ours))
    same = sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(original, ours, strict=True))
    diff = max(float((a.log_softmax(-1) - b.log_softmax(-1)).abs().max()) for a, b in zip(original, ours, strict=True))
    acc_o = sum(int(a.argmax()) == int(y) for a, y in zip(original, labels.tolist(), strict=True)) / len(labels)
    acc_u = sum(int(b.argmax()) == int(y) for b, y in zip(ours, labels.tolist(), strict=True)) / len(labels)
    row = {"check": name, "samples": len(ours), "same_top1": same, "max_logprob_diff": diff,
           "original_acc": round(100 * acc_o, 2), "ours_acc": round(100 * acc_u, 2)}
    print(f"{name:40s} same top-1 on {same} of {len(ours)}; largest log-prob difference {diff:.2e}; "
          f"accuracy original {100 * acc_o:.2f} / ours {100 * acc_u:.2f}")
    return row


def check_dota(repo: Path, bundle: Bundle, samples: list[torch.Tensor], labels: torch.Tensor,
               per_class: bool) -> dict[str, Any]:
    cfg = _config(repo, "configs/vit", bundle.name)
    recorded: list[torch.Tensor] = []
    with original_code(repo):
        module = importlib.import_module("dota")
        module.cls_acc = _record(recorded)
        d, c = bundle.text.shape[1], bundle.text.shape[0]
        model = module.DOTA(cfg, input_shape=d, num_classes=c, clip_weights=torch.full((d, c), 0.001))
        module.run_test_dota(cfg, _loader(samples, labels), FeatureCLIP(), bundle.text.t().contiguous(), model,
                             logging.getLogger("dota-original"))
    options = {k: cfg[k] for k in ("epsilon", "sigma", "eta", "rho")}
    options.update(n_views=samples[0].shape[0], augmix=False, covariance="per_class" if per_class else "pooled")
    ours = run_ours("dota", options, samples, bundle.text)
    return compare(f"dota covariance={options['covariance']} views={options['n_views']}", recorded, ours, labels)


def check_boost(repo: Path, bundle: Bundle, samples: list[torch.Tensor], labels: torch.Tensor,
                infer_original: bool) -> dict[str, Any]:
    cfg = _config(repo, "configs", bundle.name)
    recorded: list[torch.Tensor] = []
    with original_code(repo):
        module = importlib.import_module("runner")
        module.cls_acc = _record(recorded)
        args = argparse.Namespace(mode="boostadapter", datasets=bundle.name if infer_original else "I")
        module.run_test_tda(cfg["positive"], cfg["negative"], _loader(samples, labels), FeatureCLIP(),
                            bundle.text.t().contiguous(), logging.getLogger("boost-original"), args, cfg)
    pos, neg = cfg["positive"], cfg["negative"]
    options = {"n_views": samples[0].shape[0], "infer_original": infer_original, "delta": cfg["delta"],
               "pos_capacity": pos["shot_capacity"], "pos_alpha": pos["alpha"], "pos_beta": pos["beta"],
               "neg_capacity": neg["shot_capacity"], "neg_alpha": neg["alpha"], "neg_beta": neg["beta"],
               "neg_entropy": [neg["entropy_threshold"]["lower"], neg["entropy_threshold"]["upper"]],
               "neg_mask": [neg["mask_threshold"]["lower"], neg["mask_threshold"]["upper"]]}
    ours = run_ours("boostadapter", options, samples, bundle.text)
    return compare(f"boostadapter infer_original={infer_original} views={options['n_views']}", recorded, ours, labels)


def check_dpe(repo: Path, bundle: Bundle, samples: list[torch.Tensor], labels: torch.Tensor,
              infer_on_views: bool) -> dict[str, Any]:
    cfg = _config(repo, "configs", bundle.name)
    recorded: list[torch.Tensor] = []
    with original_code(repo):
        module = importlib.import_module("main_dpe")
        module.cls_acc = _record(recorded)
        module.run_test_dpe(cfg["positive"], cfg["learning_rate"], _loader(samples, labels), FeatureCLIP(),
                            bundle.text.t().contiguous(), "A" if infer_on_views else bundle.name)
    pos, lr = cfg["positive"], cfg["learning_rate"]
    options = {"n_views": samples[0].shape[0], "augmix": False, "infer_on_views": infer_on_views,
               "pos_capacity": pos["shot_capacity"], "alpha": pos["alpha"], "beta": pos["beta"],
               "lr_text": lr["text"], "lr_image": lr["image"], "align": lr["align"]}
    ours = run_ours("dpe", options, samples, bundle.text)
    return compare(f"dpe infer_on_views={infer_on_views} views={options['n_views']}", recorded, ours, labels)


def check_oga(repo: Path, bundle: Bundle, samples: list[torch.Tensor], labels: torch.Tensor,
              estimator: str = "ridge_moore_penrose") -> dict[str, Any]:
    """OGA's repo has no per-sample test loop to call (its `runner.py` needs datasets and a CLIP), so
    its `GaussAdapt` is driven here exactly as `runner.py` drives it, with batches of one: zero-shot
    logits 100 f T^T in float64, entropy with 1e-9, `update_memory`, then `get_log_probs` and
    `get_MAP(tau, simplex_p=True)`. Its float16 memory buffers are cast to float32 (the CUDA setting
    of the repo, as `.half()` is for the other repos)."""
    repo_names = {"ridge_moore_penrose": "RidgeMoorePenrose", "ridge": "Ridge", "moore_penrose": "MoorePenrose"}
    tau, capacity = 0.05, 8  # the repo's main.py defaults
    recorded: list[torch.Tensor] = []
    text = bundle.text.float()
    with original_code(repo):
        module = importlib.import_module("OGA.OGA_core")
        model = module.GaussAdapt(text.clone(), shot_capacity=capacity, sig_type=repo_names[estimator])
        for name in ("memory", "memory_entropy", "memory_soft_labels"):
            getattr(model, name).data = getattr(model, name).data.float()
        for views in samples:
            x = views[:1].float()
            zs_logits = 100.0 * (x @ text.t()).double()
            zs_probs = zs_logits.softmax(-1)
            zs_entropy = -torch.sum(torch.log(zs_probs + 1e-9) * zs_probs, dim=-1)
            model.update_memory(x, zs_logits, zs_probs, zs_entropy, zs_logits.argmax(-1), tau=tau, normalize_mu=False)
            z, _ = model.get_MAP(zs_probs, model.get_log_probs(x), tau=tau, simplex_p=True)
            recorded.append(z.reshape(-1).float().clamp_min(1e-30).log())  # as `run_ours` takes the log
    ours = run_ours("oga", {"tau": tau, "shot_capacity": capacity, "estimator": estimator}, samples, bundle.text)
    return compare(f"oga estimator={estimator}", recorded, ours, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dpe-repo", type=Path)
    parser.add_argument("--boost-repo", type=Path)
    parser.add_argument("--dota-repo", type=Path)
    parser.add_argument("--oga-repo", type=Path)
    parser.add_argument("--bundle", default="dtd")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--views", type=int, default=64, help="synthetic views per image where a method uses views")
    parser.add_argument("--noise", type=float, default=0.5, help="view noise (cosine to the original ~ 1/sqrt(1+noise^2))")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a shared CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "check_originals.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    configure(StateConfig())  # in-process state
    torch.manual_seed(args.seed)
    bundle = load_bundle(args.bundle)
    order = torch.randperm(bundle.test.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.samples]
    labels = bundle.test_labels[order]
    single = [bundle.test[i][None].clone() for i in order.tolist()]
    gen = torch.Generator().manual_seed(args.seed + 1)
    views = [synthetic_views(bundle.test[i], args.views, args.noise, gen) for i in order.tolist()]
    rows = []
    if args.dota_repo:
        rows.append(check_dota(args.dota_repo, bundle, single, labels, per_class=True))
        rows.append(check_dota(args.dota_repo, bundle, single, labels, per_class=False))
        rows.append(check_dota(args.dota_repo, bundle, views, labels, per_class=True))
    if args.boost_repo:
        rows.append(check_boost(args.boost_repo, bundle, views, labels, infer_original=True))
        rows.append(check_boost(args.boost_repo, bundle, views, labels, infer_original=False))
        rows.append(check_boost(args.boost_repo, bundle, single, labels, infer_original=True))
    if args.dpe_repo:
        rows.append(check_dpe(args.dpe_repo, bundle, single, labels, infer_on_views=False))
        rows.append(check_dpe(args.dpe_repo, bundle, views, labels, infer_on_views=False))
        rows.append(check_dpe(args.dpe_repo, bundle, views, labels, infer_on_views=True))
    if args.oga_repo:
        for estimator in ("ridge_moore_penrose", "ridge", "moore_penrose"):
            rows.append(check_oga(args.oga_repo, bundle, single, labels, estimator))
    meta = {"bundle": args.bundle, "samples": args.samples, "views": args.views, "noise": args.noise, "seed": args.seed,
            "repos": {k: str(v) for k, v in (("dpe", args.dpe_repo), ("boostadapter", args.boost_repo),
                                              ("dota", args.dota_repo), ("oga", args.oga_repo)) if v}, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
