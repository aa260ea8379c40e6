"""`tta serve --server kserve`: serve CLIP with test-time adaptation from KServe's model server.

Same deployment knobs as `tta archive` / scripts/serve.sh (model, labels, templates, default
method, method defaults, limits, state), no archive needed: the worker is built in this process.
Open Inference Protocol v2 over REST (``--http-port``) and gRPC (``--grpc-port``), v1
(``POST /v1/models/NAME:predict`` with the JSON form, state actions or a raw image), and
Prometheus metrics (KServe's and tta's) on ``GET /metrics`` of the HTTP port.
TorchServe is served by scripts/serve.sh (``--server torchserve`` runs it with these knobs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tta.errors import TTAError
from tta.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
TOKEN_ENV = "TTA_INFERENCE_TOKEN"
KSERVE_MAX_BATCH_DELAY_MS = 50  # what bench/results/batching.json measured for the KServe batcher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", choices=("kserve", "torchserve"), default="kserve",
                        help="kserve: this process serves OIP v2 REST+gRPC; torchserve: run scripts/serve.sh "
                             "(default: %(default)s)")
    parser.add_argument("--model", default=os.environ.get("MODEL", "tiny-random"),
                        help="CLIP spec: ARCH:TAG, ARCH:/path/ckpt, hf-hub:org/name, tiny-random "
                             "(default: env MODEL or %(default)s)")
    parser.add_argument("--name", default=os.environ.get("NAME", "clip"),
                        help="model name in the URLs: /v2/models/NAME (default: %(default)s)")
    parser.add_argument("--labels-file", default=os.environ.get("LABELS_FILE") or None,
                        help="class names, one per line or a JSON list (default: ImageNet's 1000)")
    parser.add_argument("--templates", default=os.environ.get("TEMPLATES", "single"),
                        help="'single' or 'imagenet' (CLIP's 80) (default: %(default)s)")
    parser.add_argument("--method", default=os.environ.get("METHOD", "zeroshot"),
                        help="default method for requests that name none (default: %(default)s)")
    parser.add_argument("--method-defaults", default="{}",
                        help='JSON {method: {option: value}}, e.g. \'{"tpt": {"n_views": 32}}\'')
    parser.add_argument("--version", default="1.0", help="model version (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when visible, else cpu)")
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8080)),
                        help="REST port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8081)),
                        help="gRPC port (default: %(default)s)")
    parser.add_argument("--no-grpc", action="store_true", help="serve REST only")
    parser.add_argument("--batch-size", type=int, default=int(os.environ.get("BATCH_SIZE", 4)),
                        help="requests run together at most (default: %(default)s)")
    parser.add_argument("--max-batch-delay", type=int,
                        default=int(os.environ["MAX_BATCH_DELAY"]) if os.environ.get("MAX_BATCH_DELAY") else None,
                        help="ms to fill a batch: KServe collects only while a batch runs (default 50); "
                             "TorchServe's frontend waits even when idle (default 10, scripts/serve.sh)")
    parser.add_argument("--max-inflight", type=int, default=int(os.environ.get("TTA_MAX_INFLIGHT") or 100),
                        help="requests queued or running at most; more get 503 + Retry-After (0: unbounded; "
                             "default: env TTA_MAX_INFLIGHT or %(default)s, TorchServe's job_queue_size)")
    parser.add_argument("--max-labels", type=int, default=1000, help="per-request label list limit")
    parser.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024,
                        help="larger request bodies get 413 (default: %(default)s, TorchServe's max_request_size)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="extra tta-only metrics exporter port (0: none; tta metrics are on the HTTP "
                             "port's /metrics anyway; env TTA_METRICS_PORT wins)")
    parser.add_argument("--state-url", help="Redis URL holding the stream-method state shared by every replica "
                                            "(redis://HOST:PORT/DB, rediss:// for TLS; env TTA_STATE_URL wins; put a "
                                            "password in TTA_STATE_PASSWORD rather than on the command line)")
    parser.add_argument("--state-dir", help="folder for stream-method state snapshots of a single process "
                                            "(default: env TTA_STATE_DIR)")
    parser.add_argument("--state-every", type=int, help="operations between state snapshots (default: 50 files, "
                                                        "1000 Redis)")
    parser.add_argument("--token-file", help=f"file holding the bearer token infer requests must send "
                                             f"(default: env {TOKEN_ENV}; none: no authentication)")
    parser.add_argument("--answers-max-entries", type=int, default=10_000,
                        help="answers each worker remembers for labels sent later by answer id (0: none; "
                             "docs/monitoring/labelled-answers.md) (default: %(default)s)")
    parser.add_argument("--answers-ttl", type=float, default=86_400.0,
                        help="seconds an answer stays labellable (default: %(default)s)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up prediction")


def deployment_config(args: argparse.Namespace) -> dict[str, Any]:
    """The `tta:` section an archive would carry, from the flags (validated like `tta archive`)."""
    from tta.commands.archive import check_method_flags

    method_defaults = check_method_flags(args)
    if args.max_batch_delay is None:
        args.max_batch_delay = KSERVE_MAX_BATCH_DELAY_MS
    if args.batch_size < 1 or args.max_batch_delay < 0 or args.max_inflight < 0:
        raise TTAError("--batch-size must be >= 1, --max-batch-delay >= 0 and --max-inflight >= 0")
    config: dict[str, Any] = {
        "model": args.model, "templates": args.templates, "default_method": args.method,
        "method_defaults": method_defaults, "max_labels": args.max_labels,
        "max_image_pixels": args.max_image_pixels, "max_image_bytes": args.max_image_bytes,
        "metrics_port": args.metrics_port, "warmup": not args.no_warmup, "device": args.device,
        "state_dir": args.state_dir, "state_url": args.state_url, "state_every": args.state_every,
        "answers_max_entries": args.answers_max_entries, "answers_ttl_s": args.answers_ttl,
    }
    if args.labels_file:
        config["labels_file"] = str(Path(args.labels_file).resolve())
    else:
        from tta.commands.archive import default_labels

        config["labels"] = list(default_labels())
    return config


def read_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise TTAError(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def run(args: argparse.Namespace) -> int:
    """Exit 2 on a bad flag or config, 1 when the server stopped because the model cannot load."""
    try:
        if args.server == "torchserve":
            return _torchserve(args)
        config, token = deployment_config(args), read_token(args)
    except (TTAError, OSError) as exc:
        print(f"tta: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _kserve(args, config, token)
    except TTAError as exc:
        print(f"tta: error: {exc}", file=sys.stderr)
        return 1


def _kserve(args: argparse.Namespace, config: dict[str, Any], token: str | None) -> int:
    # One process serves: prometheus-client must use in-process storage so KServe's /metrics
    # (the default registry) shows the tta instruments too.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    sys.argv = sys.argv[:1]  # `import kserve` parses sys.argv for its own flags
    try:
        import prometheus_client

        from tta.metrics import ServingMetrics
        from tta.serving.kserve_model import ClipTTAModel, serve
    except ModuleNotFoundError as exc:
        raise TTAError(f"{exc.name} is missing: install the kserve extra (uv sync --extra kserve, "
                       f"or pip install 'clip-tta[kserve]')") from exc
    metrics = ServingMetrics(registry=prometheus_client.REGISTRY)
    model = ClipTTAModel(args.name, config, model_version=args.version, metrics=metrics, token=token,
                         batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay,
                         max_inflight=args.max_inflight, max_request_bytes=args.max_request_bytes)
    log.warning("serving %s (%s) with KServe: REST :%d%s%s", args.name, args.model, args.http_port,
                "" if args.no_grpc else f", gRPC :{args.grpc_port}", ", bearer token required" if token else "")
    serve(model, args.http_port, args.grpc_port, grpc=not args.no_grpc)
    return 0


def _torchserve(args: argparse.Namespace) -> int:
    """scripts/serve.sh with these flags as its environment knobs (needs the repository checkout)."""
    script = REPO / "scripts" / "serve.sh"
    if not script.is_file():
        raise TTAError("--server torchserve runs scripts/serve.sh from a repository checkout; not found")
    env = {**os.environ, "MODEL": args.model, "NAME": args.name, "METHOD": args.method, "TEMPLATES": args.templates,
           "BATCH_SIZE": str(args.batch_size), "SKIP_SYNC": "1", "SERVER": "torchserve"}
    if args.max_batch_delay is not None:  # else serve.sh's TorchServe default
        env["MAX_BATCH_DELAY"] = str(args.max_batch_delay)
    if args.labels_file:
        env["LABELS_FILE"] = str(Path(args.labels_file).resolve())
    if args.method_defaults.strip() not in ("", "{}"):
        compact = json.dumps(json.loads(args.method_defaults), separators=(",", ":"))  # serve.sh splits on spaces
        env["ARCHIVE_ARGS"] = f"--method-defaults {compact}"
    return subprocess.call(["bash", str(script)], env=env)
