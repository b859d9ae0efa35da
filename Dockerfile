# syntax=docker/dockerfile:1
# polyreward serving images (README "Deploy").
#   docker build -t polyreward:gpu .              GPU: CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu (the default)
#   docker build -t polyreward:cpu --target cpu .  CPU: onnxruntime
# Both are torch-free: torch lives only in the builder stage, which exports the shipped default model into
# /models/polyreward-default. Mount your own artifacts over /models (one artifact, or a directory of them).
# Every `polyreward serve` setting is a POLYREWARD_* environment variable (README "Configuration").

ARG OS_IMAGE=ubuntu:24.04
# onnxruntime-gpu 1.31 on PyPI is built for CUDA 13 and cuDNN 9; change the two together.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG ORT_VERSION=1.31.1

# ---- builder: torch (CPU wheel), exports the default artifact, builds the polyreward wheel ----------------
FROM ${OS_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build
ENV PATH=/opt/build/bin:$PATH
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models/ models/
COPY training/ training/
COPY service/ service/
COPY rescore/ rescore/
# hadolint ignore=DL3013
RUN pip install ".[train,cpu]" && pip wheel --no-deps --wheel-dir /wheels .
# fp32 and int8 for CPUs, fp16 for GPUs; `serve --precision auto` picks per device.
ARG PRECISIONS=fp32,int8,fp16
RUN polyreward export --default --precision "${PRECISIONS}" --out /artifacts/polyreward-default

# ---- serving environments: the wheel with the `serve` extra, one onnxruntime each ------------------------
FROM ${OS_IMAGE} AS venv
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /wheels /wheels
RUN python3 -m venv /opt/polyreward \
    && /opt/polyreward/bin/pip install "$(echo /wheels/polyreward-*.whl)[serve]"

FROM venv AS venv-cpu
ARG ORT_VERSION
RUN /opt/polyreward/bin/pip install "onnxruntime==${ORT_VERSION}" && /opt/polyreward/bin/pip uninstall -y pip

FROM venv AS venv-gpu
ARG ORT_VERSION
RUN /opt/polyreward/bin/pip install "onnxruntime-gpu==${ORT_VERSION}" && /opt/polyreward/bin/pip uninstall -y pip

# ---- cpu: `docker build --target cpu` ------------------------------------------------------------------
FROM ${OS_IMAGE} AS cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin polyreward
COPY --from=venv-cpu /opt/polyreward /opt/polyreward
COPY --from=builder /artifacts /models
# Numeric USER: Kubernetes' runAsNonRoot can only verify a numeric one.
USER 10001:10001
ENV PATH=/opt/polyreward/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp HF_HUB_OFFLINE=1 \
    POLYREWARD_HOST=0.0.0.0 POLYREWARD_PORT=8000 POLYREWARD_ARTIFACTS=/models
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ['POLYREWARD_PORT'], timeout=2)"]
ENTRYPOINT ["polyreward", "serve"]

# ---- gpu (the default target) ----------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin polyreward
COPY --from=venv-gpu /opt/polyreward /opt/polyreward
COPY --from=builder /artifacts /models
USER 10001:10001
ENV PATH=/opt/polyreward/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp HF_HUB_OFFLINE=1 \
    POLYREWARD_HOST=0.0.0.0 POLYREWARD_PORT=8000 POLYREWARD_ARTIFACTS=/models
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ['POLYREWARD_PORT'], timeout=2)"]
ENTRYPOINT ["polyreward", "serve"]
