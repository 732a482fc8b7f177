"""Prometheus gauges of the device agent (optional HTTP endpoint, own registry)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from shared.errors import ConfigError

GAUGES = {
    "samples_seen": "Input samples fully processed (persistent cursor)",
    "selected": "Samples UTS selected for upload in this run",
    "uploaded_samples": "Samples the cloud acknowledged (all runs)",
    "uploaded_bytes": "Payload bytes the cloud acknowledged (all runs)",
    "outbox_pending": "Selected samples not yet grouped into an upload",
    "outbox_in_flight": "Samples in uploads awaiting the cloud's receipt",
    "dropped_oldest": "Samples evicted by the outbox disk budget",
    "rejected_new": "Samples refused by the outbox disk budget",
    "dead_lettered": "Samples the cloud refused permanently",
    "adapter_version": "Adapter version now serving",
}


class DeviceMetrics:
    """`cdca_device_<name>` gauges mirroring status.json."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"`metrics_address` must be host:port, got {address!r}")
        self.registry = CollectorRegistry()
        self._gauges = {k: Gauge(f"cdca_device_{k}", h, registry=self.registry)
                        for k, h in GAUGES.items()}
        self.server, self.thread = start_http_server(int(port), host, registry=self.registry)

    def update(self, status: Mapping[str, object]) -> None:
        """Set every gauge present in `status`."""
        for k, g in self._gauges.items():
            v = status.get(k)
            if isinstance(v, int | float):
                g.set(v)

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        self.server.shutdown()
