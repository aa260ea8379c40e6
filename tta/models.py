"""CLIP loading: one entry point, `load_model(spec)`, for every source a deployment uses.

Accepted specs (``ARCH`` is any open_clip architecture name, e.g. ``ViT-B-16``):

- ``ARCH:TAG``          open_clip pretrained tag, e.g. ``ViT-B-16:openai``, ``ViT-B-32:laion2b_s34b_b79k``
- ``ARCH:/path/ckpt``   a local checkpoint (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``
                        or ``.safetensors``)
- ``hf-hub:org/name``   an open_clip model on the Hugging Face hub (config + weights)
- ``local-dir:/path``   a folder holding ``open_clip_config.json`` and weights
- ``tiny-random``       a ~3.4 M parameter CLIP with seeded random weights (tests, offline smoke runs)
- ``ARCH-random``       the real architecture with seeded random weights (cost measurements)
- ``tiny-digits``       a tiny CLIP trained on sklearn's digits by `tta.testing.digits` (cached)

Weights are looked up in the local cache first; when the hub cannot be reached we fail in
seconds with a message naming the model, the cache searched and the offline alternatives,
instead of letting the hub client retry for a minute.

Hub weights are read at a pinned commit (`HUB_REVISIONS`): a hub repository's main branch can
move, and every pod, the weights Job (`tta fetch-weights`) and a rebuilt image must load the same
bytes. `TTA_HUB_REVISION` overrides the pin of the model being loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tta.errors import ModelUnavailable

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Our architectures, as open_clip JSON configs (configuration as data): `TTA-Tiny` is a
# ~3.4 M parameter CLIP that builds in ~0.1 s and keeps CLIP's real tokenizer.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_ARCH = "TTA-Tiny"
RANDOM_SEED = 0
_configs_registered = False


def register_model_configs() -> None:
    """Make our architectures known to open_clip (idempotent)."""
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _configs_registered = True


@dataclass
class ClipModel:
    """A frozen CLIP plus what is needed to feed it: tokenizer and preprocessing constants."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    preprocess: Any = None  # open_clip's PIL transform, kept for callers that want it
    info: dict[str, Any] = field(default_factory=dict)
    # optional stand-in for model.encode_image in frozen forward passes (e.g. ONNX Runtime, see
    # tta.onnx_encoder); tta.features.encode_images uses it when set
    image_encoder: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1]) if hasattr(self.model, "text_projection") else -1

    def to(self, device: str | torch.device) -> ClipModel:
        self.model.to(device)
        return self


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build random weights deterministically without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_loggers(names: tuple[str | None, ...] = (None,)) -> Iterator[None]:
    """Silence warnings libraries log on purpose-built random models (None = the root logger)."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, previous, strict=True):
            lg.setLevel(level)


# Hugging Face hub repository -> the commit its weights are read at. Found in open_clip's
# pretrained.py (`hf_hub` of the tag); the commit is the snapshot that hub caches of
# ViT-B-16:openai users hold (models--timm--vit_base_patch16_clip_224.openai/snapshots/<commit>).
HUB_REVISIONS: dict[str, str] = {
    "timm/vit_base_patch16_clip_224.openai": "977e3dd0ec55ab8da155f2fbeb6b5f54948b6e3d",
}
REVISION_ENV = "TTA_HUB_REVISION"
HF_CONFIG_NAME = "open_clip_config.json"
HF_WEIGHTS_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's preference


@dataclass(frozen=True)
class HubWeights:
    """Where a spec's weights live on the hub: what `tta fetch-weights` copies and pods read offline."""

    spec: str
    repo_id: str
    weights: tuple[str, ...]  # candidate file names, the first present one is used
    revision: str | None
    config: bool = False  # hf-hub: repositories carry open_clip_config.json too


