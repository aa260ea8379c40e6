#!/usr/bin/env bash
# Screenshots of the built documentation site with headless Chromium (Debian: apt-get install chromium),
# at desktop (1280x900) and phone (390x844) widths, served on 127.0.0.1 only for the run.
#   bash scripts/docs_screenshots.sh [OUT_DIR] [name:path ...]
# Default pages: the home page, a method page and the monitoring page; docs/img/site-tpt.png (shown in
# the README) is OUT_DIR/tpt-desktop.png from `make docs-screenshots`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-site-shots}
shift || true
PAGES=("$@")
[ ${#PAGES[@]} -gt 0 ] || PAGES=("home:" "tpt:methods/tpt/" "monitoring:monitoring/")
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$CHROMIUM" ] || { echo "no chromium: apt-get install chromium" >&2; exit 1; }
mkdir -p "$OUT"
SITE=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -d "$SITE"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$PORT" --bind 127.0.0.1 -d "$SITE" >/dev/null 2>&1 &
SERVER=$!
trap 'kill "$SERVER"; rm -rf "$SITE"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 0.1; done
for page in "${PAGES[@]}"; do
  name=${page%%:*}; path=${page#*:}
  for size in desktop:1280,900 phone:390,844; do
    profile=$(mktemp -d)
    timeout 120 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
      --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
      --user-data-dir="$profile" --window-size="${size#*:}" --screenshot="$OUT/$name-${size%%:*}.png" \
      "http://127.0.0.1:$PORT/$path" >/dev/null 2>&1
    rm -rf "$profile"
    echo "wrote $OUT/$name-${size%%:*}.png"
  done
done
