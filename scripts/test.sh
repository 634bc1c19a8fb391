#!/usr/bin/env bash
# The test command (README; `.ci/run` runs exactly this): static checks, the import-layer
# contract, then the suite. Arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest "$@"
