"""The `tta` command. Subcommands live in `tta/commands/<name>.py`, each exposing
`add_arguments(parser)` and `run(args) -> int`; add one by listing it in `SUBCOMMANDS`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS: dict[str, str] = {
    "predict": "classify images, adapting per image (zeroshot, tpt, zero, ...)",
    "methods": "list the registered adaptation methods",
    "serve": "serve over HTTP/gRPC: KServe's model server (OIP v2), or TorchServe via scripts/serve.sh",
    "fetch-weights": "put a model's hub weights into a cache folder once (pinned revision, checksum manifest)",
}
OPTIONAL_SUBCOMMANDS: dict[str, str] = {
    "archive": "build a TorchServe model archive (.mar) for a model + label set",
    "eval": "evaluate methods on a labelled image folder or a built-in set",
}
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tta", description="CLIP with test-time adaptation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, help_text in {**SUBCOMMANDS, **OPTIONAL_SUBCOMMANDS}.items():
        module_name = f"tta.commands.{name.replace('-', '_')}"  # fetch-weights -> fetch_weights.py
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name and name in OPTIONAL_SUBCOMMANDS:
                continue
            raise
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
