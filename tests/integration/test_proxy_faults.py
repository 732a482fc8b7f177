"""Uploads through a TCP proxy that cuts, refuses and stalls at random points.

The client retries each upload with the same id until it gets a receipt (what the device's outbox
does). Afterwards every acknowledged upload is stored exactly once and no sample is stored twice.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import grpc
import pytest

from shared.types import SampleBatch, UploadReceipt
from shared.wire import convert
from tests.cloud.client import Device, batch, tokens_sample
from tests.cloud.daemon import rows, start_cloud
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration


def test_random_cuts_refusals_and_stalls_lose_nothing(tmp_path: Path) -> None:
    cloud = start_cloud(tmp_path, worker={"enabled": False})
    proxy = FaultProxy(cloud.address, seed=7)
    rng = random.Random(7)
    try:
        token = Device(grpc.insecure_channel(cloud.address), "cam-proxy").register().token
        acked: set[str] = set()
        attempts = failures = 0
        for n in range(24):
            upload_id = f"u{n}"
            # 3 x 512 KiB of fp16 tokens: cuts land mid-stream, across chunks.
            b = batch(*(tokens_sample(f"{upload_id}-{i}", k=8192, d=32, seed=n * 3 + i)
                        for i in range(3)))
            while upload_id not in acked:
                attempts += 1
                fault = rng.choice(["cut", "cut", "refuse", "stall", "pass"])
                if fault == "cut":
                    proxy.cut_after(rng.randint(1, 3_000_000))
                elif fault == "refuse":
                    proxy.set_refuse()
                elif fault == "stall":
                    proxy.set_stall()
                else:
                    proxy.set_pass()
                channel = grpc.insecure_channel(proxy.address)
                device = Device(channel, "cam-proxy")
                device.token = token
                try:
                    receipt = (_stalled(device, upload_id, b) if fault == "stall"
                               else device.upload(upload_id, b))
                    acked.add(receipt.upload_id)
                except grpc.RpcError:
                    failures += 1
                finally:
                    proxy.set_pass()
                    channel.close()
        stored = rows(tmp_path, "SELECT upload_id FROM uploads WHERE device_id='cam-proxy'")
        samples = rows(tmp_path, "SELECT upload_id, idx FROM samples WHERE device_id='cam-proxy'")
    finally:
        proxy.close()
        cloud.stop(signal.SIGTERM)
    assert failures > 0 and proxy.stats.cuts > 0  # faults really happened
    assert sorted(u for (u,) in stored) == sorted(acked)
    assert len(samples) == len(set(samples)) == 3 * len(acked)


def _stalled(device: Device, upload_id: str, b: SampleBatch) -> UploadReceipt:
    # A short deadline: the stall must end in DEADLINE_EXCEEDED, not hang the test.
    reply = device.stub.UploadSamples(
        convert.upload_chunks(upload_id, convert.encode_sample_batch(b)), timeout=1.0,
        metadata=device.metadata())
    return convert.receipt_from_pb(reply)
