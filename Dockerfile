# gemb-dist runtime image: the same image runs the Ray head, the Ray workers, the job drivers and the MLflow server.
#
#   GPU (default):  docker build -t gemb-dist:0.1.0-cu128 .
#   CPU (smoke):    docker build -t gemb-dist:0.1.0-cpu --build-arg VARIANT=cpu --build-arg BASE_IMAGE=ubuntu:22.04 .
#
# Versions below must equal the pins in pyproject.toml (tests/test_deploy.py checks this).
# The image holds no credentials: S3, MLflow and Ray-token secrets reach containers at run time only.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${BASE_IMAGE}

ARG VARIANT=gpu
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8
ARG FLASH_ATTN_VERSION=2.8.3.post2
# Wheel index of torch: cu128 matches the CUDA 12.8 base; the CPU variant uses the CPU wheels.
ARG TORCH_CUDA=cu128
# No GPU is visible at build time, so the kernels are compiled for these architectures (A100, L4/L40, H100).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"
ARG MAX_JOBS=8

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 from the deadsnakes archive (Ubuntu 22.04 ships 3.10); wget serves KubeRay's health probes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gnupg ca-certificates \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        python${PYTHON_VERSION} python${PYTHON_VERSION}-dev python${PYTHON_VERSION}-venv \
        build-essential git wget \
    && rm -rf /var/lib/apt/lists/* \
    && python${PYTHON_VERSION} -m venv ${VIRTUAL_ENV} \
    && pip install --upgrade pip setuptools wheel packaging ninja psutil

# torch first and pinned, from the wheel index that matches the variant, so nothing later swaps its build.
RUN if [ "${VARIANT}" = "gpu" ]; then index="https://download.pytorch.org/whl/${TORCH_CUDA}"; \
    else index="https://download.pytorch.org/whl/cpu"; fi \
    && pip install --index-url "${index}" "torch==${TORCH_VERSION}"

# DeepSpeed with the ops the GPU engine uses compiled now (FusedAdam for ZeRO-3 on GPU, CPUAdam for optimizer
# offload, utils for ZeRO's flatten/unflatten), so no worker JIT-compiles them at start-up. flash-attn is built
# against the installed torch. The CPU variant needs neither: CPU training uses torch's AdamW.
RUN if [ "${VARIANT}" = "gpu" ]; then \
        export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
            DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
        && pip install --no-build-isolation --no-binary deepspeed "deepspeed==${DEEPSPEED_VERSION}" \
        && pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" \
        && ds_report; \
    else \
        pip install "deepspeed==${DEEPSPEED_VERSION}"; \
    fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gemb_dist ./gemb_dist
RUN if [ "${VARIANT}" = "gpu" ]; then extras="gpu,server"; else extras="server"; fi \
    && pip install ".[${extras}]" \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"
COPY jobs ./jobs

# Non-root: uid 1000 matches the securityContext of the manifests in cluster/kuberay and Ray's own images.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray
USER 1000:1000
ENV HOME=/home/ray

# The Ray job driver runs `python jobs/<job>.py` from the working directory of `ray start`, which is /app.
CMD ["bash"]
