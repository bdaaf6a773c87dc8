#!/usr/bin/env bash
# The main job (`make run`): start `wlcad serve all` (gateway + label-estimation service, embedded
# backend unless arguments say otherwise), wait until the gateway is ready, run `wlcad demo` against
# it, then stop the servers. Server logs go to out/serve.log; overlay PNGs to out/**/overlay.png and
# out/<sample>/overview.png.
#
# Addresses default to the documented ones; when another program holds one of them, set
#   WLCAD_DEMO_GRPC=127.0.0.1:50151 WLCAD_DEMO_HTTP=127.0.0.1:8180 WLCAD_DEMO_SERVICE=127.0.0.1:50161
# (the script refuses busy ports up front instead of failing half-way with a bind error in the log).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
GRPC=${WLCAD_DEMO_GRPC:-127.0.0.1:50051}
HTTP=${WLCAD_DEMO_HTTP:-127.0.0.1:8080}
SERVICE=${WLCAD_DEMO_SERVICE:-127.0.0.1:50061}
mkdir -p out
for address in "$GRPC" "$HTTP" "$SERVICE"; do
  if ! "$BIN/python" - "$address" <<'EOF'
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.socket() as probe:
    try:
        probe.bind((host, int(port)))
    except OSError:
        sys.exit(1)
EOF
  then
    echo "run-demo: $address is in use; free it or choose others with WLCAD_DEMO_GRPC / WLCAD_DEMO_HTTP /" \
      "WLCAD_DEMO_SERVICE (see the top of scripts/run-demo.sh)" >&2
    exit 1
  fi
done
"$BIN/wlcad" serve all --grpc-listen "$GRPC" --http-listen "$HTTP" \
  --service-listen "label-estimation=$SERVICE" "$@" >out/serve.log 2>&1 &
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
  if "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
    "http://$HTTP/readyz" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.5
done
if [ "$ready" -ne 1 ]; then
  echo "run-demo: the gateway was not ready within 120 s; see out/serve.log" >&2
  exit 1
fi
"$BIN/wlcad" demo --out out --address "$GRPC" --http "http://$HTTP"
