"""Subcommands of the `tta` CLI (see tta/cli.py)."""
