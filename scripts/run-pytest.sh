#!/usr/bin/env bash
# Runs the test suite and refuses to pass when pytest collected nothing (exit 5) or skipped a
# test because a dependency or data file was missing: a green run must mean tests really ran.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run-pytest: pytest collected no tests — failing on purpose" >&2
  exit 1
fi
exit "$rc"
