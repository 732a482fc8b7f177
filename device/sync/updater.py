"""Downlink (DWC) on the device: verify, decode, apply atomically, probe, keep or roll back, ack.

Checks, in order, before anything is applied: the Ed25519 signature of the header under the
cloud key from enrollment, the payload's size and sha256 against the signed header, the target
device, the base model hash, and that the base version equals the adapter version now serving.
Only then is the delta decoded with the shared codec onto the current weights. The new version is
written and fsynced, the pointer swapped (on probation), the weights replaced in place, and a local
probe set scored; a drop of more than `rollback_margin` restores the previous weights and pointer.

The last version the cloud confirmed as applied is kept in `<adapters>/ACKED`: a crash between the
final swap and the acknowledgement would otherwise leave the cloud recording the old version
forever (the device never fetches that update again), so a restarted device re-sends it.
`CDCA_FAULT_POINT` (tests only, see docs/reliability.md) kills the process at a named instant of
`apply` that no outside observer can catch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from peft import PeftModel

from device.runtime.adapter_store import AdapterStore, Pointer
from device.runtime.loader import adapter_state, load_adapter_state
from shared import signing
from shared.codec import CODECS
from shared.errors import CdcaError, ConfigError, IncompatibleUpdateError
from shared.types import UpdateAck, UpdateHeader

log = logging.getLogger(__name__)

ACKED = "ACKED"
"""File in the adapter store's directory: {"version": the last version the cloud confirmed}."""

FAULT_POINT_ENV = "CDCA_FAULT_POINT"
"""Names an instant of `apply` ("adapter-written", "adapter-swapped") at which the process
SIGKILLs itself; unset in production. Read here only: the instants last microseconds, so a test
cannot kill from outside at them, and a settings field would ship a kill switch."""


def _fault_point(name: str) -> None:
    if os.environ.get(FAULT_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


Probe = Callable[[], float]
"""Accuracy in [0, 1] of the model as it now serves, on the device's local probe set."""


@dataclass(frozen=True, slots=True)
class UpdaterConfig:
    """Downlink policy."""

    rollback_margin: float = 0.05
    """Roll back when probe accuracy falls more than this below the previous version's."""
    max_update_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.rollback_margin <= 1.0:
            raise ConfigError(f"`rollback_margin` must be in [0, 1], got {self.rollback_margin}")
        if self.max_update_bytes <= 0:
            raise ConfigError(f"`max_update_bytes` must be > 0, got {self.max_update_bytes}")


class AdapterUpdater:
    """Owns the serving adapter version of one device."""

    def __init__(self, model: PeftModel, store: AdapterStore, config: UpdaterConfig,
                 device_id: str, cloud_public_key: bytes, base_model_hash: str,
                 probe: Probe) -> None:
        self.model = model
        self.store = store
        self.config = config
        self.device_id = device_id
        self.public_key = cloud_public_key
        self.base_model_hash = base_model_hash
        self.probe = probe
        self._probe_cache: dict[int, float] = {}
        self.version = self._restore()

    def _restore(self) -> int:
        """Serve what CURRENT names; a fresh device stores its shipped adapter as version 0."""
        ptr = self.store.pointer()
        if ptr is None:
            self.store.write(0, adapter_state(self.model))
            self.store.swap(Pointer(0, None))
            return 0
        if ptr.probation and ptr.previous is not None:
            log.warning("restart during an update's probation: back to the previous version",
                        extra={"version": ptr.version, "previous": ptr.previous})
            ptr = Pointer(ptr.previous, None)
            self.store.swap(ptr)
        load_adapter_state(self.model, self.store.read(ptr.version))
        return ptr.version

    def _accuracy(self, version: int) -> float:
        if version not in self._probe_cache:
            self._probe_cache[version] = self.probe()
        return self._probe_cache[version]

    def verify(self, header: UpdateHeader, payload: bytes) -> None:
        """Every check that precedes decoding; raises IntegrityError / IncompatibleUpdateError."""
        signing.verify_header(self.public_key, header)
        signing.verify_payload(header, payload)
        if header.device_id != self.device_id:
            raise IncompatibleUpdateError(f"update is for device {header.device_id!r}, "
                                          f"this is {self.device_id!r}")
        if header.base_model_hash != self.base_model_hash:
            raise IncompatibleUpdateError(
                f"update base model {header.base_model_hash[:16]!r} != ours "
                f"{self.base_model_hash[:16]!r}")
        if header.base_version != self.version:
            raise IncompatibleUpdateError(f"update applies on version {header.base_version}, "
                                          f"this device serves {self.version}")
        if header.version <= header.base_version:
            raise IncompatibleUpdateError(f"update version {header.version} does not advance "
                                          f"base {header.base_version}")

    def apply(self, header: UpdateHeader, payload: bytes) -> UpdateAck:
        """Verify, apply, probe; returns the acknowledgement to send (never raises CdcaError)."""
        try:
            self.verify(header, payload)
            codec = CODECS.build(header.codec, {})
            current = adapter_state(self.model)
            new_state = codec.decode(payload, current)
        except CdcaError as e:  # ConfigError (unknown codec) included
            log.warning("update rejected", extra={"version": header.version, "reason": str(e),
                                                 "payload_bytes": len(payload)})
            return UpdateAck(header.version, "rejected", detail=str(e)[:1024])
        previous = self.version
        before = self._accuracy(previous)
        self.store.write(header.version, new_state)
        _fault_point("adapter-written")
        self.store.swap(Pointer(header.version, previous, probation=True))
        load_adapter_state(self.model, new_state)
        self.version = header.version
        after = self.probe()
        if after < before - self.config.rollback_margin:
            load_adapter_state(self.model, self.store.read(previous))
            self.store.swap(Pointer(previous, None))
            self.version = previous
            log.warning("update rolled back", extra={"version": header.version,
                                                     "probe": after, "previous_probe": before,
                                                     "payload_bytes": len(payload)})
            return UpdateAck(header.version, "rolled_back", after, before,
                             f"probe accuracy {after:.3f} < {before:.3f} - margin "
                             f"{self.config.rollback_margin}")
        self.store.swap(Pointer(header.version, previous))
        _fault_point("adapter-swapped")
        self._probe_cache[header.version] = after
        log.info("update applied", extra={"version": header.version, "probe": after,
                                          "previous_probe": before,
                                          "payload_bytes": len(payload)})
        return UpdateAck(header.version, "applied", after, before)

    def owed_acks(self) -> list[UpdateAck]:
        """The serving version's "applied" ack when the cloud never confirmed it (a crash took
        it); re-sending is harmless, the cloud records an ack idempotently."""
        path = self.store.dir / ACKED
        confirmed = json.loads(path.read_text())["version"] if path.exists() else 0
        if self.version == confirmed:
            return []
        return [UpdateAck(self.version, "applied",
                          detail="serving since before a restart; acknowledgement re-sent")]

    def delivered(self, ack: UpdateAck, recorded_version: int) -> None:
        """The cloud answered `ack` and now records `recorded_version` for this device."""
        if ack.outcome != "applied" or recorded_version != ack.version:
            return
        path = self.store.dir / ACKED
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"version": ack.version}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
