"""Drains the outbox to the cloud: resend-until-receipt with exponential backoff and jitter."""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass

from device.outbox import Outbox
from device.sync.transport import RETRYABLE_CODES, Transport
from shared.errors import ConfigError, StoreFullError, TransportError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BackoffConfig:
    """Retry delays: min(max_s, base_s * 2**attempt), scaled by a uniform jitter factor."""

    base_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.5
    """Delays are drawn from [(1 - jitter) * d, d] ("equal jitter" for jitter = 0.5), so a fleet
    that lost the cloud at once does not retry in lockstep."""

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.max_s:
            raise ConfigError(f"`base_s` must be in (0, max_s={self.max_s}], got {self.base_s}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"`jitter` must be in [0, 1], got {self.jitter}")

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Delay before retry number `attempt` (0-based)."""
        d = min(self.max_s, self.base_s * 2.0 ** min(attempt, 30))
        return d * (1.0 - self.jitter * rng.random())


class Uploader:
    """Sends outbox uploads one at a time, oldest first, until the outbox is empty."""

    def __init__(self, outbox: Outbox, transport: Transport, backoff: BackoffConfig,
                 stop: threading.Event, seed: int | None = None) -> None:
        self._outbox = outbox
        self._transport = transport
        self._backoff = backoff
        self._stop = stop
        self._rng = random.Random(seed)
        self.failures = 0
        """Consecutive failed attempts (reset by a receipt)."""

    def drain_once(self) -> str:
        """Try the oldest upload once: "empty", "sent" (receipt or dead letter) or "failed"."""
        try:
            return self._attempt()
        except StoreFullError as e:
            # the outbox's disk is full: keep everything, back off, try again (uploads free it)
            self.failures += 1
            log.warning("outbox disk full, will retry", extra={"reason": str(e),
                                                                "failures": self.failures})
            return "failed"

    def _attempt(self) -> str:
        upload = self._outbox.next_upload()
        if upload is None:
            return "empty"
        self._outbox.mark_attempt(upload.upload_id)
        try:
            receipt = self._transport.upload(upload.upload_id, upload.payload)
        except TransportError as e:
            if e.code in RETRYABLE_CODES or e.code == "UNAUTHENTICATED":
                # UNAUTHENTICATED keeps the data: re-registering fixes it, dropping would not.
                self.failures += 1
                log.warning("upload failed, will retry", extra={
                    "upload_id": upload.upload_id, "code": e.code, "failures": self.failures})
                return "failed"
            self._outbox.dead_letter(upload.upload_id, str(e))
            return "sent"
        self.failures = 0
        self._outbox.acknowledge(upload.upload_id, receipt.duplicate)
        log.info("uploaded %d samples (%d bytes)", upload.samples, len(upload.payload),
                 extra={"upload_id": upload.upload_id, "duplicate": receipt.duplicate})
        return "sent"

    def drain(self) -> None:
        """Send until the outbox is empty (or `stop` is set), backing off after failures."""
        while not self._stop.is_set():
            outcome = self.drain_once()
            if outcome == "empty":
                return
            if outcome == "failed":
                self._stop.wait(self._backoff.delay_s(self.failures - 1, self._rng))

    def run(self, idle_s: float) -> None:
        """Background loop: drain, then wait `idle_s` for new samples, until `stop` is set."""
        while not self._stop.is_set():
            self.drain()
            self._stop.wait(idle_s)
