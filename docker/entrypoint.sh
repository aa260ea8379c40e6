#!/usr/bin/env bash
# Container entrypoint. No arguments: serve with scripts/serve.sh (same knobs: MODEL, NAME, METHOD,
# LABELS_FILE, TEMPLATES, WORKERS, BATCH_SIZE, MAX_BATCH_DELAY, ARCHIVE_ARGS, MODEL_STORE,
# TS_CONFIG, ARCHIVE_ONLY, SERVER), building $MODEL_STORE/$NAME.mar first when none is there
# (SERVER=kserve: KServe's model server, no archive). The
# environment is installed in the image, so nothing is synced. Arguments run as a command instead,
# e.g. `tta archive --help` or `bash`.
set -euo pipefail
if [[ $# -gt 0 ]]; then
    exec "$@"
fi
export SKIP_SYNC=1 KEEP_ARCHIVE="${KEEP_ARCHIVE:-1}"
exec /app/scripts/serve.sh
