"""The ready file ``serve --ready-file`` writes once it serves, and the health probe that reads
it: the container's HEALTHCHECK asks the gRPC health service at the address the server really
bound, over TLS when it was started with TLS, so the check follows ``--port``, ``--host``,
``--unix-socket`` and ``--tls-*`` as given to ``serve`` instead of assuming the defaults.

    python -m modelsurgery.server.health_probe /tmp/modelsurgery-ready.json

exits 0 while the server reports SERVING, 1 otherwise (no file yet, refused, not serving)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from modelsurgery.server.app import ModelSurgeryServer

# A server bound to every interface is asked on loopback.
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
PROBE_TIMEOUT_S = 5.0


def write_ready_file(path: Path, server: ModelSurgeryServer) -> None:
    """Where ``server`` listens and how: written whole (temp file, rename) once it serves."""
    s = server.settings
    tls = None
    if s.tls_cert is not None and s.tls_key is not None:
        tls = {
            "cert": str(s.tls_cert.resolve()),
            "key": str(s.tls_key.resolve()),
            "client_ca": str(s.tls_client_ca.resolve()) if s.tls_client_ca else None,
        }
    ready = {
        "port": server.port,
        "address": server.address,
        "metrics_port": server.metrics_port,
        "tls": tls,
    }
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(ready), encoding="utf-8")
    partial.replace(path)


def probe_target(address: str) -> str:
    """The address to dial for a bound ``address`` (``host:port`` or ``unix:/path``)."""
    if address.startswith("unix:"):
        return address
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    host = WILDCARD_HOSTS.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def certificate_name(pem: bytes) -> str | None:
    """The first DNS name of a server certificate (else its common name), the name the probe
    checks it against; None when it names only addresses (then the dialled IP is checked)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID, NameOID

    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(common[0].value) if common else None
    dns = names.value.get_values_for_type(x509.DNSName)
    return dns[0] if dns else None


@dataclass(frozen=True)
class Probe:
    """How to reach a server: dial ``target``, with TLS when ``tls`` names its files."""

    target: str
    tls: dict[str, Any] | None = None

    @classmethod
    def from_ready_file(cls, path: Path) -> Probe:
        ready = json.loads(path.read_text(encoding="utf-8"))
        return cls(probe_target(ready["address"]), ready.get("tls"))

    def channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.target)
        # The server's own certificate is the trust anchor (gRPC accepts a chain that ends
        # there); a server that asks for client certificates is shown its own pair.
        cert = Path(self.tls["cert"]).read_bytes()
        mutual = self.tls.get("client_ca") is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=cert,
            private_key=Path(self.tls["key"]).read_bytes() if mutual else None,
            certificate_chain=cert if mutual else None,
        )
        name = certificate_name(cert)
        options = [("grpc.ssl_target_name_override", name)] if name else []
        return grpc.secure_channel(self.target, credentials, options=options)

    def serving(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        with self.channel() as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            except grpc.RpcError:
                return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m modelsurgery.server.health_probe READY_FILE", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"not ready: {path} not written yet", file=sys.stderr)
        return 1
    probe = Probe.from_ready_file(path)
    if probe.serving():
        return 0
    print(f"not serving at {probe.target}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
