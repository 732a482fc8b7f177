"""DistillWorker with the tiny trainer: rounds, DWC error feedback, signing, resume after a stop."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cloud.metrics import Metrics
from cloud.settings import WorkerSettings
from cloud.store import Quota, SqliteStore
from cloud.trainers import JobContext, TinyKdConfig, TinyKdTrainer, TrainResult
from cloud.worker import DistillWorker
from shared import signing
from shared.codec import CODECS
from shared.types import UploadSample
from tests.cloud.client import batch, tokens_sample

CODEC = {"energy_share": 0.99}
KEY = signing.generate_private_key()
TINY = TinyKdConfig(steps=20, checkpoint_every=5)


def _worker(root: Path, trainer: object = None, **options: object) -> DistillWorker:
    store = SqliteStore(root)
    for d in ("cam-01", "cam-02"):
        store.enroll(d, f"token-{d}", "", "")
    settings = WorkerSettings(**{"threshold_samples": 4, "schedule_s": None, **options})
    return DistillWorker(store, trainer or TinyKdTrainer(TINY), CODECS.build("dwc", CODEC), "dwc",
                         KEY, settings, Metrics())


def _upload(w: DistillWorker, device: str, first: int, n: int = 4) -> None:
    samples = [tokens_sample(f"s{i}", seed=i) for i in range(first, first + n)]
    w._store.put_upload(device, f"u{first}", b"x" * 32, batch(*samples), Quota())


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in a)
    return (num / den) ** 0.5


class _NoCheckpoints:
    job_id = "direct"

    def restore(self) -> None:
        return None

    def checkpoint(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        pass


def test_round_publishes_a_signed_update_that_decodes_to_the_trained_adapter(
        tmp_path: Path) -> None:
    w = _worker(tmp_path)
    _upload(w, "cam-01", 0, 3)
    assert w.run_once() == 0  # below the threshold: nothing runs
    _upload(w, "cam-01", 3, 1)
    assert w.run_once() == 1
    header, payload = w._store.update_for("cam-01", 0)  # type: ignore[misc]
    signing.verify_header(signing.public_key_bytes(KEY), header)
    signing.verify_payload(header, payload)
    assert (header.base_version, header.version, header.device_id) == (0, 1, "cam-01")
    trainer = TinyKdTrainer(TINY)
    initial = trainer.initial_adapter()
    samples = [tokens_sample(f"s{i}", seed=i) for i in range(4)]
    expected = trainer.train(initial, samples, _NoCheckpoints()).adapter
    decoded = CODECS.build("dwc", CODEC).decode(payload, initial)
    delta = {k: expected[k] - initial[k] for k in initial}
    assert _rel({k: decoded[k] - initial[k] for k in initial}, delta) < 0.15
    status = w._store.status("cam-01")
    assert (status.pending_samples, status.rounds, status.latest_version) == (0, 1, 1)


def test_quiet_period_turns_a_burst_of_uploads_into_one_round(tmp_path: Path,
                                                               monkeypatch) -> None:
    w = _worker(tmp_path, quiet_s=60.0, max_samples_per_job=12)
    _upload(w, "cam-01", 0)
    assert w.run_once() == 0  # due, but the device is still uploading
    _upload(w, "cam-01", 4)
    assert w._store.pending_by_device()["cam-01"].samples == 8
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    assert w.run_once() == 1
    assert w._store.status("cam-01").pending_samples == 0  # both uploads in the one round
    monkeypatch.undo()
    for first in (8, 12, 16):
        _upload(w, "cam-01", first)
    assert w.run_once() == 1  # a full job does not wait for the quiet period


class _Wrapping:
    """A trainer that delegates to a tiny one; subclasses change `train`."""

    def __init__(self, inner: TinyKdTrainer) -> None:
        self.inner = inner
        self.base_model_hash = inner.base_model_hash

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        return self.inner.initial_adapter()

    def check_sample(self, sample: UploadSample) -> None:
        self.inner.check_sample(sample)


class _Withholding(_Wrapping):
    """The tiny trainer, but every round fails a check before publishing."""

    def __init__(self) -> None:
        super().__init__(TinyKdTrainer(TINY))

    def train(self, adapter: dict[str, torch.Tensor], samples: Sequence[UploadSample],
              ctx: JobContext) -> TrainResult:
        result = self.inner.train(adapter, samples, ctx)
        checks = {"source_acc_before": 0.9, "source_acc_after": 0.8}
        return TrainResult(result.adapter, {**result.metrics, **checks},
                           withheld="source accuracy fell")


def test_withheld_round_consumes_its_samples_and_publishes_nothing(tmp_path: Path) -> None:
    w = _worker(tmp_path, trainer=_Withholding())
    _upload(w, "cam-01", 0)
    assert w.run_once() == 0
    status = w._store.status("cam-01")
    assert (status.pending_samples, status.rounds, status.latest_version) == (0, 1, 0)
    assert w._store.update_for("cam-01", 0) is None
    assert w._store.open_jobs() == []
    assert w.run_once() == 0  # nothing left to distil
    exported = w._metrics.registry.get_sample_value
    assert exported("cdca_distill_check", {"check": "source_accuracy", "point": "before"}) == 0.9
    assert exported("cdca_distill_check", {"check": "source_accuracy", "point": "after"}) == 0.8
    assert exported("cdca_distill_rounds_total", {"outcome": "withheld"}) == 1.0


def test_error_feedback_keeps_the_device_mirror_at_target_minus_residual(tmp_path: Path) -> None:
    w = _worker(tmp_path)
    codec = CODECS.build("dwc", CODEC)
    device = w._trainer.initial_adapter()
    for first in (0, 4):
        _upload(w, "cam-01", first)
        assert w.run_once() == 1
        head = w._store.head("cam-01")
        header, payload = w._store.update_for("cam-01", head.version - 1 if first else 0)  # type: ignore[misc]
        device = codec.decode(payload, device)
        assert head.residual is not None
        for k in device:  # what the device holds = the cloud's target minus the unsent residual
            torch.testing.assert_close(device[k], head.target[k] - head.residual[k],
                                       atol=1e-5, rtol=0)
    assert header.base_version == 1 and header.version == 2


def test_fleet_cohort_trains_once_and_encodes_per_device(tmp_path: Path) -> None:
    w = _worker(tmp_path, cohort="fleet")
    _upload(w, "cam-01", 0, 2)
    _upload(w, "cam-02", 10, 2)
    assert w.run_once() == 1
    a, b = w._store.update_for("cam-01", 0), w._store.update_for("cam-02", 0)
    assert a is not None and b is not None
    assert {a[0].device_id, b[0].device_id} == {"cam-01", "cam-02"} and a[0].version != b[0].version
    assert a[1] == b[1]  # same adapter, same base: same bytes, separately signed headers


class _StopAfter(_Wrapping):
    """Wraps a trainer; asks the worker to stop once a checkpoint at `step` is reached."""

    def __init__(self, inner: TinyKdTrainer, step: int) -> None:
        super().__init__(inner)
        self.step, self.worker = step, None

    def train(self, adapter: dict[str, torch.Tensor], samples: Sequence[UploadSample],
              ctx: JobContext) -> TrainResult:
        outer = self

        class Ctx:
            job_id = ctx.job_id

            def restore(self):  # type: ignore[no-untyped-def]
                return ctx.restore()

            def checkpoint(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
                if step >= outer.step:
                    outer.worker.request_stop()  # type: ignore[attr-defined]
                ctx.checkpoint(step, tensors)

        return self.inner.train(adapter, samples, Ctx())


def test_interrupted_job_resumes_from_its_checkpoint_bit_exactly(tmp_path: Path) -> None:
    straight = _worker(tmp_path / "a")
    _upload(straight, "cam-01", 0)
    assert straight.run_once() == 1
    want = straight._store.update_for("cam-01", 0)

    stopper = _StopAfter(TinyKdTrainer(TINY), 10)
    w = _worker(tmp_path / "b", stopper)
    stopper.worker = w  # type: ignore[assignment]
    _upload(w, "cam-01", 0)
    assert w.run_once() == 0
    (job,) = w._store.open_jobs()
    assert (job.state, job.step, job.attempts) == ("running", 10, 1)
    w._store.close()

    restarted = _worker(tmp_path / "b")  # a new process over the same data directory
    assert restarted.run_once() == 1
    got = restarted._store.update_for("cam-01", 0)
    assert got is not None and want is not None
    assert got[1] == want[1]  # same payload bytes as the uninterrupted round
    db = sqlite3.connect(tmp_path / "b" / "cloud.sqlite3")
    (metrics,), = db.execute("SELECT metrics FROM updates").fetchall()
    (attempts, state), = db.execute("SELECT attempts, state FROM jobs").fetchall()
    db.close()
    assert json.loads(metrics)["resumed_at_step"] == 10.0 and (attempts, state) == (2, "done")
    assert restarted._store.open_jobs() == []


class _Broken(TinyKdTrainer):
    def train(self, adapter, samples, ctx):  # type: ignore[no-untyped-def]
        raise RuntimeError("teacher fell over")


def test_a_failing_trainer_is_retried_then_the_job_fails(tmp_path: Path) -> None:
    w = _worker(tmp_path, _Broken(TINY), max_attempts=2)
    _upload(w, "cam-01", 0)
    assert w.run_once() == 0 and w.run_once() == 0
    assert w._store.open_jobs() == []
    assert w._store.status("cam-01").pending_samples == 0
    assert w._store.update_for("cam-01", 0) is None
