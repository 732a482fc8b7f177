"""`device-agent run` as a real process receiving updates over gRPC: tampered updates are rejected
and the old adapter keeps serving, a regression is rolled back, a good update is applied.

The updates come from an in-test SyncService (tests/device/fake_cloud.py) that signs with its own
Ed25519 key (the one the device's credentials trust) and serves a scripted queue, tampered ones
included, which a correct cloud never sends.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from device.compress import COMPRESSORS
from device.runtime.inference import DeviceInference
from device.runtime.loader import StudentConfig, adapter_state, load_student
from device.settings import COMPRESSOR_DEFAULTS
from device.sync.credentials import Credentials
from shared import signing
from shared.codec import CODECS
from shared.media import procedural as P
from shared.types import UpdateHeader
from tests.device.fake_cloud import FakeCloud
from tests.device.tiny import write_checkpoint
from tests.integration.test_device_agent import _toml
from tests.support import BIN, ROOT, subprocess_env

pytestmark = pytest.mark.integration

KEY = signing.generate_private_key()


def _header(payload: bytes, base: int, version: int, key=KEY) -> UpdateHeader:  # noqa: ANN001
    h = UpdateHeader(base, version, "dwc", "", signing.payload_digest(payload), len(payload),
                     "cam-01")
    return dataclasses.replace(h, signature=signing.sign_header(key, h))


def _delta(v0: dict[str, torch.Tensor], scale: float, seed: int) -> tuple[dict, bytes]:
    g = torch.Generator().manual_seed(seed)
    new = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in v0.items()}
    return new, CODECS.build("dwc", {"energy_share": 1.0}).encode(new, v0).payload


def test_agent_rejects_tampering_rolls_back_regression_applies_good(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "student")
    st = load_student(StudentConfig(ckpt))
    st.model.save_pretrained(ckpt / "adapter")  # the shipped adapter (version 0)
    v0 = adapter_state(st.model)
    # labelled probe set: what version 0 answers, so its probe accuracy is 1.0
    probe = tmp_path / "probe"
    probe.mkdir()
    items = P.batch("source", 6, seed=77)
    # the probe's answers are version 0's as the agent serves them (its default compressor)
    inf = DeviceInference(st, COMPRESSORS.build("vidcom2", COMPRESSOR_DEFAULTS["vidcom2"]), 3)
    answers = inf.run([s.frames for s in items], [s.question for s in items],
                      [s.sample_id for s in items])
    lines = []
    for s, r in zip(items, answers, strict=True):
        np.save(probe / f"{s.sample_id}.npy", s.frames.numpy())
        lines.append(json.dumps({"id": s.sample_id, "media": f"{s.sample_id}.npy",
                                 "question": s.question, "answer": r.answer}))
    (probe / "questions.jsonl").write_text("\n".join(lines) + "\n")

    good, good_payload = _delta(v0, 1e-4, 1)
    _, bad_payload = _delta(v0, 3.0, 2)
    flipped = bytearray(good_payload)
    flipped[len(flipped) // 2] ^= 0x10
    forged = _header(good_payload, 0, 1, key=signing.generate_private_key())
    queue = [
        (forged, good_payload),                                   # signed by someone else
        (_header(good_payload, 3, 4), good_payload),              # wrong base version
        (_header(good_payload, 0, 1), bytes(flipped)),            # flipped byte in transit
        (_header(bad_payload, 0, 1), bad_payload),                # valid but regresses
        (_header(good_payload, 0, 1), good_payload),              # valid and fine
    ]
    data = tmp_path / "dev"
    with FakeCloud() as cloud:
        cloud.state.update_queue = list(queue)
        Credentials("cam-01", "tok", signing.public_key_bytes(KEY), "").save(data)
        cfg = _toml(tmp_path / "device.toml", {
            "device_id": "cam-01", "data_dir": str(data), "cloud_address": cloud.address,
            "insecure": True, "rpc_timeout_s": 10.0, "progress": False,
            "model": {"checkpoint_dir": str(ckpt), "batch_size": 2, "max_new_tokens": 3},
            "input": {"domains": ["source"], "seed": 5, "limit": 120},
            "sampler_options": {"calibration_quantile": 0.05},
            "uplink": {"calibration_samples": 8},
            "updates": {"poll_interval_s": 0.05, "probe_folder": str(probe),
                        "rollback_margin": 0.2},
        })
        proc = subprocess.run([str(BIN / "device-agent"), "run", "--config", str(cfg)],
                              capture_output=True, text=True, timeout=600, env=subprocess_env(),
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        acks = list(cloud.state.acks)
    outcomes = [a.outcome for a in acks]
    assert outcomes == ["rejected", "rejected", "rejected", "rolled_back", "applied"], outcomes
    assert "signature" in acks[0].detail and "version 3" in acks[1].detail
    assert "sha256" in acks[2].detail
    assert acks[3].previous_probe_accuracy == 1.0 and acks[3].probe_accuracy < 0.8
    assert acks[4].probe_accuracy >= 0.8
    served = [json.loads(x)["adapter_version"] for x in
              (data / "answers.jsonl").read_text().splitlines()]
    assert served[0] == 0 and served[-1] == 1 and served == sorted(served)
    current = json.loads((data / "adapters" / "CURRENT").read_text())
    assert current == {"version": 1, "previous": 0, "probation": False}
    v1 = load_file(str(data / "adapters" / "v0000000001.safetensors"))
    assert max(float((v1[k] - good[k]).abs().max()) for k in good) < 1e-5
    assert json.loads(proc.stdout.splitlines()[-1])["adapter_version"] == 1
    # the upload threshold was recalibrated for the adapter now serving
    assert json.loads((data / "calibration.json").read_text())["adapter_version"] == 1