def hub_weights(spec: str, revision: str | None = None) -> HubWeights | None:
    """The hub files behind `spec`, or None when it loads without the hub (random, local files).

    The revision: `revision`, else env TTA_HUB_REVISION, else the pin in HUB_REVISIONS, else main.
    """
    spec = spec.strip()
    arch, rest = parse_spec(spec)
    if spec.startswith("hf-hub:"):
        repo_id, weights, config = spec[len("hf-hub:"):], HF_WEIGHTS_NAMES, True
    elif (rest is None or spec.startswith("local-dir:") or "/" in rest
          or rest.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(rest).exists()):
        return None  # random weights, a local folder or checkpoint: nothing on the hub
    else:
        import open_clip

        register_model_configs()
        hub = (open_clip.get_pretrained_cfg(arch, rest) or {}).get("hf_hub", "")
        if not hub:
            return None
        repo_id, filename = os.path.split(hub)  # open_clip's convention: 'org/name/' or 'org/name/file.bin'
        if filename:  # an explicit file: its safetensors twin first, as open_clip does
            stem, suffix = os.path.splitext(filename)
            weights = ((f"{stem}.safetensors", filename) if suffix in (".bin", ".pth") else (filename,))
        else:
            weights = HF_WEIGHTS_NAMES
        config = False
    revision = revision or os.environ.get(REVISION_ENV) or HUB_REVISIONS.get(repo_id)
    return HubWeights(spec=spec, repo_id=repo_id, weights=weights, revision=revision, config=config)


