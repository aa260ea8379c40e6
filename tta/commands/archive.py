"""`tta archive --model M --name N`: build `model_store/N.mar` for TorchServe.

The archive carries everything a worker needs besides the Python environment: the handler, a
copy of the `tta` package (so the served code is the archived code), the label file and a
generated model-config.yaml holding TorchServe's worker/batching keys and our own `tta:` section
(model spec, templates, default method, method defaults, request limits, metrics port).
No weights are packed: the worker loads them with `tta.load_model` from the cache or hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tta.errors import TTAError
from tta.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from tta.methods.base import get_method_class
from tta.text import imagenet_classnames, load_labels, resolve_templates

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
LABELS_NAME = "labels.txt"
ONNX_NAME = "image_encoder.onnx"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-random",
                        help="CLIP spec: ARCH:TAG, ARCH:/path/ckpt, hf-hub:org/name, tiny-random (default: %(default)s)")
    parser.add_argument("--name", default="clip", help="archive/model name: the N of /predictions/N (default: %(default)s)")
    parser.add_argument("--labels-file", help="class names, one per line or a JSON list (default: ImageNet's 1000)")
    parser.add_argument("--templates", default="single", help="'single', 'imagenet' (CLIP's 80) (default: %(default)s)")
    parser.add_argument("--method", default="zeroshot", help="default method for requests that name none")
    parser.add_argument("--method-defaults", default="{}",
                        help='JSON {method: {option: value}} baked into the deployment, e.g. \'{"tpt": {"n_views": 32}}\'')
    parser.add_argument("--out", default="model_store", help="export folder (default: %(default)s)")
    parser.add_argument("--version", default="1.0", help="model version (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="min = max workers; with >1, give --state-url (Redis) so stream methods share one "
                             "state (without it the extra workers refuse stream requests with 503) (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="TorchServe batchSize (default: %(default)s)")
    parser.add_argument("--max-batch-delay", type=int, default=10,
                        help="ms TorchServe's frontend waits to fill a batch, even when idle (default: %(default)s, "
                             "measured: docs/oip.md)")
    parser.add_argument("--max-batch-images", type=int, default=256,
                        help="images per shared image-encoder pass when a batch runs together (multi-view "
                             "requests are packed whole) (default: %(default)s)")
    parser.add_argument("--response-timeout", type=int, default=120, help="seconds per batch (default: %(default)s)")
    parser.add_argument("--startup-timeout", type=int, default=600,
                        help="seconds to load weights and warm up (default: %(default)s)")
    parser.add_argument("--device-type", choices=("auto", "cpu", "gpu"), default="auto",
                        help="TorchServe deviceType; auto = gpu when CUDA is visible now (default: %(default)s)")
    parser.add_argument("--max-labels", type=int, default=1000, help="per-request label list limit")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--metrics-port", type=int, default=8083,
                        help="port of the tta metrics exporter; 0 disables; env TTA_METRICS_PORT wins")
    parser.add_argument("--state-url",
                        help="Redis URL (redis://HOST:PORT/DB, rediss:// for TLS) holding the stream-method state "
                             "of this deployment: every worker and replica serves one state. The password may "
                             "come from env TTA_STATE_PASSWORD instead; env TTA_STATE_URL overrides this at run time")
    parser.add_argument("--state-dir", help="folder for stream-method state snapshots of a single-worker deployment "
                                            "(default: env TTA_STATE_DIR)")
    parser.add_argument("--state-every", type=int,
                        help="operations between state snapshots (default: 50 for files, 1000 for Redis)")
    parser.add_argument("--drift-reference-size", type=int, default=512,
                        help="answered images captured into the shared drift reference (tta.drift); env "
                             "TTA_DRIFT_REFERENCE_SIZE wins (default: %(default)s)")
    parser.add_argument("--drift-window", type=int, default=256,
                        help="each worker's sliding window of answered images compared with the reference; env "
                             "TTA_DRIFT_WINDOW wins (default: %(default)s)")
    parser.add_argument("--answers-max-entries", type=int, default=10_000,
                        help="answers each worker remembers for labels sent later by answer id (0: none; "
                             "docs/monitoring/labelled-answers.md) (default: %(default)s)")
    parser.add_argument("--answers-ttl", type=float, default=86_400.0,
                        help="seconds an answer stays labellable (default: %(default)s)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up prediction at worker start")
    parser.add_argument("--archive-format", choices=("default", "no-archive", "tgz"), default="default",
                        help="'no-archive' writes an unpacked folder (faster cold start)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite an existing archive")
    parser.add_argument("--onnx", action="store_true",
                        help="also export the image encoder to ONNX into the archive (tta.onnx_encoder); the worker "
                             "uses it when a load-time timing finds it faster (TTA_ONNX=on|off forces)")


def model_config(args: argparse.Namespace, method_defaults: dict[str, Any]) -> dict[str, Any]:
    """model-config.yaml: TorchServe's frontend keys (camelCase) plus our `tta:` section."""
    device_type = args.device_type
    if device_type == "auto":
        import torch

        device_type = "gpu" if torch.cuda.is_available() else "cpu"
    return {
        "minWorkers": args.workers,
        "maxWorkers": args.workers,
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "responseTimeout": args.response_timeout,
        "startupTimeout": args.startup_timeout,
        "deviceType": device_type,
        "tta": {
            "model": args.model,
            "labels_file": LABELS_NAME,
            "templates": args.templates,
            "default_method": args.method,
            "method_defaults": method_defaults,
            "max_labels": args.max_labels,
            "max_batch_images": args.max_batch_images,
            "max_image_pixels": args.max_image_pixels,
            "max_image_bytes": args.max_image_bytes,
            "metrics_port": args.metrics_port,
            "metrics_address": "127.0.0.1",
            "warmup": not args.no_warmup,
            "state_dir": args.state_dir,
            "state_url": args.state_url,
            "state_every": args.state_every,
            "drift_reference_size": args.drift_reference_size,
            "drift_window": args.drift_window,
            "answers_max_entries": args.answers_max_entries,
            "answers_ttl_s": args.answers_ttl,
            "image_encoder_onnx": ONNX_NAME if getattr(args, "onnx", False) else None,
        },
    }


