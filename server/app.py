"""Builds and runs the gRPC server: services, auth, TLS, health, reflection, metrics, Ray."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelsurgery.checkpoints import CheckpointStore, default_root
from modelsurgery.models.placement import Placement
from modelsurgery.proto.limits import DEFAULT_MAX_EXPORT_BYTES, DEFAULT_MAX_JOB_SECONDS
from modelsurgery.server.auth import TOKENS_ENV, BearerTokenInterceptor, load_tokens
from modelsurgery.server.checkpoint_service import CheckpointService, ExportCache
from modelsurgery.server.credentials import take_from_environment
from modelsurgery.server.engine import EngineSettings, JobEngine
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.failures import FailureInterceptor
from modelsurgery.server.health_probe import write_ready_file
from modelsurgery.server.job_service import JobService
from modelsurgery.server.job_table import JobTable
from modelsurgery.server.logs import configure_logging, relay_output
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.server.permissions import AliasPolicy
from modelsurgery.server.reflection import enable_server_reflection
from modelsurgery.v1 import checkpoints_pb2, checkpoints_pb2_grpc, jobs_pb2, jobs_pb2_grpc

log = logging.getLogger("modelsurgery.server")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_MESSAGE_BYTES = 4 << 20


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50051
    store_root: Path = field(default_factory=default_root)
    tokens_file: Path | None = None
    # The value of MODELSURGERY_TOKENS, moved here out of the environment at start so that no
    # child process inherits it (None: not read yet).
    env_tokens: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Folders model paths and data files must lie under; None / () mean the home's models/
    # and data/ folders (built-in aliases, Hub repositories and stored versions need none).
    model_roots: tuple[Path, ...] | None = None
    data_roots: tuple[Path, ...] = ()
    # fnmatch patterns of aliases any writer may move (others: their creator or an admin).
    shared_aliases: tuple[str, ...] = ()
    # Listen on this Unix domain socket (made 0600) instead of host:port.
    unix_socket: Path | None = None
    ray_address: str | None = None
    num_cpus: int | None = None
    worker_cpus: int | None = None
    workers: int = 1
    # GPUs each worker asks Ray for (more than one: a model that does not fit one GPU is
    # placed over them), each one's budget for weights (None: 85% of what it has free), and
    # whether blocks that fit no GPU stay in CPU memory and run there.
    gpus_per_worker: float = 1.0
    gpu_memory_bytes: int | None = None
    cpu_offload: bool = False
    # Ray helper actors a job's independent batches spread over (see ``server.fan_out``).
    fan_out: int = 1
    fan_out_cpus: float = 1.0
    max_attempts: int = 2
    max_queued_per_caller: int = 100
    max_request_bytes: int = MAX_MESSAGE_BYTES
    max_cache_bytes: int = 8 << 30
    # The longest a job may run (its spec's timeout_s may ask for less, never more).
    max_job_seconds: float = DEFAULT_MAX_JOB_SECONDS
    # Exported folders kept for downloads, least recently used out beyond this.
    max_export_bytes: int = DEFAULT_MAX_EXPORT_BYTES
    # Finished jobs and their events are deleted this long after they ended (None: kept).
    job_retention_seconds: float | None = 30 * 24 * 3600.0
    metrics_port: int | None = None
    # On stop, health reads NOT_SERVING this long before the port closes, so that a balancer
    # polling Check stops sending calls; Watch streams are told at once.
    drain_seconds: float = 0.0

    @property
    def home(self) -> Path:
        """Server state beside the store: job database, exports, statistics caches."""
        return self.store_root.parent

    @property
    def model_folders(self) -> tuple[Path, ...]:
        return self.model_roots or (self.home / "models",)

    @property
    def data_folders(self) -> tuple[Path, ...]:
        return self.data_roots or (self.home / "data",)

    def default_folders(self) -> list[Path]:
        """The home's models/ and data/ where they serve as roots (created at start)."""
        return [
            folders[0]
            for given, folders in (
                (self.model_roots, self.model_folders),
                (self.data_roots, self.data_folders),
            )
            if not given
        ]


