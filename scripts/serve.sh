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
#   WORKERS=1 BATCH_SIZE=4 MAX_BATCH_DELAY=50
#   ARCHIVE_ARGS=           extra `tta archive` flags, e.g. '--method-defaults {"tpt":{"n_views":32}}'
#   SKIP_SYNC=1             do not run `uv sync` (environment already installed)
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
MAX_BATCH_DELAY="${MAX_BATCH_DELAY:-50}"
VENV="${ROOT}/.venv/bin"

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

# KServe: the worker is built in-process from the same knobs; ARCHIVE_ARGS flags are shared
if [[ "${SERVER:-torchserve}" == "kserve" ]]; then
    label_args=()
    [[ -n "${LABELS_FILE:-}" ]] && label_args=(--labels-file "${LABELS_FILE}")
    say "starting KServe's model server (REST :${HTTP_PORT:-8080}, gRPC :${GRPC_PORT:-8081}; Ctrl-C to stop)"
    # shellcheck disable=SC2086  # ARCHIVE_ARGS is a list of flags on purpose
    exec "${VENV}/tta" serve --server kserve --model "${MODEL}" --name "${NAME}" --method "${METHOD}" \
        --templates "${TEMPLATES}" --batch-size "${BATCH_SIZE}" --max-batch-delay "${MAX_BATCH_DELAY}" \
        "${label_args[@]}" ${ARCHIVE_ARGS:-}
fi
command -v java >/dev/null 2>&1 || { say "java (17+) is required by TorchServe's frontend"; exit 1; }

# 3. archive
label_args=()
[[ -n "${LABELS_FILE:-}" ]] && label_args=(--labels-file "${LABELS_FILE}")
say "building model_store/${NAME}.mar"
# shellcheck disable=SC2086  # ARCHIVE_ARGS is a list of flags on purpose
"${VENV}/tta" archive --model "${MODEL}" --name "${NAME}" --method "${METHOD}" --templates "${TEMPLATES}" \
    --workers "${WORKERS}" --batch-size "${BATCH_SIZE}" --max-batch-delay "${MAX_BATCH_DELAY}" \
    --out model_store -f "${label_args[@]}" ${ARCHIVE_ARGS:-} >/dev/null

# 4. metrics: workers write prometheus-client files here; one of them serves the merged view on :8083
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-${ROOT}/.cache/prometheus}"
mkdir -p "${PROMETHEUS_MULTIPROC_DIR}"
rm -f "${PROMETHEUS_MULTIPROC_DIR}"/*.db

# 5. TorchServe in the foreground; Ctrl-C (or SIGTERM) stops it and its workers
stop() {
    trap - INT TERM
    say "stopping TorchServe"
    "${VENV}/torchserve" --stop --foreground >/dev/null 2>&1 || true
    [[ -n "${TS_PID:-}" ]] && wait "${TS_PID}" 2>/dev/null || true
    exit 0
}
trap stop INT TERM

say "starting TorchServe (key file: ${ROOT}/key_file.json; Ctrl-C to stop)"
"${VENV}/torchserve" --start --foreground --ncs --ts-config config.properties --model-store model_store \
    --models "${NAME}=${NAME}.mar" &
TS_PID=$!

# Tell the user when the model answers, and how to call it.
(
    for _ in $(seq 1 600); do
        sleep 1
        kill -0 "${TS_PID}" 2>/dev/null || exit 0
        [[ -f key_file.json ]] || continue
        KEY=$("${VENV}/python" -c 'import json;print(json.load(open("key_file.json"))["inference"]["key"])' 2>/dev/null) || continue
        MKEY=$("${VENV}/python" -c 'import json;print(json.load(open("key_file.json"))["management"]["key"])' 2>/dev/null) || continue
        if "${VENV}/python" - "${NAME}" "${MKEY}" <<'EOF' 2>/dev/null
import os, sys, requests
address = os.environ.get("TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081")
reply = requests.get(f"{address}/models/{sys.argv[1]}", headers={"Authorization": f"Bearer {sys.argv[2]}"}, timeout=2)
workers = [w for m in reply.json() for w in m.get("workers", [])] if reply.ok else []
sys.exit(0 if any(w.get("status") == "READY" for w in workers) else 1)
EOF
        then
            say "ready: curl -H \"Authorization: Bearer ${KEY}\" -T image.jpg ${TS_INFERENCE_ADDRESS:-http://127.0.0.1:8080}/predictions/${NAME}"
            exit 0
        fi
    done
) &

wait "${TS_PID}"
