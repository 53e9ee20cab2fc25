# ft-appliance image.
#   GPU (default):  docker build -t ft-appliance .
#   older drivers:  docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 ...
#   CPU test image: docker build --build-arg BASE_IMAGE=ft-appliance-testbase:bookworm --build-arg VARIANT=cpu ...
# The CUDA "base" variant carries only the CUDA runtime: PyPI's torch wheels bring their own cuBLAS,
# cuDNN and NCCL (nvidia-*-cu13 packages), so the larger "runtime" variant would ship them twice.
# Python packages come from docker/lock (the same pins as the tests). Put wheels in build/wheelhouse
# to build without an index (air-gapped clusters, the tests here); an empty folder means PyPI.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG VARIANT=gpu

FROM ${BASE_IMAGE} AS builder
ARG VARIANT
ARG TORCH_INDEX_URL=
# Optional packages some LlamaFactory configs need (preflight names them): EXTRAS="wandb galore".
ARG EXTRAS=
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN if ! python3 -m venv /tmp/probe >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi; rm -rf /tmp/probe
WORKDIR /src
COPY docker/lock/ docker/lock/
COPY docker/install-stack.sh docker/
# Dependencies first, in their own layer: source edits do not reinstall torch.
RUN --mount=type=bind,source=build/wheelhouse,target=/wheelhouse \
    set -e; python3 -m venv /opt/venv; . /opt/venv/bin/activate; \
    if ls /wheelhouse/* >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    pip install --no-deps -r docker/lock/build.txt; \
    EXTRAS="$EXTRAS" docker/install-stack.sh "$VARIANT"
COPY pyproject.toml README.md ./
COPY entrypoint/ entrypoint/
RUN --mount=type=bind,source=build/wheelhouse,target=/wheelhouse \
    . /opt/venv/bin/activate && pip install --no-deps --no-build-isolation --no-index . \
    && python -c "import ft_appliance.cli" \
    && python -c "from pathlib import Path; from ft_appliance.preflight.gate import bake; print(bake(Path('/opt/venv/share/ft-appliance')))"

FROM ${BASE_IMAGE}
ARG FT_UID=1000
ARG FT_GID=1000
ENV DEBIAN_FRONTEND=noninteractive
# tini as PID 1 forwards signals to the entrypoint and reaps orphans.
RUN if ! command -v tini >/dev/null || ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends tini python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# Ubuntu images ship a user with uid 1000; the appliance's user takes the configured ids.
RUN (userdel -r ubuntu 2>/dev/null || true) \
    && groupadd -g "$FT_GID" ft && useradd -u "$FT_UID" -g ft -m -d /home/ft -s /usr/sbin/nologin ft \
    && mkdir -p /data && chown ft:ft /data
COPY --from=builder /opt/venv /opt/venv
COPY configs/ /opt/ft-appliance/configs/
ENV PATH=/opt/venv/bin:$PATH \
    FT_DATA=/data \
    FT_EXAMPLES_DIR=/opt/ft-appliance/configs \
    FT_BAKED_CACHE=/opt/venv/share/ft-appliance \
    FT_HEARTBEAT_FILE=/tmp/ft-appliance.heartbeat \
    HF_HOME=/data/.cache/huggingface \
    TRITON_CACHE_DIR=/data/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/data/.cache/inductor \
    HF_DATASETS_OFFLINE=1 \
    PYTHONUNBUFFERED=1
USER ft
WORKDIR /data
VOLUME ["/data"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 CMD ["ft-appliance", "health"]
LABEL org.opencontainers.image.title="ft-appliance" \
      org.opencontainers.image.description="LlamaFactory fine-tuning under torchrun with preflight and crash-resume" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["tini", "--", "ft-appliance"]
CMD ["train"]
