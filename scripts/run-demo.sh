#!/usr/bin/env bash
# The main job (`make run`): start `wlcad serve all` (gateway + label-estimation service, embedded
# backend unless arguments say otherwise), wait until the gateway is ready, run `wlcad demo` against
# it, then stop the servers. Server logs go to out/serve.log.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p out
"$BIN/wlcad" serve all "$@" >out/serve.log 2>&1 &
server=$!
stop() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
trap stop EXIT
ready=0
for _ in $(seq 1 240); do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "run-demo: wlcad serve all exited; its log:" >&2
    tail -20 out/serve.log >&2
    exit 1
  fi
  if "$BIN/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=1)" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.5
done
if [ "$ready" -ne 1 ]; then
  echo "run-demo: the gateway was not ready within 120 s; see out/serve.log" >&2
  exit 1
fi
"$BIN/wlcad" demo --out out
