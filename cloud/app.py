"""The whole cloud daemon as one object: store, worker, gRPC server, metrics; started and drained
in the right order. `cloud-server serve` runs one; tests may run one in-process."""

from __future__ import annotations

import logging

import torch

from cloud.ingest import Ingestor
from cloud.keys import load_or_create_signing_key, public_key_bytes
from cloud.metrics import Metrics
from cloud.server import CloudServer, server_credentials
from cloud.servicer import Identity, SyncServicer
from cloud.settings import CloudSettings
from cloud.store import Quota, SqliteStore
from cloud.trainers import TRAINERS, Trainer
from cloud.worker import DistillWorker
from shared.codec import CODECS
from shared.errors import ConfigError
from shared.wire.convert import UploadLimits

log = logging.getLogger(__name__)


class CloudApp:
    """A running cloud-server. `trainer` overrides the configured one (in-process tests)."""

    def __init__(self, settings: CloudSettings, trainer: Trainer | None = None) -> None:
        if settings.tls is None and not settings.insecure:
            raise ConfigError("field `tls`: missing; set `tls` or `insecure = true` explicitly")
        tls = settings.tls
        credentials = server_credentials(tls) if tls is not None else None  # fail before work
        torch.set_num_threads(1)  # RPC threads and the worker share the CPU; no oversubscription
        w, lim = settings.worker, settings.limits
        self.trainer = trainer or TRAINERS.build(w.trainer, w.trainer_options)
        codec = CODECS.build(w.codec, w.codec_options)
        self.metrics = Metrics()
        self.store = SqliteStore(settings.data_dir)
        key = load_or_create_signing_key(settings.data_dir / "signing_key.pem")
        self.worker = DistillWorker(self.store, self.trainer, codec, w.codec, key, w, self.metrics)
        self.metrics.track_queue_depth(lambda: sum(
            self.store.status(d).pending_samples for d in self.store.adapter_versions()))
        for device_id, version in self.store.adapter_versions().items():
            self.metrics.device_version.labels(device_id).set(version)
        limits = UploadLimits(
            max_payload_bytes=lim.max_payload_bytes, max_samples=lim.max_samples,
            max_tokens=lim.max_tokens, max_dim=lim.max_dim, max_text_chars=lim.max_text_chars,
            max_frames=lim.max_frames, max_frame_side=lim.max_frame_side)
        ingestor = Ingestor(
            self.store, limits, Quota(lim.max_pending_samples, lim.max_pending_bytes),
            self.trainer.check_sample, self.worker.notify, self.metrics)
        identity = Identity(
            settings.enrollment_secret.get_secret_value(), public_key_bytes(key),
            self.trainer.base_model_hash,
            bind_client_cert=bool(tls and tls.client_ca_file and tls.bind_client_cert))
        self.servicer = SyncServicer(self.store, ingestor, identity, self.metrics,
                                     lim.max_payload_bytes, lim.upload_timeout_s)
        self.metrics_port = (self.metrics.serve(settings.metrics_address)
                             if settings.metrics_address else None)
        if w.enabled:
            self.worker.start()
        self.server = CloudServer(self.servicer, settings.listen_address, settings.max_workers,
                                  credentials, lim.max_concurrent_rpcs)
        self.port = self.server.port

    def stop(self, grace_s: float) -> None:
        """Drain in order: health NOT_SERVING, worker to its next checkpoint, in-flight calls
        finish, then metrics and the store close."""
        self.server.enter_drain()
        self.worker.request_stop()
        self.server.stop(grace_s)
        self.worker.stop(max(grace_s, 1.0))
        self.metrics.close()
        self.store.close()
