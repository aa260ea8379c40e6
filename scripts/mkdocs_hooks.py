"""MkDocs hook (mkdocs.yml `hooks:`): publish bench/results/*.png with the site.

The benchmark plots are written by the benches next to their JSON under bench/results/; the
performance page shows them from there instead of keeping a second copy under docs/.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config) -> Files:
    for png in sorted((ROOT / "bench" / "results").glob("*.png")):
        files.append(File(png.relative_to(ROOT).as_posix(), str(ROOT), config["site_dir"],
                          config["use_directory_urls"]))
    return files
