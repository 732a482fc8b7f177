"""Outbox + uploader against real SQLite and a real gRPC servicer on loopback."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from device.outbox import Outbox, OutboxConfig
from device.sync.client import GrpcTransport
from device.sync.credentials import Credentials
from device.sync.uploader import BackoffConfig, Uploader
from shared.errors import ConfigError, StoreFullError
from shared.types import SampleBatch, UploadSample, VisualTokens
from shared.wire import convert
from tests.device.fake_cloud import FakeCloud


def _sample(i: int, k: int = 4) -> UploadSample:
    rng = np.random.default_rng(i)
    tokens = VisualTokens(
        values=rng.integers(-127, 128, size=(k, 16)).astype(np.int8),
        positions=np.arange(k, dtype=np.int64) * 3,
        grid=(8, 4, 4), feature_space="llava_onevision/vision_pooled",
        scales=rng.random(k).astype(np.float32),
    )
    return UploadSample(f"s-{i}", "video", "q?", "a", 0.25, tokens=tokens, meta={"i": str(i)})


def _batch(*ids: int) -> SampleBatch:
    return SampleBatch(3, tuple(_sample(i) for i in ids))


def _transport(cloud: FakeCloud) -> GrpcTransport:
    creds = Credentials("cam-01", "tok", b"\0" * 32, "")
    return GrpcTransport(grpc.insecure_channel(cloud.address), 5.0, creds)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="full_policy"):
        OutboxConfig(full_policy="ignore")
    with pytest.raises(ConfigError, match="max_bytes"):
        OutboxConfig(max_bytes=0)


def test_grouping_is_stable_and_survives_reopen(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", OutboxConfig(batch_samples=2))
    ob.enqueue(_batch(0, 1, 2), cursor=("src", 3))
    first = ob.next_upload()
    assert first is not None and first.samples == 2
    ob.close()
    ob = Outbox(tmp_path / "o.db", OutboxConfig(batch_samples=2))  # "restart"
    again = ob.next_upload()
    assert again == first  # same id and bytes: the cloud can deduplicate
    assert ob.cursor("src") == 3 and ob.depth() == (1, 2)


def test_drop_oldest_is_counted(tmp_path: Path) -> None:
    one = len(convert.encode_sample_batch(_batch(0)))
    ob = Outbox(tmp_path / "o.db", OutboxConfig(max_bytes=int(one * 2.5)))
    for i in range(4):
        ob.enqueue(_batch(i))
    c = ob.counters()
    assert c["enqueued"] == 4 and c["dropped_oldest"] == 2 and ob.depth() == (2, 0)
    assert ob.stored_bytes() <= int(one * 2.5)


def test_reject_new_is_counted_and_raises(tmp_path: Path) -> None:
    one = len(convert.encode_sample_batch(_batch(0)))
    ob = Outbox(tmp_path / "o.db", OutboxConfig(max_bytes=int(one * 1.5), full_policy="reject_new"))
    ob.enqueue(_batch(0))
    with pytest.raises(StoreFullError, match="rejected 1"):
        ob.enqueue(_batch(1), cursor=("src", 2))
    assert ob.counters()["rejected_new"] == 1 and ob.cursor("src") == 2
    # a sample larger than the whole budget is refused (counted), never evicting the others
    big = Outbox(tmp_path / "b.db", OutboxConfig(max_bytes=int(one * 1.5)))
    big.enqueue(_batch(0))
    with pytest.raises(StoreFullError):
        big.enqueue(_batch(1, 2))
    assert big.counters()["rejected_new"] == 2 and big.depth() == (1, 0)


def test_outage_and_lost_receipt_deliver_each_sample_once(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", OutboxConfig(batch_samples=3))
    ob.enqueue(_batch(*range(7)))
    with FakeCloud() as cloud:
        cloud.state.fail_next_uploads = 2
        cloud.state.lose_next_receipts = 1
        stop = threading.Event()
        up = Uploader(ob, _transport(cloud), BackoffConfig(base_s=0.01, max_s=0.05), stop, seed=0)
        up.drain()
        ids = [s.sample_id for s in cloud.state.samples]
        assert sorted(ids) == sorted(f"s-{i}" for i in range(7))
        assert len(ids) == len(set(ids))
        c = ob.counters()
        assert c["uploaded_samples"] == 7 and c["duplicates"] == 1 and ob.depth() == (0, 0)
        # int8 tokens and scales arrive bit-exact
        got = {s.sample_id: s for s in cloud.state.samples}["s-5"].tokens
        want = _sample(5).tokens
        assert np.array_equal(got.values, want.values) and np.array_equal(got.scales, want.scales)


def test_backoff_grows_with_jitter() -> None:
    b = BackoffConfig(base_s=1.0, max_s=8.0, jitter=0.5)
    rng = random.Random(0)
    d = [b.delay_s(a, rng) for a in range(6)]
    assert 0.5 <= d[0] <= 1.0 and 4.0 <= d[5] <= 8.0
    assert len({round(x, 6) for x in d}) == 6
