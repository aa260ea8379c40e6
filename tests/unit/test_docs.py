"""The documentation site: generated pages match the code, the site builds strictly (links and
anchors checked), and every ```bash block names only commands and flags that exist."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MKDOCS_ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
# Commands of other tools that the docs may name; anything else must be this repository's.
EXTERNAL = {
    "apt-get", "base64", "buildah", "cat", "cd", "curl", "docker", "echo", "export", "git", "grep", "helm",
    "jq", "kill", "kubectl", "kustomize", "ls", "mkdir", "mmdebstrap", "nvidia-smi", "prometheus", "promtool",
    "redis-cli", "redis-server", "sleep", "sudo", "tar", "torchserve", "pip", "unzip", "perf_analyzer", "exit", "set", "tee",
}
EXTERNAL_MODULES = {"pip", "venv"}  # `python3 -m pip install uv`: the system interpreter's pip
UV_RUN_FLAGS_WITH_VALUE = {"--extra", "--group", "--with"}


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_match_the_code(gen) -> None:
    stale = [str(p.relative_to(ROOT)) for p in gen.stale()]
    assert not stale, f"generated docs differ from the code: {stale}; run `make docs-gen`"


def test_a_changed_source_makes_its_page_stale(gen, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("before\n<!-- generated:options:zeroshot -->\nhand-edited\n<!-- /generated -->\nafter\n")
    filled = gen.fill(page.read_text(), {})
    assert "hand-edited" not in filled and filled.startswith("before\n") and filled.endswith("after\n")
    with pytest.raises(KeyError, match="unknown generated region"):
        gen.fill("<!-- generated:no-such-thing -->\n<!-- /generated -->\n", {})


def test_every_registered_method_is_in_the_options_reference(gen) -> None:
    from tta.methods import list_methods

    page = (ROOT / "docs" / "reference" / "methods.md").read_text()
    for name in list_methods():
        assert f"\n## {name}\n" in page, name


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # never -q: mkdocs counts strict-mode warnings only at the default log level (with -q it passes)
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "-d", str(site)], capture_output=True, text=True, timeout=300, env=MKDOCS_ENV, cwd=ROOT)


def test_site_builds_strictly(tmp_path: Path) -> None:
    out = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "methods" / "tpt" / "index.html").is_file()


def test_strict_build_fails_on_a_broken_anchor(tmp_path: Path) -> None:
    """The site's own validation settings, on a two-page site with a link to a missing heading."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().split("\nhooks:")[0])
    assert config["strict"] is True and config["validation"]["links"]["anchors"] == "warn"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[ok](other.md#there) [broken](other.md#nowhere)\n")
    (docs / "other.md").write_text("# Other\n\n## There\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump({
        "site_name": "t", "docs_dir": str(docs), "strict": True, "validation": config["validation"],
        "markdown_extensions": ["toc"]}))
    out = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert out.returncode != 0 and "nowhere" in out.stdout + out.stderr


# --- bash blocks -------------------------------------------------------------------------------
def bash_commands(text: str) -> list[list[str]]:
    """Simple commands of every ```bash block: continuations joined, comments dropped, split on
    ; && || | & and ( ), environment assignments in front removed."""
    commands = []
    for block in re.findall(r"^\s*```bash\n(.*?)^\s*```", text, re.S | re.M):
        pending = ""
        for line in textwrap.dedent(block).replace("\\\n", " ").splitlines():
            pending += line
            lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            try:
                tokens = [*lexer, ";"]
            except ValueError:  # a quoted argument continues on the next line
                pending += "\n"
                continue
            pending = ""
            words: list[str] = []
            redirect_target = False
            for token in tokens:
                if redirect_target:  # the file or fd after > >> < >& &>: not a word of the command
                    redirect_target = False
                    continue
                if token in (">", ">>", "<", ">&", "&>", "&>>", "<&"):
                    if words and words[-1].isdigit():  # the fd before it (2>&1)
                        words.pop()
                    redirect_target = True
                    continue
                if token and set(token) <= set("();<>|&"):
                    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                        words.pop(0)
                    if words:
                        commands.append(words)
                    words = []
                else:
                    words.append(token)
        assert not pending, f"unterminated quote in a bash block: {pending[:80]}"
    return commands


def _flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("-") and w != "-"]


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", (ROOT / "Makefile").read_text(), re.M))


