"""Build, start and stop the cloud gRPC server: SyncService + health + reflection, graceful drain."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.servicer import SyncServicer
from shared.pb.v1 import sync_pb2, sync_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name


class CloudServer:
    """A started gRPC server; `stop()` drains it."""

    def __init__(self, servicer: SyncServicer, listen_address: str, max_workers: int) -> None:
        self._servicer = servicer
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        sync_pb2_grpc.add_SyncServiceServicer_to_server(servicer, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = self._server.add_insecure_port(listen_address)
        if self.port == 0:
            raise OSError(f"could not bind {listen_address}")
        self._server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"address": listen_address, "port": self.port})

    def stop(self, grace_s: float) -> None:
        """Flip health to NOT_SERVING, refuse new work, let in-flight calls finish."""
        self._health.enter_graceful_shutdown()
        self._servicer.draining = True
        self._server.stop(grace_s).wait()
        log.info("stopped")
