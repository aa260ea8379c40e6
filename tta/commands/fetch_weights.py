"""`tta fetch-weights MODEL --to DIR`: put a model's hub weights into DIR once, checked, for every pod.

DIR becomes a Hugging Face hub cache (``models--org--name/{blobs,snapshots/<commit>,refs}``): pods
mount it read-only with ``HF_HUB_CACHE=DIR`` and ``HF_HUB_OFFLINE=1`` and never reach the hub.
The files are read at the pinned commit (`tta.models.HUB_REVISIONS`, ``--revision`` overrides),
checked against the hub's own content addresses (an LFS blob is named by its SHA-256, a small file
by its git blob SHA-1), and recorded in a checksum manifest ``DIR/tta-weights/<model>.json``.

  tta fetch-weights ViT-B-16:openai --to /weights              # download (the Kubernetes Job)
  tta fetch-weights ViT-B-16:openai --to /weights --from-cache ~/.cache/huggingface/hub   # air-gapped
  tta fetch-weights ViT-B-16:openai --to /weights --check      # pods: fail fast when it is missing

Exit status: 0 present and intact, 1 missing, incomplete or corrupt (the message says what to run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tta.errors import TTAError
from tta.models import HubWeights, hub_weights, resolve_hub_files

log = logging.getLogger(__name__)

MANIFEST_DIR = "tta-weights"
CHUNK = 8 * 1024 * 1024
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA1 = re.compile(r"^[0-9a-f]{40}$")


class CacheMissing(TTAError):
    """The model cache lacks the model, or holds it incomplete or altered."""

    code = "model_cache_missing"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="CLIP spec whose weights come from the hub: ARCH:TAG (e.g. ViT-B-16:openai) "
                                      "or hf-hub:org/name")
    parser.add_argument("--to", required=True, type=Path, help="the model cache (a Hugging Face hub cache folder; "
                                                               "pods read it with HF_HUB_CACHE=DIR)")
    parser.add_argument("--revision", help="hub commit to fetch (default: the one pinned in tta.models.HUB_REVISIONS, "
                                           "env TTA_HUB_REVISION; unpinned repositories: main, recorded as its commit)")
    parser.add_argument("--from-cache", type=Path, help="copy from this Hugging Face hub cache instead of "
                                                        "downloading (an air-gapped cluster, a developer's cache)")
    parser.add_argument("--check", action="store_true", help="only check DIR (manifest, files, sizes); "
                                                             "exit 1 with a clear message when the model is missing")
    parser.add_argument("--verify", action="store_true", help="with --check: hash every file again too")


def manifest_path(cache: Path, spec: str) -> Path:
    return cache / MANIFEST_DIR / (re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_") + ".json")


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_content_address(path: Path, sha256: str) -> None:
    """A hub cache names each blob by its content: SHA-256 (LFS files) or git's blob SHA-1."""
    blob = path.resolve().name
    if SHA256.match(blob) and blob != sha256:
        raise CacheMissing(f"{path} is corrupt: SHA-256 {sha256} but the hub's content address is {blob}")
    if SHA1.match(blob) and _git_blob_sha1(path) != blob:
        raise CacheMissing(f"{path} is corrupt: its git blob SHA-1 differs from the hub's content address {blob}")


def _snapshot(path: Path) -> tuple[Path, str]:
    """(repository folder, commit) of a file inside a hub cache's snapshots/<commit>/ folder."""
    parts = path.parts
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    return Path(*parts[:i]), parts[i + 1]


def _copy_into(cache: Path, source: Path) -> Path:
    """Copy one snapshot file (and its blob) from another hub cache into `cache`, same layout."""
    repo, commit = _snapshot(source)
    rel = source.relative_to(repo / "snapshots" / commit)
    blob = source.resolve()
    target_repo = cache / repo.name
    target_blob = target_repo / "blobs" / blob.name
    target_blob.parent.mkdir(parents=True, exist_ok=True)
    if not target_blob.is_file() or target_blob.stat().st_size != blob.stat().st_size:
        partial = target_blob.with_name(target_blob.name + ".incomplete")
        shutil.copyfile(blob, partial)
        os.replace(partial, target_blob)
    link = target_repo / "snapshots" / commit / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target_blob, link.parent))
    for ref in (repo / "refs").glob("*") if (repo / "refs").is_dir() else ():
        if ref.read_text(encoding="utf-8").strip() == commit:  # keep the branch names that point here
            (target_repo / "refs").mkdir(parents=True, exist_ok=True)
            (target_repo / "refs" / ref.name).write_text(commit, encoding="utf-8")
    return link


