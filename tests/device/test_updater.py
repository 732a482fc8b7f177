"""Downlink on the device: signed DWC deltas applied atomically, tampering rejected, rollback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from device.compress import COMPRESSORS
from device.runtime.adapter_store import AdapterStore, Pointer
from device.runtime.inference import DeviceInference
from device.runtime.loader import StudentConfig, adapter_state, load_student
from device.sync.updater import AdapterUpdater, UpdaterConfig
from shared import signing
from shared.codec import CODECS
from shared.media import procedural as P
from shared.types import UpdateHeader

KEY = signing.generate_private_key()
PUB = signing.public_key_bytes(KEY)


def _signed(payload: bytes, base: int, version: int, device: str = "cam-01",
            key=KEY) -> UpdateHeader:  # noqa: ANN001
    h = UpdateHeader(base, version, "dwc", "", signing.payload_digest(payload), len(payload),
                     device)
    return dataclasses.replace(h, signature=signing.sign_header(key, h))


@pytest.fixture
def rig(tiny_ckpt: Path, tmp_path: Path):
    st = load_student(StudentConfig(tiny_ckpt))
    inf = DeviceInference(st, COMPRESSORS.build("vidcom2", {}), 3)
    probe_set = P.batch("source", 6, seed=99)
    first = inf.run([s.frames for s in probe_set], [s.question for s in probe_set],
                    [s.sample_id for s in probe_set])
    labels = [r.answer for r in first]  # what version 0 answers: its probe accuracy is 1.0

    def probe() -> float:
        res = inf.run([s.frames for s in probe_set], [s.question for s in probe_set],
                      [s.sample_id for s in probe_set])
        return sum(r.answer == y for r, y in zip(res, labels, strict=True)) / len(labels)

    up = AdapterUpdater(st.model, AdapterStore(tmp_path / "adapters"), UpdaterConfig(0.2),
                        "cam-01", PUB, "", probe)
    return st, up


def _delta(state: dict[str, torch.Tensor], scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    new = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}
    enc = CODECS.build("dwc", {"energy_share": 1.0}).encode(new, state)
    return new, enc.payload


def test_small_update_applies_and_persists(rig, tmp_path: Path) -> None:
    st, up = rig
    v0 = adapter_state(st.model)
    new, payload = _delta(v0, 1e-4)
    ack = up.apply(_signed(payload, 0, 1), payload)
    assert ack.outcome == "applied" and ack.probe_accuracy == 1.0 and up.version == 1
    now = adapter_state(st.model)
    assert max(float((now[k] - new[k]).abs().max()) for k in new) < 1e-5
    ptr = up.store.pointer()
    assert ptr == Pointer(1, 0, False) and up.store.versions() == [0, 1]
    # a restart serves version 1 from disk
    st2 = load_student(StudentConfig(st.checkpoint_dir))
    up2 = AdapterUpdater(st2.model, AdapterStore(tmp_path / "adapters"), UpdaterConfig(),
                         "cam-01", PUB, "", lambda: 1.0)
    assert up2.version == 1
    assert all(torch.equal(adapter_state(st2.model)[k], now[k]) for k in now)


@pytest.mark.parametrize("tamper", ["bad_signature", "other_key", "wrong_base", "flipped_byte",
                                    "other_device", "truncated"])
def test_tampered_update_is_rejected_and_old_adapter_serves(rig, tamper: str) -> None:
    st, up = rig
    v0 = adapter_state(st.model)
    _, payload = _delta(v0, 1e-3)
    header = _signed(payload, 0, 1)
    if tamper == "bad_signature":
        sig = bytearray(header.signature)
        sig[5] ^= 1
        header = dataclasses.replace(header, signature=bytes(sig))
    elif tamper == "other_key":
        header = _signed(payload, 0, 1, key=signing.generate_private_key())
    elif tamper == "wrong_base":
        header = _signed(payload, 7, 8)
    elif tamper == "flipped_byte":
        raw = bytearray(payload)
        raw[len(raw) // 2] ^= 0x40
        payload = bytes(raw)
    elif tamper == "other_device":
        header = _signed(payload, 0, 1, device="cam-02")
    elif tamper == "truncated":
        payload = payload[:-3]
    ack = up.apply(header, payload)
    assert ack.outcome == "rejected" and ack.detail
    assert up.version == 0 and up.store.pointer() == Pointer(0, None)
    after = adapter_state(st.model)
    assert all(torch.equal(after[k], v0[k]) for k in v0)


def test_regression_rolls_back(rig) -> None:
    st, up = rig
    v0 = adapter_state(st.model)
    _, payload = _delta(v0, 3.0, seed=1)  # a large random update breaks the answers
    ack = up.apply(_signed(payload, 0, 1), payload)
    assert ack.outcome == "rolled_back"
    assert ack.previous_probe_accuracy == 1.0 and ack.probe_accuracy < 0.8
    assert up.version == 0 and up.store.pointer() == Pointer(0, None)
    after = adapter_state(st.model)
    assert all(torch.equal(after[k], v0[k]) for k in v0)


def test_restart_during_probation_goes_back(rig, tmp_path: Path) -> None:
    st, up = rig
    v0 = adapter_state(st.model)
    new, _ = _delta(v0, 1e-3)
    up.store.write(1, new)
    up.store.swap(Pointer(1, 0, probation=True))  # as if killed before the probe verdict
    up2 = AdapterUpdater(st.model, up.store, UpdaterConfig(), "cam-01", PUB, "", lambda: 1.0)
    assert up2.version == 0 and up.store.pointer() == Pointer(0, None)
    assert all(torch.equal(adapter_state(st.model)[k], v0[k]) for k in v0)
