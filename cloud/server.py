"""Build, start and stop the cloud gRPC server: SyncService + health + reflection, graceful drain.

TLS (or mutual TLS) comes from the configured files; plaintext only when `insecure` is set.
Messages are capped just above one chunk (payloads are streamed in <= 1 MiB chunks), and the
number of concurrent calls is bounded.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.inflight import InFlightCalls
from cloud.servicer import SyncServicer
from cloud.settings import TlsSettings
from shared.errors import ConfigError
from shared.pb.v1 import sync_pb2, sync_pb2_grpc
from shared.wire.chunking import CHUNK_BYTES

log = logging.getLogger(__name__)

SERVICE_NAME = sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name
MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024  # one chunk plus its header fields


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; a client CA makes client certificates mandatory."""
    try:
        pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
        client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    except OSError as e:
        raise ConfigError(f"field `tls`: cannot read {e.filename}: {e.strerror}") from None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


class CloudServer:
    """A started gRPC server; `stop()` drains it."""

    def __init__(
        self, servicer: SyncServicer, listen_address: str, max_workers: int,
        credentials: grpc.ServerCredentials | None = None,
        max_concurrent_rpcs: int | None = None,
    ) -> None:
        self._servicer = servicer
        self._inflight = InFlightCalls(SERVICE_NAME)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
            interceptors=[self._inflight],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Drop connections that sit idle, and probe live ones, so dead peers free slots.
                ("grpc.max_connection_idle_ms", 10 * 60 * 1000),
                ("grpc.keepalive_time_ms", 60 * 1000),
                ("grpc.keepalive_timeout_ms", 20 * 1000),
            ],
        )
        sync_pb2_grpc.add_SyncServiceServicer_to_server(servicer, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        if credentials is None:
            self.port = self._server.add_insecure_port(listen_address)
        else:
            self.port = self._server.add_secure_port(listen_address, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {listen_address}")
        self._server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"address": listen_address, "port": self.port,
                                   "tls": credentials is not None})

    def enter_drain(self) -> None:
        """Announce NOT_SERVING (probes and load balancers stop routing) and refuse new work."""
        self._health.enter_graceful_shutdown()
        self._servicer.draining = True

    def stop(self, grace_s: float) -> None:
        """Drain: flip health, refuse new calls, let in-flight calls finish within `grace_s`.

        The server stays up until the in-flight calls are done, so new calls meet the draining
        servicer (UNAVAILABLE, retryable) rather than gRPC core's shutdown (CANCELLED)."""
        self.enter_drain()
        deadline = time.monotonic() + grace_s
        self._inflight.wait_idle(grace_s)
        self._server.stop(max(0.0, deadline - time.monotonic())).wait()
        log.info("stopped")
