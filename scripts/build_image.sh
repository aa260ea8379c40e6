#!/usr/bin/env bash
# Build the clip-tta image from the Dockerfile without a Docker engine (`make image`).
#
#   bash scripts/build_image.sh                     # -> localhost/clip-tta:<version>
#   IMAGE=registry.example.com/ml/clip-tta:0.1.0 bash scripts/build_image.sh && buildah push ...
#
# Uses buildah (`buildah bud --isolation chroot`, vfs storage: works unprivileged of an engine, in
# containers and sandboxes) and, unless BASE_IMAGE is given, a local Debian bookworm base made by
# mmdebstrap that stands in for python:3.11-slim-bookworm (Python 3.11, venv, CA certificates).
# With Docker instead: `docker build -t clip-tta:0.1.0 .` (the Dockerfile's default base).
#
# Knobs: IMAGE, BASE_IMAGE, UV_SYNC_ARGS (default "--extra kserve"; add "--extra gpu"), DEBIAN_MIRROR,
#        CA_BUNDLE (host CA bundle trusted while downloading; default the system's),
#        UV_CACHE (host uv cache reused by the build; default `uv cache dir`, "" to disable).
set -euo pipefail
cd "$(dirname "$0")/.."

export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
IMAGE="${IMAGE:-localhost/clip-tta:${VERSION}}"
LOCAL_BASE="localhost/clip-tta-base:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
say() { printf 'build_image: %s\n' "$*" >&2; }

command -v buildah >/dev/null || { say "buildah is required (apt-get install buildah)"; exit 1; }
start=$(date +%s)

if [[ -z "${BASE_IMAGE:-}" ]]; then
    BASE_IMAGE="${LOCAL_BASE}"
    if ! buildah inspect --type image "${LOCAL_BASE}" >/dev/null 2>&1; then
        command -v mmdebstrap >/dev/null || { say "mmdebstrap is required for the local base (or set BASE_IMAGE)"; exit 1; }
        tmp="$(mktemp -d)"
        trap 'rm -rf "${tmp}"' EXIT
        say "making the Debian base with mmdebstrap"
        mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
            --aptopt='APT::Install-Recommends "false"' bookworm "${tmp}/base.tar" "${DEBIAN_MIRROR}"
        ctr="$(buildah from scratch)"
        buildah add "${ctr}" "${tmp}/base.tar" / >/dev/null
        buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            --env LANG=C.UTF-8 --cmd python3 "${ctr}"
        buildah commit --quiet --rm "${ctr}" "${LOCAL_BASE}" >/dev/null
        rm -rf "${tmp}"
    fi
fi

args=(--isolation chroot --layers=false -f Dockerfile -t "${IMAGE}" --build-arg "BASE_IMAGE=${BASE_IMAGE}")
[[ -n "${UV_SYNC_ARGS:-}" ]] && args+=(--build-arg "UV_SYNC_ARGS=${UV_SYNC_ARGS}")
if [[ -f "${CA_BUNDLE}" ]]; then
    args+=(--volume "${CA_BUNDLE}:/run/build-ca.crt:ro" --build-arg CA_BUNDLE=/run/build-ca.crt)
fi
UV_CACHE="${UV_CACHE-$(uv cache dir 2>/dev/null || true)}"
if [[ -n "${UV_CACHE}" && -d "${UV_CACHE}" ]]; then
    args+=(--volume "${UV_CACHE}:/run/uv-cache" --build-arg UV_CACHE_DIR=/run/uv-cache)
fi

say "building ${IMAGE} on ${BASE_IMAGE}"
buildah bud "${args[@]}" .
size="$(buildah images --format '{{.Size}}' "${IMAGE}" | head -1)"
say "built ${IMAGE} (${size}) in $(( $(date +%s) - start )) s"