class ModelSurgeryServer:
    """One running server; ``start`` returns once it accepts calls on ``self.port``."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port: int | None = None
        self.address = ""
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.metrics: ServerMetrics | None = None
        self.table: JobTable | None = None
        self.engine: JobEngine | None = None

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert is None and s.tls_key is None:
            return None
        if s.tls_cert is None or s.tls_key is None:
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        client_ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    async def start(self) -> int:
        s = self.settings
        if s.env_tokens is None:
            s.env_tokens = take_from_environment(TOKENS_ENV)
        tokens = load_tokens(s.tokens_file, s.env_tokens)
        if not tokens and s.host not in LOOPBACK:
            log.warning(
                "no bearer tokens configured: binding to loopback only instead of %s", s.host
            )
            s.host = "127.0.0.1"
        elif not tokens and s.unix_socket is None:
            log.warning("no bearer tokens configured: serving loopback only, unauthenticated")
        for folder in s.default_folders():
            folder.mkdir(parents=True, exist_ok=True)
        aliases = AliasPolicy(s.shared_aliases)
        store = CheckpointStore(s.store_root)
        self.table = JobTable(s.home / "jobs.sqlite3")
        self.metrics = metrics = ServerMetrics(self.table)
        worker = WorkerSettings(
            store_root=s.store_root,
            cache_dir=s.home / "cache",
            data_roots=s.data_folders,
            model_roots=s.model_folders,
            max_cache_bytes=s.max_cache_bytes,
            placement=Placement(cpu_offload=s.cpu_offload, gpu_memory=s.gpu_memory_bytes),
            fan_out=s.fan_out,
            fan_out_cpus=s.fan_out_cpus,
            shared_aliases=s.shared_aliases,
        )
        self.engine = JobEngine(
            self.table,
            EngineSettings(
                worker=worker,
                ray_address=s.ray_address,
                num_cpus=s.num_cpus,
                worker_cpus=s.worker_cpus,
                workers=s.workers,
                gpus_per_worker=s.gpus_per_worker,
                max_attempts=s.max_attempts,
                max_job_seconds=s.max_job_seconds,
                retention_seconds=s.job_retention_seconds,
            ),
            metrics,
        )
        interceptors: list[grpc.aio.ServerInterceptor] = [metrics.grpc_interceptor()]
        if tokens:
            interceptors.append(BearerTokenInterceptor(tokens))
        interceptors.append(FailureInterceptor(s))  # innermost: sees the servicer's errors
        options = [
            ("grpc.max_receive_message_length", s.max_request_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(
            JobService(
                self.table,
                self.engine,
                store,
                model_roots=s.model_folders,
                max_queued_per_caller=s.max_queued_per_caller,
                max_job_seconds=s.max_job_seconds,
                alias_policy=aliases,
            ),
            server,
        )
        exports = ExportCache(s.home / "exports", store, max_bytes=s.max_export_bytes)
        checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(
            CheckpointService(
                store, self.engine, exports, model_roots=s.model_folders, alias_policy=aliases
            ),
            server,
        )
        self._health = health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        services = (
            jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
            checkpoints_pb2.DESCRIPTOR.services_by_name["CheckpointService"].full_name,
            health.SERVICE_NAME,
        )
        enable_server_reflection(services, server)
        credentials = self._credentials()
        self.port = self._bind(server, credentials)
        await self.engine.start()
        await server.start()
        self._server = server
        for name in ("", *services[:2]):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if s.metrics_port is not None:
            self.metrics_port = metrics.serve(s.metrics_port, s.host)
        log.info(
            "serving",
            extra={
                "address": self.address,
                "tls": credentials is not None,
                "auth": bool(tokens),
                "store": str(s.store_root),
                "metrics_port": self.metrics_port,
            },
        )
        return self.port

    def _bind(self, server: grpc.aio.Server, credentials: grpc.ServerCredentials | None) -> int:
        """Open the listening address (``self.address``); the TCP port, 0 on a Unix socket."""
        s = self.settings
        target = f"unix:{s.unix_socket}" if s.unix_socket is not None else f"{s.host}:{s.port}"
        if credentials is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
        if s.unix_socket is not None:
            s.unix_socket.chmod(0o600)
            self.address = target
            return 0
        self.address = f"{s.host}:{port}"
        return port

    async def stop(self, grace: float = 5.0) -> None:
        """Drain: every service's health turns NOT_SERVING, then calls in flight get ``grace``
        seconds to finish while new ones are refused."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
            await asyncio.sleep(self.settings.drain_seconds)
        if self._server is not None:
            await self._server.stop(grace)
        if self.engine is not None:
            await self.engine.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.table is not None:
            self.table.close()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


async def serve_forever(settings: ServerSettings, ready_file: Path | None = None) -> None:
    """Run until SIGINT/SIGTERM, then stop cleanly (running jobs are re-queued next start)."""
    server = ModelSurgeryServer(settings)
    await server.start()
    if ready_file is not None:
        write_ready_file(ready_file, server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop()


def run(settings: ServerSettings, ready_file: Path | None = None, json_logs: bool = True) -> None:
    """Serve until a signal; with ``json_logs`` every line on stdout/stderr is a JSON object,
    native output included (see ``logs.relay_output``)."""
    if settings.env_tokens is None:  # before the log relay starts: it must not inherit them
        settings.env_tokens = take_from_environment(TOKENS_ENV)
    with relay_output() if json_logs else contextlib.nullcontext():
        configure_logging(json_logs)
        try:
            asyncio.run(serve_forever(settings, ready_file))
        except Exception:
            log.critical("server stopped by an error", exc_info=True)
            raise SystemExit(1) from None
