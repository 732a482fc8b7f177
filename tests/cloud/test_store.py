"""SqliteStore: atomic blob+row writes, dedup, quotas, orphan sweep, jobs, versions, acks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cloud.store import NewUpdate, Quota, SqliteStore
from cloud.store import files as store_files
from shared.errors import NotFoundError, PermissionDeniedError, StoreFullError, WireFormatError
from shared.types import UpdateAck
from tests.cloud.client import batch, tokens_sample

SHA_A, SHA_B = b"a" * 32, b"b" * 32


def _blobs(root: Path, kind: str = "uploads") -> list[Path]:
    return sorted((root / "blobs" / kind).iterdir())


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteStore(tmp_path)
    s.enroll("cam-01", "t1", "", "")
    s.enroll("cam-02", "t2", "", "")
    s.set_initial_adapter({"w": torch.zeros(4, 3)})
    yield s
    s.close()


def test_upload_roundtrips_and_deduplicates(store: SqliteStore, tmp_path: Path) -> None:
    b = batch(tokens_sample("s1", seed=1), tokens_sample("s2", seed=2))
    first = store.put_upload("cam-01", "u1", SHA_A, b, Quota())
    assert (first.stored_samples, first.duplicate, first.pending_samples) == (2, False, 2)
    again = store.put_upload("cam-01", "u1", SHA_A, b, Quota())
    assert (again.stored_samples, again.duplicate, again.pending_samples) == (2, True, 2)
    assert len(_blobs(tmp_path)) == 1  # the duplicate's blob was removed again
    with pytest.raises(WireFormatError, match="different payload"):
        store.put_upload("cam-01", "u1", SHA_B, b, Quota())
    # Same sample ids in a new upload are not stored twice; another device may reuse them.
    third = store.put_upload("cam-01", "u2", SHA_B, batch(tokens_sample("s2"), tokens_sample("s3")),
                             Quota())
    assert (third.stored_samples, third.pending_samples) == (1, 3)
    assert store.put_upload("cam-02", "u1", SHA_A, b, Quota()).stored_samples == 2
    job = store.create_job("device:cam-01", ("cam-01",), 10)
    assert job is not None
    got = store.job_samples(job.job_id)
    assert [s.sample_id for s in got] == ["s1", "s2", "s3"]
    want = tokens_sample("s1", seed=1)
    assert got[0].question == want.question and got[0].tokens is not None
    assert (got[0].tokens.values == want.tokens.values).all()  # type: ignore[union-attr]
    assert got[0].tokens.grid == want.tokens.grid  # type: ignore[union-attr]


def test_quota_refuses_and_stores_nothing(store: SqliteStore, tmp_path: Path) -> None:
    store.put_upload("cam-01", "u1", SHA_A, batch(tokens_sample("s1")), Quota(2))
    with pytest.raises(StoreFullError, match="quota of 2"):
        store.put_upload("cam-01", "u2", SHA_B,
                         batch(tokens_sample("s2"), tokens_sample("s3")), Quota(2))
    with pytest.raises(StoreFullError, match="pending bytes"):
        store.put_upload("cam-01", "u3", SHA_B, batch(tokens_sample("s4")), Quota(10, 100))
    assert store.status("cam-01").stored_samples == 1
    assert len(_blobs(tmp_path)) == 1 and store.find_upload("cam-01", "u2") is None


def test_failed_transaction_leaves_no_blob(store: SqliteStore, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(sample: object) -> str:
        raise OSError("disk went away")

    monkeypatch.setattr(store_files, "sample_row", boom)
    with pytest.raises(OSError):
        store.put_upload("cam-01", "u1", SHA_A, batch(tokens_sample("s1")), Quota())
    assert _blobs(tmp_path) == [] and store.status("cam-01").stored_samples == 0


def test_restart_sweeps_orphans_of_an_interrupted_write(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path)
    s.enroll("cam-01", "t1", "", "")
    s.put_upload("cam-01", "u1", SHA_A, batch(tokens_sample("s1")), Quota())
    kept = _blobs(tmp_path)
    s.close()
    # What a SIGKILL between "blob renamed" and "row committed" leaves behind:
    (tmp_path / "blobs" / "uploads" / "deadbeef.safetensors").write_bytes(b"x")
    (tmp_path / "blobs" / "updates" / "half.dwc.tmp").write_bytes(b"x")
    s = SqliteStore(tmp_path)
    assert _blobs(tmp_path) == kept and _blobs(tmp_path, "updates") == []
    assert s.status("cam-01").stored_samples == 1
    s.close()


def _publish(store: SqliteStore, device: str, base_version: int, value: float) -> int:
    job = store.create_job(f"device:{device}", (device,), 10)
    assert job is not None
    store.start_job(job.job_id)
    update = NewUpdate(device, base_version, "dwc", "ab", b"payload%f" % value,
                       {"w": torch.full((4, 3), value)}, {"w": torch.zeros(4, 3)})
    (header,) = store.publish(job.job_id, [update], lambda h: b"s" * 64)
    return header.version


def test_versions_are_owned_and_acks_move_the_head(store: SqliteStore) -> None:
    store.put_upload("cam-01", "u1", SHA_A, batch(tokens_sample("s1")), Quota())
    v1 = _publish(store, "cam-01", 0, 1.0)
    store.put_upload("cam-01", "u2", SHA_A, batch(tokens_sample("s2")), Quota())
    v2 = _publish(store, "cam-01", v1, 2.0)
    assert (v1, v2) == (1, 2) and store.head("cam-01").version == v2
    found = store.update_for("cam-01", 0)
    assert found is not None and found[0].version == v1 and found[1] == b"payload1.000000"
    assert store.update_for("cam-01", v2) is None
    with pytest.raises(PermissionDeniedError):
        store.update_for("cam-02", v1)
    with pytest.raises(PermissionDeniedError):
        store.record_ack("cam-02", UpdateAck(v1, "applied"))
    with pytest.raises(NotFoundError):
        store.record_ack("cam-01", UpdateAck(99, "applied"))
    assert store.record_ack("cam-01", UpdateAck(v1, "applied")) == v1
    # Rolling back v1 abandons v2 (built on it): the head returns to version 0.
    assert store.record_ack("cam-01", UpdateAck(v1, "rolled_back")) == 0
    head = store.head("cam-01")
    assert head.version == 0 and head.residual is None and float(head.target["w"].sum()) == 0.0
    assert store.update_for("cam-01", v1) is None


def test_checkpoints_replace_each_other(store: SqliteStore, tmp_path: Path) -> None:
    store.put_upload("cam-01", "u1", SHA_A, batch(tokens_sample("s1")), Quota())
    job = store.create_job("device:cam-01", ("cam-01",), 10)
    assert job is not None and store.load_checkpoint(job.job_id) is None
    store.save_checkpoint(job.job_id, 3, {"p": torch.ones(2)})
    store.save_checkpoint(job.job_id, 6, {"p": torch.full((2,), 2.0)})
    step, tensors = store.load_checkpoint(job.job_id)  # type: ignore[misc]
    assert step == 6 and tensors["p"].tolist() == [2.0, 2.0]
    assert len(_blobs(tmp_path, "jobs")) == 1
    assert store.status("cam-01").pending_samples == 1  # claimed by an open job: still pending
    assert store.pending_by_device() == {}  # ... but not claimable by another job
