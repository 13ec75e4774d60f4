# grace-serve: the OpenAI-compatible server for the GRACE Qwen3-VL-2B, on one NVIDIA GPU.
#
#   docker build -t grace-serve .
#   docker run --gpus 1 -p 8000:8000 -v grace-cache:/var/cache/grace-serve --stop-timeout 45 grace-serve
#
# Every server flag can be set as an environment variable (GRACE_SERVE_<FLAG>), e.g.
# `-e GRACE_SERVE_MAX_NUM_SEQS=128`; flags given after the image name win over the environment.
# docs/OPERATIONS.md has the details. tests/test_deploy.py checks this file against the repo.

# PyPI's Linux torch wheels are CUDA 13.0 builds (torch 2.13 -> triton 3.7); they bring their
# own CUDA libraries, so the base only has to match: driver >= 580 on the host. For older
# drivers build with a CUDA 12 base and a cu12x torch index:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg TORCH_INDEX_URL=<cu128 index>
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# -- build: a virtual environment with CUDA torch + triton and the project (no dev extras) ----
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive

# Ubuntu's packages are not pinned: the base image tag pins the release, and pinned versions
# vanish from the archive when security updates land.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: ~4 GB that only changes with TORCH_VERSION, not with our code.
RUN if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
# A regular (not editable) install: the runtime stage copies only /opt/venv, not /src.
RUN pip install --no-cache-dir . \
    && python -c "import server.__main__, kernels.qmatmul_triton"

# -- runtime ------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive

# Triton compiles a small C launcher per kernel signature at run time: it needs a C compiler
# and Python's headers in the image, not only the Python interpreter.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid (not Ubuntu's uid 1000 "ubuntu"), so Kubernetes' runAsUser matches.
RUN groupadd --system --gid 10001 grace \
    && useradd --system --uid 10001 --gid grace --create-home --home-dir /home/grace grace \
    && mkdir -p /var/cache/grace-serve \
    && chown grace:grace /var/cache/grace-serve

COPY --from=build /opt/venv /opt/venv

# One writable cache volume for everything the server downloads or compiles: the Hugging Face
# hub cache (model weights), Triton's compiled kernels and the demo checkpoint. Keeping it across
# restarts skips the download and the kernel compilation.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/cache/grace-serve/huggingface \
    TRITON_CACHE_DIR=/var/cache/grace-serve/triton \
    TRITON_HOME=/var/cache/grace-serve \
    XDG_CACHE_HOME=/var/cache/grace-serve \
    GRACE_SERVE_MODEL=ForeverBlue/Qwen3-VL-2B-GRACE-W8G128 \
    GRACE_SERVE_HOST=0.0.0.0 \
    GRACE_SERVE_PORT=8000 \
    GRACE_SERVE_DRAIN_TIMEOUT=30 \
    GRACE_SERVE_LOG_FORMAT=json
VOLUME ["/var/cache/grace-serve"]

USER 10001:10001
WORKDIR /home/grace
EXPOSE 8000

# /health: 200 while serving, 503 while draining or when the engine died. The start period
# covers the first model download and load; failures inside it do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GRACE_SERVE_PORT', '8000'), timeout=4)"]

# SIGTERM drains (in-flight requests finish, up to GRACE_SERVE_DRAIN_TIMEOUT seconds): give
# `docker stop` more than that (--stop-timeout 45; compose's stop_grace_period does it).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "server"]
# The defaults come from the GRACE_SERVE_* variables above (the model, 0.0.0.0:8000), so that
# `-e GRACE_SERVE_MODEL=...` works: a flag here would override the environment.
CMD []
