"""`tta predict IMAGE... --model M --labels a,b,c --method tpt`: one JSON object per image."""

from __future__ import annotations

import argparse
import json
import sys

from tta.engine import Engine
from tta.errors import TTAError
from tta.images import load_image_file
from tta.models import load_model, resolve_device
from tta.text import LabelSet, load_labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...)")
    parser.add_argument("--model", default="tiny-random",
                        help="ARCH:TAG, ARCH:/path/ckpt, hf-hub:org/name, tiny-random, ARCH-random (default: %(default)s)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--labels", help="comma-separated class names")
    group.add_argument("--labels-file", help="file with one class name per line, or a JSON list")
    parser.add_argument("--templates", default="single", help="'single', 'imagenet' (CLIP's 80) (default: %(default)s)")
    parser.add_argument("--method", default="zeroshot", help="adaptation method (see `tta methods`)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="override a method option, e.g. --option n_views=32 (repeatable)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed for the random views (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: %(default)s)")


def parse_option_pairs(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE strings -> dict; values are parsed as JSON when they can be (numbers, booleans)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TTAError(f"--option expects KEY=VALUE, got '{pair}'")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _fail(message: str) -> int:
    print(f"tta: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        from tta.methods.base import get_method_class

        names = load_labels(args.labels_file) if args.labels_file else load_labels(args.labels)
        labels = LabelSet.create(names, templates=args.templates)
        options = parse_option_pairs(args.option)
        # fail on an unknown method or a bad option before loading any weights
        get_method_class(args.method).Options.from_dict(options)
        device = resolve_device(args.device)
        images = [(path, load_image_file(path)) for path in args.images]
        # the CLI user is the deployer: --option sets method defaults, including deployment-only
        # settings (generator, reward_model) that per-request overrides may not touch
        engine = Engine(load_model(args.model, device=device), labels, default_method=args.method,
                        method_defaults={args.method: options})
        for path, image in images:
            prediction = engine.predict(image, top_k=args.top_k, seed=args.seed)
            print(json.dumps({"image": path, **prediction.to_dict()}), flush=True)
    except TTAError as exc:
        return _fail(str(exc))
    return 0