def check_method_flags(args: argparse.Namespace) -> dict[str, Any]:
    """--method, --templates and --method-defaults checked as a worker would; the parsed defaults.

    Shared by `tta archive` and `tta serve`, so a bad flag fails before any server starts.
    """
    get_method_class(args.method)
    resolve_templates(args.templates)
    try:
        method_defaults = json.loads(args.method_defaults)
    except json.JSONDecodeError as exc:
        raise TTAError(f"--method-defaults is not JSON: {exc}") from exc
    if not isinstance(method_defaults, dict):
        raise TTAError("--method-defaults must be a JSON object {method: {option: value}}")
    for name, options in method_defaults.items():
        get_method_class(name).Options.from_dict(options).validate()
    if getattr(args, "answers_max_entries", 0) < 0 or not getattr(args, "answers_ttl", 1.0) > 0:
        raise TTAError("--answers-max-entries must be >= 0 and --answers-ttl > 0")
    return method_defaults


def _validate(args: argparse.Namespace) -> dict[str, Any]:
    """Fail at build time on what would otherwise fail every worker start."""
    method_defaults = check_method_flags(args)
    from tta.drift import DriftConfig

    try:
        DriftConfig(args.drift_reference_size, args.drift_window)
    except ValueError as exc:
        raise TTAError(str(exc)) from exc
    for flag in ("workers", "batch_size", "max_batch_images"):
        if getattr(args, flag) < 1:
            raise TTAError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.state_url:
        from urllib.parse import urlparse

        from tta.state import mask_url

        url = urlparse(args.state_url)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise TTAError(f"--state-url must be redis://, rediss:// or unix://, not {mask_url(args.state_url)}")
        if url.password:
            raise TTAError("--state-url carries a password, which would be stored in the archive: give it at run "
                           "time instead (env TTA_STATE_PASSWORD, or the whole URL in env TTA_STATE_URL)")
    return method_defaults


def default_labels() -> tuple[str, ...]:
    """ImageNet-1k class names (made unique by `imagenet_classnames`), so every class keeps its index."""
    return load_labels(list(imagenet_classnames()))


def handler_path() -> Path:
    """The handler file, found as the `handlers` package installed next to `tta`."""
    spec = importlib.util.find_spec("handlers.clip_tta_handler")
    if spec is None or spec.origin is None:
        raise TTAError("handlers/clip_tta_handler.py not found: run from the repository or install clip-tta")
    return Path(spec.origin)


def build_archive(args: argparse.Namespace) -> Path:
    """Stage handler + tta + labels + config, then call torch-model-archiver's Python API."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    method_defaults = _validate(args)
    labels = load_labels(args.labels_file) if args.labels_file else default_labels()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tta-archive-") as tmp:
        stage = Path(tmp) / "extra"
        shutil.copytree(PACKAGE, stage / "tta", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (stage / LABELS_NAME).write_text("\n".join(labels) + "\n", encoding="utf-8")
        if getattr(args, "onnx", False):
            from tta.models import load_model
            from tta.onnx_encoder import export_image_encoder

            export_image_encoder(load_model(args.model), stage / ONNX_NAME)
        config_path = Path(tmp) / "model-config.yaml"
        config_path.write_text(yaml.safe_dump(model_config(args, method_defaults), sort_keys=False), encoding="utf-8")
        config = ModelArchiverConfig(
            model_name=args.name, handler=str(handler_path()), version=args.version, extra_files=str(stage),
            export_path=str(out), archive_format=args.archive_format, force=args.force,
            config_file=str(config_path),
        )
        generate_model_archive(config)
    suffix = {"default": ".mar", "tgz": ".tar.gz", "no-archive": ""}[args.archive_format]
    return out / f"{args.name}{suffix}"


def run(args: argparse.Namespace) -> int:
    try:
        path = build_archive(args)
    except (TTAError, FileNotFoundError) as exc:
        print(f"tta: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # model-archiver raises its own error types
        if type(exc).__name__ != "ModelArchiverError":
            raise
        print(f"tta: error: {exc} (use -f to overwrite)", file=sys.stderr)
        return 2
    print(path)
    return 0
