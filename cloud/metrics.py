"""Prometheus metrics of the cloud-server, on their own registry and their own HTTP port."""

from __future__ import annotations

import logging
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_SIZE_BUCKETS = tuple(float(2**k) for k in range(8, 31, 2))  # 256 B .. 1 GiB


class Metrics:
    """Every metric the daemon exports. A private registry keeps several servers in one process
    (tests) from colliding."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.uploads = Counter(
            "cdca_uploads", "UploadSamples calls by outcome (stored, duplicate, rejected)",
            ["outcome"], registry=r)
        self.upload_bytes = Counter(
            "cdca_upload_bytes", "Payload bytes of stored uploads", registry=r)
        self.upload_samples = Counter(
            "cdca_upload_samples", "Samples durably stored", registry=r)
        self.rpc_errors = Counter(
            "cdca_rpc_errors", "RPCs that ended with an error status", ["method", "code"],
            registry=r)
        self.queue_depth = Gauge(
            "cdca_pending_samples", "Samples waiting for a distillation round", registry=r)
        self.rounds = Counter(
            "cdca_distill_rounds",
            "Distillation jobs by outcome (done, withheld, failed, interrupted)",
            ["outcome"], registry=r)
        self.round_seconds = Histogram(
            "cdca_distill_round_seconds", "Wall time of a finished distillation round",
            registry=r)
        self.loss = Gauge(
            "cdca_distill_loss", "Training loss of the latest round at its first and last step",
            ["point"], registry=r)
        self.round_check = Gauge(
            "cdca_distill_check",
            "The latest round's publish checks at its start and end adapter (source_accuracy, "
            "holdout_nll), published or withheld", ["check", "point"], registry=r)
        self.update_bytes = Histogram(
            "cdca_update_bytes", "Encoded (DWC) update payload sizes", buckets=_SIZE_BUCKETS,
            registry=r)
        self.device_version = Gauge(
            "cdca_device_adapter_version", "Adapter version each device acknowledged",
            ["device_id"], registry=r)
        self.device_latest = Gauge(
            "cdca_device_latest_version", "Newest update version produced per device",
            ["device_id"], registry=r)
        self._http: WSGIServer | None = None

    def track_queue_depth(self, read: Callable[[], int]) -> None:
        """Compute the queue depth on every scrape (the store is the truth, not a counter)."""
        self.queue_depth.set_function(lambda: float(read()))

    def serve(self, address: str) -> int:
        """Expose /metrics on host:port (port 0 picks one); returns the bound port."""
        host, _, port = address.rpartition(":")
        self._http, _ = start_http_server(int(port), host or "0.0.0.0", registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on %s:%d", host, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
