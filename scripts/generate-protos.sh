#!/usr/bin/env bash
# Generates the Python code of proto/wlcad/v1/*.proto into services/api/_generated/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m services.api.codegen