def _resolve(weights: HubWeights, cache: Path, source: Path | None) -> dict[str, Path]:
    from tta.models import _hub_offline

    if source is None:
        return resolve_hub_files(weights, cache)
    if not source.is_dir():
        raise CacheMissing(f"--from-cache {source} is not a folder")
    with _hub_offline(True):
        found = resolve_hub_files(weights, source)
    return {kind: _copy_into(cache, path) for kind, path in found.items()}


def _write_manifest(cache: Path, weights: HubWeights, files: dict[str, Path]) -> dict[str, Any]:
    import huggingface_hub

    commits = {_snapshot(path)[1] for path in files.values()}
    (commit,) = commits  # every file of one fetch comes from one snapshot
    if weights.revision and SHA1.match(weights.revision) and commit != weights.revision:
        raise CacheMissing(f"{weights.repo_id}: asked for commit {weights.revision}, got {commit}")
    entries = []
    for kind, path in sorted(files.items()):
        digest = _sha256(path)
        _check_content_address(path, digest)
        entries.append({"kind": kind, "name": path.name, "path": str(path.relative_to(cache)),
                        "bytes": path.stat().st_size, "sha256": digest})
    manifest = {"model": weights.spec, "repo_id": weights.repo_id, "revision": commit,
                "pinned": weights.revision, "files": entries,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "huggingface_hub": huggingface_hub.__version__}
    target = manifest_path(cache, weights.spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp", encoding="utf-8") as tmp:
        json.dump(manifest, tmp, indent=2)
    os.replace(tmp.name, target)  # atomic: a reader never sees half a manifest
    return manifest


def check(cache: Path, weights: HubWeights, verify: bool = False) -> dict[str, Any]:
    """The manifest of `weights` in `cache`, after checking its files; CacheMissing says what is wrong."""
    how = (f"fill it with `tta fetch-weights {weights.spec} --to {cache}` (Kubernetes: the clip-tta-fetch-weights "
           "Job; see its logs with `kubectl logs job/clip-tta-fetch-weights`)")
    path = manifest_path(cache, weights.spec)
    if not path.is_file():
        raise CacheMissing(f"the model cache {cache} lacks {weights.spec} (no manifest {path}): {how}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheMissing(f"the manifest {path} is unreadable ({exc}): {how}") from exc
    if weights.revision and manifest.get("revision") != weights.revision and manifest.get("pinned") != weights.revision:
        raise CacheMissing(f"the model cache {cache} holds {weights.spec} at revision {manifest.get('revision')}, "
                           f"but revision {weights.revision} is pinned: {how}")
    for entry in manifest.get("files", []):
        file = cache / entry["path"]
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise CacheMissing(f"the model cache {cache} is incomplete: {file} is missing or not "
                               f"{entry['bytes']} bytes: {how}")
        if verify and _sha256(file) != entry["sha256"]:
            raise CacheMissing(f"{file} does not match its manifest's SHA-256: {how}")
    if not manifest.get("files"):
        raise CacheMissing(f"the manifest {path} lists no files: {how}")
    return manifest


def run(args: argparse.Namespace) -> int:
    weights = hub_weights(args.model, revision=args.revision)
    if weights is None:
        print(json.dumps({"model": args.model, "status": "nothing to fetch (not a hub model)"}))
        return 0
    cache: Path = args.to
    try:
        if args.check:
            manifest = check(cache, weights, verify=args.verify)
            print(json.dumps({"model": weights.spec, "status": "present", "revision": manifest["revision"],
                              "cache": str(cache)}))
            return 0
        cache.mkdir(parents=True, exist_ok=True)
        try:
            manifest = check(cache, weights, verify=True)  # a re-run of the Job: nothing to download
            status = "already present"
        except CacheMissing:
            try:
                files = _resolve(weights, cache, args.from_cache)
            except FileNotFoundError as exc:
                where = f"the cache {args.from_cache}" if args.from_cache else "the hub"
                raise CacheMissing(f"cannot fetch {weights.spec} from {where}: {exc}") from exc
            manifest = _write_manifest(cache, weights, files)
            status = "fetched"
    except TTAError as exc:
        print(f"tta fetch-weights: error: {exc}", file=sys.stderr)
        return 1
    total = sum(f["bytes"] for f in manifest["files"])
    print(json.dumps({"model": weights.spec, "status": status, "repo_id": weights.repo_id,
                      "revision": manifest["revision"], "bytes": total, "cache": str(cache),
                      "manifest": str(manifest_path(cache, weights.spec))}))
    return 0