def resolve_hub_files(weights: HubWeights, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Download (or find in the cache) the files of `weights` at its revision: {"weights": path, ["config": path]}.

    Raises FileNotFoundError naming the repository, the revision and the files tried.
    """
    from huggingface_hub import hf_hub_download

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(weights.repo_id, filename, revision=weights.revision,
                                    cache_dir=str(cache_dir) if cache_dir else None))

    out: dict[str, Path] = {}
    errors: list[str] = []
    if weights.config:
        try:
            out["config"] = fetch(HF_CONFIG_NAME)
        except Exception as exc:  # huggingface_hub raises many kinds; all mean "not there"
            errors.append(f"{HF_CONFIG_NAME}: {str(exc).splitlines()[0][:160]}")
    for filename in weights.weights:
        try:
            out["weights"] = fetch(filename)
            break
        except Exception as exc:
            errors.append(f"{filename}: {str(exc).splitlines()[0][:160]}")
    if "weights" not in out or (weights.config and "config" not in out):
        raise FileNotFoundError(f"{weights.repo_id} at revision {weights.revision or 'main'}: " + "; ".join(errors))
    return out


def tag_build_kwargs(arch: str, tag: str) -> dict[str, Any]:
    """open_clip keyword arguments that make `pretrained=<file>` build what `pretrained=<tag>` builds.

    open_clip takes the activation (QuickGELU for OpenAI's weights) and the preprocessing from the
    tag's config; loading a file at a pinned revision must carry them over explicitly.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    kwargs: dict[str, Any] = {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}
    for key, arg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                     ("resize_mode", "image_resize_mode")):
        if cfg.get(key) is not None:
            kwargs[arg] = cfg[key]
    return kwargs


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """True when the HF hub answers a TCP connect quickly (and offline mode is not forced)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("TTA_OFFLINE", "") in ("1", "true", "yes"):
        return False
    host = urllib.parse.urlparse(_hub_endpoint()).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Force huggingface_hub to read only its cache (it checks this flag at call time)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _unavailable(spec: str, where: str, cause: BaseException | str) -> ModelUnavailable:
    return ModelUnavailable(
        f"cannot load CLIP weights for '{spec}': not found in {where} and the hub is unreachable "
        f"or refused ({str(cause).splitlines()[0][:200]}). "
        "Use a local checkpoint ('ARCH:/path/to/clip.pt' or '.safetensors'), an open_clip folder "
        "('local-dir:/path'), pre-populate the cache (`tta fetch-weights MODEL --to DIR`, then "
        "HF_HUB_CACHE=DIR; in Kubernetes the clip-tta-fetch-weights Job fills the model-cache volume), "
        "or serve offline with MODEL=tiny-random."
    )


def _tokenizer_for(arch_or_id: str) -> Any:
    import open_clip

    return open_clip.get_tokenizer(arch_or_id)


def _wrap(model: torch.nn.Module, preprocess: Any, tokenizer: Any, name: str, **info: Any) -> ClipModel:
    visual = model.visual
    size = visual.image_size if hasattr(visual, "image_size") else 224
    size = size[0] if isinstance(size, tuple | list) else int(size)
    mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)
    return ClipModel(
        model=_freeze(model), tokenizer=tokenizer, name=name, image_size=int(size),
        mean=mean, std=std, preprocess=preprocess, info=info,
    )


def _build_arch_random(arch: str, spec: str) -> ClipModel:
    import open_clip

    register_model_configs()
    if arch not in open_clip.list_models():
        raise ModelUnavailable(f"unknown open_clip architecture '{arch}' in '{spec}'; see open_clip.list_models()")
    with seeded(RANDOM_SEED), quiet_loggers():  # "no pretrained weights" is the point here
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    return _wrap(model, preprocess, _tokenizer_for(arch), spec, source="random", arch=arch)


def _build_from_checkpoint(arch: str, path: str, spec: str) -> ClipModel:
    import open_clip

    register_model_configs()
    if arch not in open_clip.list_models():
        raise ModelUnavailable(f"unknown open_clip architecture '{arch}' in '{spec}'; see open_clip.list_models()")
    if not Path(path).is_file():
        raise ModelUnavailable(f"checkpoint for '{spec}' not found: {path} does not exist or is not a file")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path, weights_only=True)
    except Exception as exc:  # a wrong or corrupt checkpoint must name itself
        raise ModelUnavailable(f"checkpoint {path} cannot be loaded into {arch}: {exc}") from exc
    return _wrap(model, preprocess, _tokenizer_for(arch), spec, source="checkpoint", arch=arch, path=path)


def _build_from_hub(name: str, spec: str, pretrained: str | None) -> ClipModel:
    import open_clip

    online = hub_reachable()
    try:
        with _hub_offline(not online):
            # resolve the weights before building the architecture: a miss fails in seconds, and
            # open_clip would otherwise fall back to random weights for hf-hub ids
            hub = hub_weights(spec) if (name.startswith("hf-hub:") or pretrained) else None
            if hub is not None:  # at the pinned revision (open_clip itself would read `main`)
                files = resolve_hub_files(hub)
                if hub.config:  # the pinned snapshot is an open_clip folder: config + weights
                    folder = f"local-dir:{files['config'].parent}"
                    model, _, preprocess = open_clip.create_model_and_transforms(folder)
                    tokenizer = _tokenizer_for(folder)
                else:
                    model, _, preprocess = open_clip.create_model_and_transforms(
                        name, pretrained=str(files["weights"]), weights_only=True,
                        **tag_build_kwargs(name, pretrained or ""))
                    tokenizer = _tokenizer_for(name)
                return _wrap(model, preprocess, tokenizer, spec, source="hub", online=online,
                             repo=hub.repo_id, revision=hub.revision)
            if pretrained:  # a tag served from a URL, not the hub
                cfg = open_clip.get_pretrained_cfg(name, pretrained)
                if not open_clip.pretrained.download_pretrained(cfg):
                    raise RuntimeError(f"no download source for {name}:{pretrained}")
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, require_pretrained=True
            )
            tokenizer = _tokenizer_for(name)
    except (OSError, RuntimeError, ValueError) as exc:
        raise _unavailable(spec, f"the Hugging Face cache {_hub_cache_dir()}", exc) from exc
    return _wrap(model, preprocess, tokenizer, spec, source="hub", online=online)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split 'ARCH:TAG_OR_PATH' into (arch, rest); schema specs (hf-hub:, local-dir:) stay whole."""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    arch, sep, rest = spec.partition(":")
    return arch, (rest if sep else None)


class _EmbeddingSpace(torch.nn.Module):
    """The parts of a CLIP that classifying stored embeddings needs: the width and the logit scale."""

    def __init__(self, embed_dim: int, logit_scale: float) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(logit_scale).log(), requires_grad=False)
        self.text_projection = torch.nn.Parameter(torch.zeros(0, embed_dim), requires_grad=False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise ModelUnavailable("this model holds no image encoder: it classifies precomputed embeddings only")

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise ModelUnavailable("this model holds no text encoder: give the label set's text features")


def embedding_model(embed_dim: int, logit_scale: float = 100.0, name: str = "embeddings",
                    image_size: int = 224) -> ClipModel:
    """A stand-in CLIP for stored embeddings of a real one (e.g. the CLIP ViT-B/16 feature bundles):
    no encoders, the given width and logit scale (OpenAI CLIP's is 100). With `Engine.predict_features`
    and text features put into the engine's cache, every method that works on the original view's
    embedding runs unchanged; anything that would encode raises `ModelUnavailable`."""
    if embed_dim < 1 or not logit_scale > 0:
        raise ValueError("embed_dim must be >= 1 and logit_scale > 0")
    model = _freeze(_EmbeddingSpace(embed_dim, logit_scale))
    return ClipModel(model=model, tokenizer=None, name=name, image_size=image_size,
                     info={"kind": "embeddings", "embed_dim": embed_dim, "logit_scale": logit_scale})


def load_model(spec: str, device: str | torch.device = "cpu") -> ClipModel:
    """Return a frozen CLIP (eval mode, no grad) with its tokenizer and preprocessing, on `device`."""
    spec = spec.strip()
    if not spec:
        raise ModelUnavailable("empty model name; try 'tiny-random' or 'ViT-B-16:openai'")
    arch, rest = parse_spec(spec)
    if spec == "tiny-random":
        clip = _build_arch_random(TINY_ARCH, spec)
    elif spec == "tiny-digits":
        from tta.testing.digits import load_digits_clip

        clip = load_digits_clip()
    elif rest is None and spec.endswith("-random"):
        clip = _build_arch_random(spec[: -len("-random")], spec)
    elif spec.startswith(("hf-hub:", "local-dir:")):
        clip = _build_from_hub(spec, spec, None)
    elif rest is None:
        raise ModelUnavailable(
            f"model '{spec}' names no weights: use 'ARCH:TAG' (e.g. ViT-B-16:openai), 'ARCH:/path/ckpt', "
            "'hf-hub:org/name', 'tiny-random' or 'ARCH-random'"
        )
    elif "/" in rest or rest.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(rest).exists():
        clip = _build_from_checkpoint(arch, rest, spec)
    else:
        import open_clip

        register_model_configs()
        if arch not in open_clip.list_models():
            raise ModelUnavailable(f"unknown open_clip architecture '{arch}' in '{spec}'")
        if not open_clip.get_pretrained_cfg(arch, rest):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise ModelUnavailable(f"unknown pretrained tag '{rest}' for {arch}; known tags: {tags}")
        clip = _build_from_hub(arch, spec, rest)
    clip.to(device)
    log.info("loaded CLIP %s on %s", spec, device)
    return clip


def resolve_device(requested: str | None = None, gpu_id: int | None = None) -> torch.device:
    """Pick the device: an explicit request wins, then the given GPU when CUDA exists, else CPU."""
    if requested and requested not in ("auto", ""):
        if requested.startswith("cuda") and not torch.cuda.is_available():
            from tta.errors import BadRequest

            raise BadRequest(f"device '{requested}' requested but CUDA is not available", code="bad_device")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id or 0}")
    return torch.device("cpu")
