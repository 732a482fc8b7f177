"""The real cloud-server with the "akd" trainer on the test zoo, and a device built from the same
student checkpoint: version 0 is the same adapter on both sides, the device's projected tokens are
accepted, a round distils from the teacher, and the device verifies and applies the update to
within the DWC error of the cloud's target."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from cloud.labels import checkpoint_hash
from cloud.store.files import state_from_bytes
from cloud.trainers import TRAINERS, JobInterrupted
from cloud.trainers.akd import DEVICE_LORA_TARGETS
from device.compress import COMPRESSORS
from device.runtime.adapter_store import AdapterStore
from device.runtime.inference import DeviceInference
from device.runtime.loader import StudentConfig, adapter_state, load_student
from device.sampling.payload import pack_tokens
from device.sync.client import GrpcTransport
from device.sync.credentials import Credentials
from device.sync.updater import AdapterUpdater, UpdaterConfig
from shared.errors import WireFormatError
from shared.media import procedural as P
from shared.models.zoo import COMMITTED, ZooPaths, ensure_zoo
from shared.types import Enrollment, SampleBatch, UploadSample, VisualTokens
from shared.wire import convert
from tests.cloud.daemon import SECRET, start_cloud

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> ZooPaths:
    torch.set_num_threads(1)
    return ensure_zoo("test", cache_dir=tmp_path_factory.mktemp("zoo"), evaluate_after=False)


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


def test_version_zero_and_sample_checks_match_the_device(zoo: ZooPaths, tmp_path: Path) -> None:
    defaults = StudentConfig(zoo.student)
    assert DEVICE_LORA_TARGETS == defaults.lora_targets
    cloud = TRAINERS.build("akd", {"student_dir": str(zoo.student),
                                   "teacher_dir": str(zoo.teacher),
                                   "work_dir": str(tmp_path / "akd")})
    device = adapter_state(load_student(defaults).model)
    v0 = cloud.initial_adapter()
    assert v0.keys() == device.keys() and len(v0) > 0
    assert all(torch.equal(v0[k], device[k]) for k in v0)  # bit for bit
    assert any(float(v.abs().sum()) > 0 for v in v0.values())  # the A matrices are drawn
    assert cloud.base_model_hash == checkpoint_hash(zoo.student)

    width = int(load_student(defaults).model.get_input_embeddings().embedding_dim)

    def upload(space: str, d: int, grid: tuple[int, int, int] = (1, 1, 2)) -> UploadSample:
        return UploadSample("s", "video", "q?", "", 0.1, tokens=VisualTokens(
            np.zeros((2, d), np.float16), np.arange(2), grid, space))

    cloud.check_sample(upload("projected", width))
    with pytest.raises(WireFormatError, match="feature_space"):
        cloud.check_sample(upload("vision", width))
    with pytest.raises(WireFormatError, match="width"):
        cloud.check_sample(upload("projected", width + 1))
    # a grid larger than the student's visual block: positions the models never saw
    with pytest.raises(WireFormatError, match="tokens.grid"):
        cloud.check_sample(upload("projected", width, (64, 3, 3)))


class _Ctx:
    """In-memory JobContext that stops the round at its `stop_at`-th checkpoint."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.job_id = "job-1"
        self.saved: tuple[int, dict[str, torch.Tensor]] | None = None
        self.steps: list[int] = []
        self.stop_at = stop_at

    def restore(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        return self.saved

    def checkpoint(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        self.saved = (step, {k: v.clone() for k, v in tensors.items()})
        self.steps.append(step)
        if len(self.steps) == self.stop_at:
            raise JobInterrupted("stopping")


def _blur_uploads(zoo: ZooPaths, n: int) -> list[UploadSample]:
    """What the device-agent uploads for `n` blur videos: its VidCom2-kept projected tokens."""
    student = load_student(StudentConfig(zoo.student))
    items = P.batch("blur", n, seed=5)
    results = DeviceInference(student, COMPRESSORS.build("vidcom2", {}), 3).run(
        [s.frames for s in items], [s.question for s in items], [s.sample_id for s in items])
    return [UploadSample(s.sample_id, "video", s.question, r.answer, 0.2, tokens=pack_tokens(
        r.features, r.record.keep, r.grid, "projected", "float16"))
        for s, r in zip(items, results, strict=True)]


def test_interrupted_round_resumes_from_its_checkpoint(zoo: ZooPaths, tmp_path: Path) -> None:
    trainer = TRAINERS.build("akd", {
        "student_dir": str(zoo.student), "teacher_dir": str(zoo.teacher),
        "work_dir": str(tmp_path / "akd"), "steps": 6, "batch_size": 2, "lr": 5e-3,
        "checkpoint_every": 2, "labelling": {"max_new_tokens": 4}})
    uploads = _blur_uploads(zoo, 3)
    start = trainer.initial_adapter()
    ctx = _Ctx(stop_at=2)
    with pytest.raises(JobInterrupted):
        trainer.train(start, uploads, ctx)
    assert ctx.steps == [2, 4] and ctx.saved is not None
    at_four = ctx.saved[1]
    assert any(not torch.equal(at_four[k], start[k]) for k in start)
    ctx.stop_at = None
    done = trainer.train(start, uploads, ctx)  # the worker passes the round's start adapter again
    assert ctx.steps == [2, 4, 6]
    assert done.metrics["start_step"] == 4.0 and done.metrics["label_hit_rate"] == 1.0
    assert done.adapter.keys() == start.keys()
    assert any(not torch.equal(done.adapter[k], at_four[k]) for k in start)
    again = trainer.train(start, uploads, ctx)  # a retry of a finished round does not retrain
    assert again.metrics == {"restored": 1.0}
    assert all(torch.equal(again.adapter[k], done.adapter[k]) for k in start)


def test_holdout_check_withholds_a_round_that_does_not_lower_held_out_loss(
        zoo: ZooPaths, tmp_path: Path) -> None:
    trainer = TRAINERS.build("akd", {
        "student_dir": str(zoo.student), "teacher_dir": str(zoo.teacher),
        "work_dir": str(tmp_path / "akd"), "steps": 2, "batch_size": 2, "holdout_share": 0.5,
        "labelling": {"max_new_tokens": 4}})
    uploads = _blur_uploads(zoo, 4)
    start = trainer.initial_adapter()
    trained = trainer.train(start, uploads, _Ctx())
    assert trained.metrics["holdout_samples"] == 2.0
    assert trained.metrics["samples"] == 2.0  # the held-out half never trained
    before, after = trained.metrics["holdout_nll_before"], trained.metrics["holdout_nll_after"]
    assert (trained.withheld is None) == (after < before)
    # a round that ends where it started (here: a resumed job whose checkpoint is the start)
    ctx = _Ctx()
    ctx.saved = (2, start)
    same = trainer.train(start, uploads, ctx)
    assert same.withheld is not None and "did not fall" in same.withheld
    assert same.metrics["holdout_nll_after"] == same.metrics["holdout_nll_before"] == before


def test_source_check_withholds_a_round_that_costs_source_accuracy(tmp_path: Path) -> None:
    root = COMMITTED / "default"  # a student that answers source videos (the test zoo's cannot)
    if not (root / "student" / "config.json").is_file():
        pytest.skip("no committed default zoo")
    zoo = ZooPaths(root / "teacher", root / "student", root)
    trainer = TRAINERS.build("akd", {
        "student_dir": str(zoo.student), "teacher_dir": str(zoo.teacher),
        "work_dir": str(tmp_path / "akd"), "steps": 2, "replay_ratio": 0.0,
        "source_check_samples": 16, "source_check_margin": 0.1})
    uploads = _blur_uploads(zoo, 2)
    start = trainer.initial_adapter()
    # finished rounds (resumed at their last checkpoint) that end at the start, and far from it
    ctx = _Ctx()
    ctx.saved = (2, start)
    same = trainer.train(start, uploads, ctx)
    assert same.withheld is None and same.metrics["source_check_samples"] == 16.0
    before = same.metrics["source_acc_before"]
    assert same.metrics["source_acc_after"] == before >= 0.5
    gen = torch.Generator().manual_seed(0)
    ctx.saved = (2, {k: v if "lora_A" in k else torch.randn(v.shape, generator=gen)
                     for k, v in start.items()})  # random B: a far larger change than a round
    broken = trainer.train(start, uploads, ctx)
    assert broken.withheld is not None and "source accuracy fell" in broken.withheld
    assert broken.metrics["source_acc_before"] == before
    assert broken.metrics["source_acc_after"] < before - 0.1


def test_round_on_zoo_models_reaches_the_device(zoo: ZooPaths, tmp_path: Path) -> None:
    server = start_cloud(tmp_path, worker={
        "threshold_samples": 4, "schedule_s": 3600.0, "trainer": "akd",
        "trainer_options": {"student_dir": str(zoo.student), "teacher_dir": str(zoo.teacher),
                            "work_dir": str(tmp_path / "akd"), "steps": 4, "batch_size": 2,
                            "lr": 5e-3, "labelling": {"max_new_tokens": 4}}})
    try:
        student = load_student(StudentConfig(zoo.student))
        v0 = adapter_state(student.model)
        with GrpcTransport(grpc.insecure_channel(server.address), 30.0) as transport:
            grant = transport.register(Enrollment("cam-akd", SECRET, "test"))
            assert grant.base_model_hash == checkpoint_hash(zoo.student)
            transport.credentials = Credentials("cam-akd", grant.device_token,
                                                grant.cloud_public_key, grant.base_model_hash)
            # what the agent uploads: kept post-projector tokens of its own inference
            items = P.batch("blur", 4, seed=3)
            inference = DeviceInference(student, COMPRESSORS.build("vidcom2", {}), 3)
            results = inference.run([s.frames for s in items], [s.question for s in items],
                                    [s.sample_id for s in items])
            uploads = tuple(
                UploadSample(s.sample_id, "video", s.question, r.answer, 0.2, tokens=pack_tokens(
                    r.features, r.record.keep, r.grid, "projected", "float16"))
                for s, r in zip(items, results, strict=True))
            sent = time.monotonic()
            receipt = transport.upload("up-1", convert.encode_sample_batch(
                SampleBatch(0, uploads)))
            assert receipt.stored_samples == 4, receipt
            update = None
            while update is None and time.monotonic() - sent < 90:
                update = transport.fetch_update(0, 64 << 20)
                if update is None:
                    time.sleep(0.2)
            round_s = time.monotonic() - sent
            assert update is not None, server.logs()[-3000:]
            header, payload = update
            updater = AdapterUpdater(student.model, AdapterStore(tmp_path / "adapters"),
                                     UpdaterConfig(rollback_margin=1.0), "cam-akd",
                                     grant.cloud_public_key, grant.base_model_hash,
                                     probe=lambda: 1.0)
            ack = updater.apply(header, payload)
            assert ack.outcome == "applied", ack
            assert transport.ack(ack) == header.version
        db = sqlite3.connect(tmp_path / "cloud" / "cloud.sqlite3", timeout=10)
        target_blob, metrics = db.execute(
            "SELECT target_blob, metrics FROM updates WHERE version=?",
            (header.version,)).fetchone()
        db.close()
        target = state_from_bytes(
            (tmp_path / "cloud" / "blobs" / "adapters" / target_blob).read_bytes())
        figures = json.loads(metrics)
        applied = adapter_state(student.model)
        assert applied.keys() == target.keys() == v0.keys()
        delta = _flat(target) - _flat(v0)
        assert float(delta.norm()) > 0  # the round changed the adapter
        error = float((_flat(applied) - _flat(target)).norm() / delta.norm())
        assert error <= figures["relative_error"] + 1e-6, (error, figures)
        assert figures["label_hit_rate"] == 0.0 and "loss_first" in figures
        log.info("akd round %s", json.dumps({"round_s": round(round_s, 2), "error": error,
                                             "payload_bytes": header.payload_bytes}))
    finally:
        server.stop(signal.SIGTERM)
