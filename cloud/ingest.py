"""Ingestion of uploads: deduplicate by upload id, validate every field, store, then receipt."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from cloud.metrics import Metrics
from cloud.store import Quota, Store
from shared.errors import WireFormatError
from shared.types import UploadReceipt, UploadSample
from shared.wire.convert import UploadLimits, decode_sample_batch

log = logging.getLogger(__name__)


class Ingestor:
    """Turns a verified upload payload into stored samples, or an error naming the field.

    Nothing is written unless the whole batch is valid; the receipt is returned only after the
    store committed, so an acknowledged upload survives any crash.
    """

    def __init__(
        self, store: Store, limits: UploadLimits, quota: Quota,
        check_sample: Callable[[UploadSample], None], on_stored: Callable[[str], None],
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._limits = limits
        self._quota = quota
        self._check_sample = check_sample
        self._on_stored = on_stored
        self._metrics = metrics

    def accept(self, device_id: str, upload_id: str, payload: bytes) -> UploadReceipt:
        """Store one upload of `device_id`; a repeated upload id returns the first receipt."""
        digest = hashlib.sha256(payload).digest()
        earlier = self._store.find_upload(device_id, upload_id)
        if earlier is not None:
            if earlier[0] != digest:
                raise WireFormatError(
                    f"upload_id: {upload_id!r} was already used for a different payload")
            self._metrics.uploads.labels("duplicate").inc()
            return earlier[1]
        batch = decode_sample_batch(payload, self._limits)
        for i, sample in enumerate(batch.samples):
            try:
                self._check_sample(sample)
            except WireFormatError as e:
                raise WireFormatError(f"samples[{i}].{e}") from None
        receipt = self._store.put_upload(device_id, upload_id, digest, batch, self._quota)
        if receipt.duplicate:  # a concurrent call with the same id committed first
            self._metrics.uploads.labels("duplicate").inc()
            return receipt
        self._metrics.uploads.labels("stored").inc()
        self._metrics.upload_bytes.inc(len(payload))
        self._metrics.upload_samples.inc(receipt.stored_samples)
        log.info("upload stored", extra={
            "device_id": device_id, "upload_id": upload_id, "samples": receipt.stored_samples,
            "bytes": len(payload), "pending": receipt.pending_samples})
        self._on_stored(device_id)
        return receipt