def _module_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def _check_uv(rest: list[str], parsers: tuple) -> str | None:
    if rest[:1] != ["run"]:
        return None  # uv sync / lock / add: uv's own commands
    rest = rest[1:]
    while rest and rest[0].startswith("-"):
        rest = rest[2:] if rest[0] in UV_RUN_FLAGS_WITH_VALUE else rest[1:]
    return check_command(rest, parsers) if rest else "`uv run` with no command"


def _check_tta(rest: list[str], parsers: tuple) -> str | None:
    top, subs = parsers
    if not rest or rest[0] not in subs:
        return f"`tta {rest[0] if rest else ''}` is not a subcommand (have: {', '.join(subs)})"
    known = {o for a in [*subs[rest[0]]._actions, *top._actions] for o in a.option_strings}
    missing = [f for f in _flags(rest[1:]) if f not in known]
    return f"`tta {rest[0]}` has no {missing}" if missing else None


def _check_make(rest: list[str], parsers: tuple) -> str | None:
    missing = [t for t in rest if not t.startswith("-") and "=" not in t and t not in _make_targets()]
    return f"the Makefile has no target {missing}" if missing else None


def _check_bash(rest: list[str], parsers: tuple) -> str | None:
    script = ROOT / rest[0]
    if not script.is_file():
        return f"no script {rest[0]}"
    missing = [f for f in _flags(rest[1:]) if f not in script.read_text()]
    return f"{rest[0]} takes no {missing}" if missing else None


def _check_python(rest: list[str], parsers: tuple) -> str | None:
    if rest[:1] == ["-c"]:
        return None
    if rest[:1] != ["-m"]:
        return None if (ROOT / rest[0]).is_file() else f"no script {rest[0]}"
    module = rest[1]
    path = _module_file(module)
    if path is None:
        found = module in EXTERNAL_MODULES or importlib.util.find_spec(module.split(".")[0]) is not None
        return None if found else f"no module {module}"
    missing = [f for f in _flags(rest[2:]) if f'"{f}"' not in path.read_text()]
    return f"python -m {module} takes no {missing}" if missing else None


def _check_pytest(rest: list[str], parsers: tuple) -> str | None:
    missing = [w for w in rest if w.startswith("tests/") and not (ROOT / w.split("::")[0]).exists()]
    return f"no test path {missing}" if missing else None


CHECKS = {"uv": _check_uv, "tta": _check_tta, ".venv/bin/tta": _check_tta, "make": _check_make, "bash": _check_bash,
          "python": _check_python, "python3": _check_python, ".venv/bin/python": _check_python,
          "pytest": _check_pytest, ".venv/bin/pytest": _check_pytest}


def check_command(words: list[str], parsers: tuple) -> str | None:
    """None when the command and its flags exist, else why not."""
    head, rest = words[0], words[1:]
    if head in CHECKS:
        return CHECKS[head](rest, parsers)
    if head in EXTERNAL:
        return None
    return f"unknown command `{head}` (not this repository's and not in the test's list of external tools)"


def test_bash_blocks_name_only_commands_and_flags_that_exist(gen) -> None:
    parsers = gen.cli_parsers()
    problems, checked = [], 0
    for path in DOC_FILES:
        for words in bash_commands(path.read_text()):
            checked += 1
            why = check_command(words, parsers)
            if why:
                problems.append(f"{path.relative_to(ROOT)}: {' '.join(words)[:100]}: {why}")
    assert not problems, "\n".join(problems)
    assert checked > 30, f"only {checked} commands found in the docs' bash blocks: is the parser broken?"


def test_the_command_checker_can_fail(gen) -> None:
    parsers = gen.cli_parsers()
    bad = bash_commands("```bash\nuv run tta predict x.jpg --no-such-flag\nmake no-such-target\n"
                        "FOO=1 bash scripts/nope.sh # c\npython -m bench.run --nope && frobnicate\n```\n")
    assert [check_command(w, parsers) is not None for w in bad] == [True, True, True, True, True]
    good = bash_commands("```bash\nuv run --frozen tta predict x.jpg --method tpt --option n_views=8\n"
                         "REQUESTS=5 make soak\npython -m bench.run --markdown r.json\n```\n")
    assert [check_command(w, parsers) for w in good] == [None, None, None]
