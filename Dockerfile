# syntax=docker/dockerfile:1.7
# clip-tta: TorchServe + the tta library. One image for CPU and GPU nodes: the torch wheels in
# uv.lock carry the CUDA runtime libraries, and a GPU node's driver comes in through the NVIDIA
# container toolkit, so no CUDA base image is needed.
#
#   docker build -t clip-tta:0.1.0 .
#   docker run --rm -e MODEL=tiny-random -p 8080:8080 clip-tta:0.1.0     # builds the archive, serves
#
# Without Docker: `make image` (scripts/build_image.sh, buildah + a local Debian base).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- builder: the locked environment, nothing else ----------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG UV_VERSION=0.13.9
# `uv sync` extras: kserve = KServe's model server (SERVER=kserve, the InferenceService);
# add "--extra gpu" for onnxruntime-gpu
ARG UV_SYNC_ARGS="--extra kserve"
# uv's cache: a BuildKit cache mount by default; scripts/build_image.sh points it at the host's cache
ARG UV_CACHE_DIR=/root/.cache/uv
# CA bundle pip and uv trust while downloading (this stage only). scripts/build_image.sh mounts the
# host's bundle here, so builds behind a TLS-inspecting proxy work.
ARG CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=${CA_BUNDLE} \
    SSL_CERT_FILE=${CA_BUNDLE} \
    UV_CACHE_DIR=${UV_CACHE_DIR} \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir --quiet "uv==${UV_VERSION}"
WORKDIR /app
# dependencies first (the slow, rarely changing layer), then the project itself
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/bin/uv sync --frozen --no-dev --no-install-project ${UV_SYNC_ARGS}
COPY tta ./tta
COPY handlers ./handlers
# editable install: tta archive packs the tta/ folder (with its data files) into the archive;
# bytecode compiled here, since the pods' root file system is read-only
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/bin/uv sync --frozen --no-dev ${UV_SYNC_ARGS} \
    && rm -rf /app/*.egg-info /app/build \
    && /app/.venv/bin/python -m compileall -q tta handlers

# --- runtime: Java 17 for TorchServe's frontend, the environment, the serving scripts -------------
FROM ${BASE_IMAGE} AS runtime
# openjdk's postinst needs the man directory that slim images delete
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin app
COPY --from=builder /app/.venv /app/.venv
COPY --from=builder /app/tta /app/tta
COPY --from=builder /app/handlers /app/handlers
COPY config.properties /app/
COPY scripts/serve.sh /app/scripts/
COPY docker/ /app/docker/
# /app itself is the working directory TorchServe writes to (logs/, key_file.json, model_store/)
# when the root is writable (docker run); the environment under it stays root-owned and read-only
# for the server. With a read-only root (the Kubernetes pods) every write goes to the mounted
# emptyDirs instead: RUN_DIR, MODEL_STORE, HOME and PROMETHEUS_MULTIPROC_DIR under /tmp or /models.
RUN mkdir -p /app/model_store && chown 10001:10001 /app /app/model_store
WORKDIR /app
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_METRICS_ADDRESS=http://0.0.0.0:8082 \
    TTA_METRICS_ADDRESS=0.0.0.0 \
    TTA_METRICS_PORT=8083
# The management API stays on 127.0.0.1:8081 (config.properties): never published.
EXPOSE 8080 8082 8083
# a high uid: no clash with a host user's (checkov CKV_K8S_40)
USER 10001:10001
ENTRYPOINT ["/app/docker/entrypoint.sh"]
