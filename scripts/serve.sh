#!/usr/bin/env bash
# Install, build the model archive and run TorchServe in the foreground (Ctrl-C stops it).
#
#   bash scripts/serve.sh                      # ViT-B-16 OpenAI weights, ImageNet's 1000 classes
#   MODEL=tiny-random bash scripts/serve.sh    # offline: tiny random CLIP, no download
#
# Environment knobs (all optional):
#   MODEL=ViT-B-16:openai   CLIP spec (ARCH:TAG, ARCH:/path/ckpt, hf-hub:org/name, tiny-random)
#   NAME=clip               model name in the URL: POST /predictions/$NAME
#   METHOD=zeroshot         default method for requests that name none (tpt, zero, tda, ...)
#   LABELS_FILE=            class names, one per line (default: ImageNet-1k)
#   TEMPLATES=single        'single' or 'imagenet' (CLIP's 80 prompts)
#   WORKERS=1 BATCH_SIZE=4 MAX_BATCH_DELAY=10 (TorchServe; 50 for SERVER=kserve; docs/oip.md "Benchmark")
#   ARCHIVE_ARGS=           extra `tta archive` flags, e.g. '--method-defaults {"tpt":{"n_views":32}}'
#   SKIP_SYNC=1             do not run `uv sync` (environment already installed)
#   TS_CONFIG=config.properties   TorchServe configuration file
#   MODEL_STORE=model_store       folder of the archive
#   KEEP_ARCHIVE=1          serve an existing $MODEL_STORE/$NAME.mar as it is (build only when missing)
#   ARCHIVE_ONLY=1          fetch the weights and build the archive, then exit (an init container)
#   DRAIN_TIMEOUT_S=30      on Ctrl-C/SIGTERM, wait this long for in-flight requests before stopping
#   WEIGHTS_DIR=            a model cache filled by `tta fetch-weights` (Kubernetes: the weights Job):
#                           checked first, so a pod whose cache lacks MODEL stops in seconds, saying so
#   RUN_DIR=.               TorchServe's working directory (logs/, key_file.json); a writable path
#                           when the root file system is read-only (the pods: /tmp/ts)
# The container image runs this script (docker/entrypoint.sh) with SKIP_SYNC=1 KEEP_ARCHIVE=1.
#   SERVER=torchserve       or 'kserve': KServe's model server (`tta serve --server kserve`, OIP v2
#                           REST on HTTP_PORT=8080 and gRPC on GRPC_PORT=8081; no archive, no Java)
# Ports come from config.properties (8080 inference, 8081 management, 8082 TorchServe metrics) and
# 8083 for the tta metrics exporter; override with TS_INFERENCE_ADDRESS=..., TTA_METRICS_PORT=...
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
MODEL="${MODEL:-ViT-B-16:openai}"
NAME="${NAME:-clip}"
METHOD="${METHOD:-zeroshot}"
TEMPLATES="${TEMPLATES:-single}"
WORKERS="${WORKERS:-1}"
BATCH_SIZE="${BATCH_SIZE:-4}"
# TorchServe's frontend waits this long even when idle: 10 ms measured no slower than 50 anywhere and
# cheaper at low load (bench/results/batching.json); the KServe batcher waits only while busy.
if [[ "${SERVER:-torchserve}" == "kserve" ]]; then MAX_BATCH_DELAY="${MAX_BATCH_DELAY:-50}"; fi
MAX_BATCH_DELAY="${MAX_BATCH_DELAY:-10}"
MODEL_STORE="${MODEL_STORE:-model_store}"
export TS_CONFIG="${TS_CONFIG:-config.properties}"  # docker/probe.py reads the management address from it
VENV="${ROOT}/.venv/bin"
ARCHIVE="${MODEL_STORE}/${NAME}.mar"

say() { printf 'serve: %s\n' "$*" >&2; }

# 1. install
if [[ "${SKIP_SYNC:-0}" != "1" ]]; then
    if ! command -v uv >/dev/null 2>&1; then
        say "installing uv (python3 -m pip install uv)"
        python3 -m pip install --quiet uv || { say "could not install uv; set SKIP_SYNC=1 with .venv ready"; exit 1; }
    fi
    say "installing the environment (uv sync)"
    uv sync --frozen
fi

label_args=()
[[ -n "${LABELS_FILE:-}" ]] && label_args=(--labels-file "${LABELS_FILE}")

# the model cache (read-only in the pods): present, complete, at the pinned revision?
if [[ -n "${WEIGHTS_DIR:-}" ]]; then
    "${VENV}/tta" fetch-weights "${MODEL}" --to "${WEIGHTS_DIR}" --check >/dev/null \
        || { say "stopping: ${WEIGHTS_DIR} does not hold ${MODEL} (see the error above)"; exit 1; }
fi

