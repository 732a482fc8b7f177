"""The real cloud-server: SIGKILL after acknowledging loses nothing and the interrupted
distillation job resumes from its checkpoint; SIGTERM drains an in-flight upload."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.trainers import TinyKdConfig, TinyKdTrainer
from shared.codec import CODECS
from shared.types import UploadSample, VisualTokens
from shared.wire import convert
from tests.cloud.client import Device, batch, code_of, tokens_sample
from tests.cloud.daemon import rows, start_cloud

pytestmark = pytest.mark.integration

SLOW = {"steps": 40, "checkpoint_every": 2, "step_pause_s": 0.1}


class _Direct:
    job_id = "expected"

    def restore(self) -> None:
        return None

    def checkpoint(self, step: int, tensors: object) -> None:
        pass


def _wait(predicate: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def test_sigkill_after_ack_loses_nothing_and_the_job_resumes(tmp_path: Path) -> None:
    server = start_cloud(tmp_path, worker={"trainer_options": SLOW})
    try:
        with grpc.insecure_channel(server.address) as ch:
            dev = Device(ch, "cam-01").register()
            first = [tokens_sample(f"s{i}", seed=i) for i in range(4)]
            assert dev.upload("u1", batch(*first)).stored_samples == 4  # starts a round
            _wait(lambda: (rows(tmp_path, "SELECT MAX(step) FROM jobs")[0][0] or 0) >= 6)
            late = dev.upload("u2", batch(tokens_sample("s9", seed=9), tokens_sample("s8", seed=8)))
            assert late.stored_samples == 2
            token = dev.token
        server.stop(signal.SIGKILL)  # no drain, no close: as if the machine died
    finally:
        server.stop(signal.SIGKILL)
    (state, step, attempts), = rows(tmp_path, "SELECT state, step, attempts FROM jobs")
    assert state == "running" and 0 < step < 40 and attempts == 1

    server = start_cloud(tmp_path, worker={"trainer_options": SLOW | {"step_pause_s": 0.0}})
    try:
        with grpc.insecure_channel(server.address) as ch:
            dev = Device(ch, "cam-01")
            dev.token = token
            _wait(lambda: dev.status().latest_version == 1)
            status = dev.status()
            assert (status.stored_samples, status.pending_samples, status.rounds) == (6, 2, 1)
            found = dev.get_update(0)
            assert found is not None
    finally:
        server.stop(signal.SIGKILL)
    (state, attempts), = rows(tmp_path, "SELECT state, attempts FROM jobs")
    (metrics,), = rows(tmp_path, "SELECT metrics FROM updates")
    assert (state, attempts) == ("done", 2)
    assert json.loads(metrics)["resumed_at_step"] == step
    # The resumed round is bit-identical to one that was never interrupted.
    trainer = TinyKdTrainer(TinyKdConfig(**SLOW | {"step_pause_s": 0.0}))
    stored = [_through_the_wire(s) for s in first]
    adapter = trainer.train(trainer.initial_adapter(), stored, _Direct()).adapter
    expected = CODECS.build("dwc", {}).encode(adapter, trainer.initial_adapter(), None).payload
    assert found[1] == expected


def _through_the_wire(sample: UploadSample) -> UploadSample:
    """What the cloud stores of a sample: the same arrays, decoded from the wire."""
    got = convert.decode_sample_batch(convert.encode_sample_batch(batch(sample)),
                                      convert.UploadLimits()).samples[0]
    assert got.tokens is not None and isinstance(got.tokens, VisualTokens)
    assert np.array_equal(got.tokens.values, sample.tokens.values)  # type: ignore[union-attr]
    return got


def _chunks_with_a_gate(payload: bytes, gate: threading.Event,
                        sent_first: threading.Event) -> Iterator[object]:
    for i, chunk in enumerate(convert.upload_chunks("slow-1", payload)):
        if i == 1:
            sent_first.set()
            gate.wait(30)
        yield chunk


def test_sigterm_drains_an_in_flight_upload_while_not_serving(tmp_path: Path) -> None:
    server = start_cloud(tmp_path)
    big = batch(*[tokens_sample(f"s{i}", k=8192, seed=i) for i in range(3)])  # 1.5 MiB: 2 chunks
    payload = convert.encode_sample_batch(big)
    assert len(payload) > 1024 * 1024
    try:
        with grpc.insecure_channel(server.address) as ch:
            dev = Device(ch, "cam-01").register()
            health = health_pb2_grpc.HealthStub(ch)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="cdca.v1.SyncService"),
                                 timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            gate, sent_first = threading.Event(), threading.Event()
            future = dev.stub.UploadSamples.future(
                _chunks_with_a_gate(payload, gate, sent_first), timeout=60,
                metadata=dev.metadata())
            assert sent_first.wait(30)
            time.sleep(0.5)  # let chunk 0 reach the handler
            server.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert code_of(dev.status) == grpc.StatusCode.UNAVAILABLE  # no new work
            gate.set()
            receipt = convert.receipt_from_pb(future.result(timeout=60))
            assert (receipt.stored_samples, receipt.duplicate) == (3, False)
        assert server.proc.wait(60) == 0
    finally:
        server.stop(signal.SIGKILL)
    server = start_cloud(tmp_path)
    try:
        with grpc.insecure_channel(server.address) as ch:
            dev = Device(ch, "cam-01").register()
            assert dev.status().stored_samples == 3
    finally:
        server.stop(signal.SIGKILL)
