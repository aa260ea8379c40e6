"""The README's promise: short, its test command is what CI runs, the serve command exists, its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _opening_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "README must open with a bash block holding the two commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_serve_and_test_commands_and_ci_runs_the_test_one():
    serve, test = _opening_commands()[:2]
    assert "scripts/serve.sh" in serve and (ROOT / "scripts" / "serve.sh").is_file()
    assert "pytest" in test
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


def test_readme_fits_on_two_screens():
    assert len(README.splitlines()) <= 150, "the README is the front page; details belong in docs/"


def test_readme_links_point_at_files_that_exist():
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, "the README links into the site"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