# KServe: the worker is built in-process from the same knobs; ARCHIVE_ARGS flags are shared
if [[ "${SERVER:-torchserve}" == "kserve" ]]; then
    say "starting KServe's model server (REST :${HTTP_PORT:-8080}, gRPC :${GRPC_PORT:-8081}; Ctrl-C to stop)"
    # shellcheck disable=SC2086  # ARCHIVE_ARGS is a list of flags on purpose
    exec "${VENV}/tta" serve --server kserve --model "${MODEL}" --name "${NAME}" --method "${METHOD}" \
        --templates "${TEMPLATES}" --batch-size "${BATCH_SIZE}" --max-batch-delay "${MAX_BATCH_DELAY}" \
        "${label_args[@]}" ${ARCHIVE_ARGS:-}
fi

build_archive() {
# 2. weights must be loadable before TorchServe starts (fails in seconds when offline without a cache)
say "checking that ${MODEL} can be loaded"
if ! "${VENV}/python" - "${MODEL}" <<'EOF'
import logging, sys
from tta.errors import TTAError
from tta.models import load_model
logging.basicConfig(level=logging.WARNING)
try:
    load_model(sys.argv[1])
except TTAError as exc:
    print(f"serve: error: {exc}", file=sys.stderr)
    sys.exit(1)
EOF
then
    say "stopping: the model cannot be loaded (no network and no cached weights?). Offline: MODEL=tiny-random bash scripts/serve.sh"
    exit 1
fi

command -v java >/dev/null 2>&1 || { say "java (17+) is required by TorchServe's frontend"; exit 1; }

# 3. archive
say "building ${ARCHIVE}"
mkdir -p "${MODEL_STORE}"
# shellcheck disable=SC2086  # ARCHIVE_ARGS is a list of flags on purpose
"${VENV}/tta" archive --model "${MODEL}" --name "${NAME}" --method "${METHOD}" --templates "${TEMPLATES}" \
    --workers "${WORKERS}" --batch-size "${BATCH_SIZE}" --max-batch-delay "${MAX_BATCH_DELAY}" \
    --out "${MODEL_STORE}" -f "${label_args[@]}" ${ARCHIVE_ARGS:-} >/dev/null
}

if [[ "${KEEP_ARCHIVE:-0}" == "1" && -e "${ARCHIVE}" ]]; then
    say "serving the existing ${ARCHIVE} (KEEP_ARCHIVE=1)"
else
    build_archive
fi
if [[ "${ARCHIVE_ONLY:-0}" == "1" ]]; then
    say "archive ready: ${ARCHIVE}"
    exit 0
fi

# 4. metrics: workers write prometheus-client files here; one of them serves the merged view on :8083
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-${ROOT}/.cache/prometheus}"
mkdir -p "${PROMETHEUS_MULTIPROC_DIR}"
rm -f "${PROMETHEUS_MULTIPROC_DIR}"/*.db

# TorchServe writes logs/ and key_file.json into its working directory: RUN_DIR (relative paths
# given so far are the repository's, made absolute first)
RUN_DIR="${RUN_DIR:-${ROOT}}"
MODEL_STORE="$(cd "${MODEL_STORE}" && pwd)"
TS_CONFIG="$(cd "$(dirname "${TS_CONFIG}")" && pwd)/$(basename "${TS_CONFIG}")"
export TS_CONFIG KEY_FILE="${KEY_FILE:-${RUN_DIR}/key_file.json}"  # docker/probe.py reads both
mkdir -p "${RUN_DIR}"
cd "${RUN_DIR}"

# 5. TorchServe in the foreground; Ctrl-C (or SIGTERM) drains in-flight requests, then stops it
stop() {
    trap - INT TERM
    say "draining (up to ${DRAIN_TIMEOUT_S:-30} s), then stopping TorchServe"
    "${VENV}/python" -I "${ROOT}/docker/probe.py" drain --model "${NAME}" --delay 0 --timeout "${DRAIN_TIMEOUT_S:-30}" || true
    "${VENV}/torchserve" --stop --foreground >/dev/null 2>&1 || true
    [[ -n "${TS_PID:-}" ]] && wait "${TS_PID}" 2>/dev/null || true
    exit 0
}
trap stop INT TERM

say "starting TorchServe (key file: ${KEY_FILE}; Ctrl-C to stop)"
"${VENV}/torchserve" --start --foreground --ncs --ts-config "${TS_CONFIG}" --model-store "${MODEL_STORE}" \
    --models "${NAME}=${NAME}.mar" &
TS_PID=$!

# Tell the user when the model answers (a worker READY, not just the frontend up), and how to call it.
(
    for _ in $(seq 1 900); do
        sleep 1
        kill -0 "${TS_PID}" 2>/dev/null || exit 0
        if "${VENV}/python" -I "${ROOT}/docker/probe.py" ready --model "${NAME}" 2>/dev/null; then
            auth=""
            KEY=$("${VENV}/python" -c 'import json,os;print(json.load(open(os.environ["KEY_FILE"]))["inference"]["key"])' 2>/dev/null) \
                && auth="-H \"Authorization: Bearer ${KEY}\" "
            say "ready: curl ${auth}-T image.jpg ${TS_INFERENCE_ADDRESS:-http://127.0.0.1:8080}/predictions/${NAME}"
            exit 0
        fi
    done
) &

wait "${TS_PID}"
