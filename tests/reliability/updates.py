"""Signed updates for a device's own LoRA layout, published through the real cloud store.

The cloud's trainers produce adapters in their student's layout; these tests need updates for the
device's model (a tiny peft MLP, or the agent's tiny VLM) of a chosen size. So the test publishes
them with the store's own `publish` (real SQLite rows, real blob files, signed with the daemon's
key from its data directory) before the real `cloud-server` starts; the daemon then serves them
over GetUpdate and records the acknowledgements exactly as for a round of its worker.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from cloud.keys import load_or_create_signing_key
from cloud.store import Quota, SqliteStore
from cloud.store.base import NewUpdate
from cloud.trainers import TinyKdConfig, TinyKdTrainer
from shared import signing
from shared.codec import CODECS
from shared.types import UpdateHeader
from tests.cloud.client import batch, tokens_sample

CODEC = "dense-fp16"
"""Random deltas do not sparsify; dense float16 makes the payload size exact (2 bytes/param)."""


def cloud_base_model_hash(**trainer_options: object) -> str:
    """What the daemon (tiny-kd trainer with these options) announces at enrollment."""
    return TinyKdTrainer(TinyKdConfig(**trainer_options)).base_model_hash  # type: ignore[arg-type]


def mlp_device(width: int, rank: int, seed: int = 0) -> PeftModel:
    """A two-layer MLP with LoRA (r=`rank`) on both linears: 4 * width * rank adapter params."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=["0", "1"],
                                            init_lora_weights="gaussian"))
    return model


def chain(start: dict[str, torch.Tensor], n: int, scale: float = 1e-3,
          seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """`n` successive adapter states after `start`, each a small random step from the last."""
    g = torch.Generator().manual_seed(seed)
    out, cur = [], start
    for _ in range(n):
        cur = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in cur.items()}
        out.append(cur)
    return out


Published = tuple[UpdateHeader, bytes, dict[str, torch.Tensor]]


def publish_chain(data_dir: Path, device_id: str, states: list[dict[str, torch.Tensor]],
                  base_model_hash: str) -> list[Published]:
    """Publish updates 0->1->...->n for `device_id` (states[0] is version 0) with the daemon's
    key; returns (header, payload, what the device holds after applying it) per update.

    Run it while no daemon uses `data_dir` (opening the store sweeps unreferenced blobs).
    """
    store = SqliteStore(data_dir)
    key = load_or_create_signing_key(data_dir / "signing_key.pem")
    codec = CODECS.build(CODEC, {})
    out = []
    held = states[0]
    try:
        for i, new in enumerate(states[1:]):
            # publish() finishes a running job: claim one sample for it, as a round would
            store.put_upload(device_id, f"seed-{i}", bytes(32),
                             batch(tokens_sample(f"seed-{device_id}-{i}")), Quota())
            job = store.create_job(f"device:{device_id}", (device_id,), 1)
            assert job is not None
            store.start_job(job.job_id)
            encoded = codec.encode(new, held)
            (header,) = store.publish(job.job_id, [NewUpdate(
                device_id, i, CODEC, base_model_hash, encoded.payload, new,
                {k: torch.zeros_like(v) for k, v in new.items()})],
                lambda h: signing.sign_header(key, h))
            held = codec.decode(encoded.payload, held)
            out.append((header, encoded.payload, held))
    finally:
        store.close()
    return out


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and float32 bytes: equal digests = bit-identical adapters."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()
