"""`tta methods`: list the registry, so users see what `--method` accepts."""

from __future__ import annotations

import argparse
import json

from tta.methods.base import get_method_class, list_methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON with each method's default options")


def run(args: argparse.Namespace) -> int:
    for name in list_methods():
        cls = get_method_class(name)
        if args.json:
            print(json.dumps({"method": name, "scope": cls.scope, "defaults": cls.Options().to_dict()}))
        else:
            print(f"{name:10s} {cls.scope:9s} {cls.description}")
    return 0
