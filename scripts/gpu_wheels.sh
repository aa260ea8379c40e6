#!/usr/bin/env bash
# Wheels the GPU machines lack, for `make gpu-check` there (docs/gpu-check.md): they have Python 3.12
# with torch 2.11, torchvision 0.26, numpy, timm, transformers (so huggingface_hub, safetensors,
# regex, tqdm, pyyaml), scikit-image and pytest, and no network. What bench/gpu_check.py and the
# CUDA tests import beyond that: open_clip_torch and its ftfy/wcwidth, and pytest-timeout (the
# pytest config's `timeout` option). One version of each, no dependencies resolved (--no-deps):
# versions as in uv.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
mkdir -p "$DEST"  # .gitignore ignores /.whl/, so `run` can carry it

version() {  # the version uv.lock pins for package $1
    awk -v name="$1" '$0 == "name = \"" name "\"" {getline; gsub(/version = |"/, ""); print; exit}' uv.lock
}
for pkg in open-clip-torch ftfy wcwidth pytest-timeout; do
    ver=$(version "$pkg")
    [ -n "$ver" ] || { echo "no $pkg in uv.lock" >&2; exit 1; }
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$DEST" "$pkg==$ver"
done
ls -1 "$DEST"
du -sh "$DEST"
