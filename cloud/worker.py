"""The distillation worker (AKD rounds), on its own thread, never inside an RPC handler.

A round: claim a cohort's pending samples as a job (stored), train the adapter (resumable from
the job's checkpoints), DWC-encode the new adapter against each device's head with that device's
error-feedback residual, sign and publish the updates together with the job's completion in one
transaction. A crash anywhere leaves the job open; the next start resumes it.
"""

from __future__ import annotations

import logging
import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.metrics import Metrics
from cloud.settings import WorkerSettings
from cloud.store import Job, NewUpdate, Pending, StateDict, Store
from cloud.trainers import JobInterrupted, Trainer
from shared import signing
from shared.codec import DeltaCodec
from shared.types import UpdateHeader

log = logging.getLogger(__name__)

FLEET = "fleet"


def device_cohort(device_id: str) -> str:
    """Cohort key of a per-device lineage."""
    return f"device:{device_id}"


class _Context:
    """JobContext handed to the trainer: checkpoints go to the store."""

    def __init__(self, store: Store, job_id: str, stopping: threading.Event) -> None:
        self.job_id = job_id
        self._store = store
        self._stopping = stopping

    def restore(self) -> tuple[int, StateDict] | None:
        return self._store.load_checkpoint(self.job_id)

    def checkpoint(self, step: int, tensors: StateDict) -> None:
        self._store.save_checkpoint(self.job_id, step, tensors)
        if self._stopping.is_set():
            raise JobInterrupted(f"job {self.job_id} stopped at step {step}")


class DistillWorker:
    """Runs rounds when a cohort's pending samples reach the threshold or on a schedule."""

    def __init__(
        self, store: Store, trainer: Trainer, codec: DeltaCodec, codec_name: str,
        signing_key: Ed25519PrivateKey, settings: WorkerSettings, metrics: Metrics,
    ) -> None:
        self._store = store
        self._trainer = trainer
        self._codec = codec
        self._codec_name = codec_name
        self._key = signing_key
        self._settings = settings
        self._metrics = metrics
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_schedule = time.monotonic()
        store.set_initial_adapter(trainer.initial_adapter())

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (it first resumes any job a previous process left open)."""
        self._thread = threading.Thread(target=self._loop, name="distill-worker", daemon=True)
        self._thread.start()

    def notify(self, device_id: str) -> None:
        """New samples arrived (called after an upload commits)."""
        self._wake.set()

    def request_stop(self) -> None:
        """Ask the running job to stop at its next checkpoint; returns at once."""
        self._stopping.set()
        self._wake.set()

    def stop(self, timeout_s: float) -> None:
        """Stop and wait for the thread (an open job stays open for the next start)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("worker did not stop within %.1f s", timeout_s)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception:  # keep the daemon alive; the job stays open and is retried
                log.exception("distillation round failed")
                self._stopping.wait(1.0)
            # a quiet period ends without an upload to wake us: look again when it may have
            waits = [t for t in (self._settings.schedule_s, self._settings.quiet_s) if t]
            self._wake.wait(min(waits) if waits else None)
            self._wake.clear()

    # -- rounds ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """Resume open jobs, then start the rounds that are due; returns rounds published."""
        done = 0
        for job in self._store.open_jobs():
            if self._stopping.is_set():
                return done
            done += self._run(job)
        scheduled = (self._settings.schedule_s is not None
                     and time.monotonic() - self._last_schedule >= self._settings.schedule_s)
        if scheduled:
            self._last_schedule = time.monotonic()
        need = self._settings.min_samples if scheduled else self._settings.threshold_samples
        for cohort, devices in self._due(need):
            if self._stopping.is_set():
                return done
            new = self._store.create_job(cohort, devices, self._settings.max_samples_per_job)
            if new is not None:
                done += self._run(new)
        return done

    def _due(self, need: int) -> list[tuple[str, tuple[str, ...]]]:
        pending = self._store.pending_by_device()
        if self._settings.cohort == FLEET:
            if pending and self._ready(list(pending.values()), need):
                return [(FLEET, tuple(sorted(pending)))]
            return []
        return [(device_cohort(d), (d,)) for d, p in sorted(pending.items())
                if self._ready([p], need)]

    def _ready(self, pending: list[Pending], need: int) -> bool:
        """`need` samples are waiting and their uploads went quiet (or a full job waits)."""
        total = sum(p.samples for p in pending)
        quiet = time.time() - max(p.newest_at for p in pending) >= self._settings.quiet_s
        return total >= need and (quiet or total >= self._settings.max_samples_per_job)

    def _run(self, job: Job) -> int:
        job = self._store.start_job(job.job_id)
        if job.attempts > self._settings.max_attempts:
            self._store.fail_job(job.job_id, f"gave up after {job.attempts - 1} attempts")
            self._metrics.rounds.labels("failed").inc()
            log.error("job failed for good", extra={"job_id": job.job_id})
            return 0
        log.info("round starting", extra={
            "job_id": job.job_id, "cohort": job.cohort, "attempt": job.attempts,
            "resume_step": job.step})
        started = time.monotonic()
        samples = self._store.job_samples(job.job_id)
        try:
            result = self._trainer.train(self._start_adapter(job), samples,
                                         _Context(self._store, job.job_id, self._stopping))
        except JobInterrupted as e:
            self._metrics.rounds.labels("interrupted").inc()
            log.info("round interrupted, will resume: %s", e, extra={"job_id": job.job_id})
            return 0
        except Exception as e:
            log.exception("trainer failed", extra={"job_id": job.job_id})
            if job.attempts >= self._settings.max_attempts:
                self._store.fail_job(job.job_id, f"{type(e).__name__}: {e}")
                self._metrics.rounds.labels("failed").inc()
            return 0
        for check, key in (("source_accuracy", "source_acc"), ("holdout_nll", "holdout_nll")):
            for point in ("before", "after"):
                value = result.metrics.get(f"{key}_{point}")
                if value is not None:
                    self._metrics.round_check.labels(check, point).set(value)
        if result.withheld is not None:
            self._store.withhold_job(job.job_id, result.withheld)
            self._metrics.rounds.labels("withheld").inc()
            log.info("round withheld: %s", result.withheld, extra={
                "job_id": job.job_id, "samples": len(samples)})
            return 0
        headers = self._publish(job, result.adapter, dict(result.metrics))
        elapsed = time.monotonic() - started
        self._metrics.rounds.labels("done").inc()
        self._metrics.round_seconds.observe(elapsed)
        for point in ("first", "last"):
            value = result.metrics.get(f"loss_{point}")
            if value is not None:
                self._metrics.loss.labels(point).set(value)
        for h in headers:
            self._metrics.update_bytes.observe(h.payload_bytes)
            self._metrics.device_latest.labels(h.device_id).set(h.version)
        log.info("round published", extra={
            "job_id": job.job_id, "samples": len(samples), "wall_s": round(elapsed, 3),
            "versions": [h.version for h in headers],
            "payload_bytes": [h.payload_bytes for h in headers]})
        return 1

    def _start_adapter(self, job: Job) -> StateDict:
        if job.cohort == FLEET:
            adapter = self._store.cohort_adapter(FLEET)
            return adapter if adapter is not None else self._trainer.initial_adapter()
        return self._store.head(job.device_ids[0]).target

    def _publish(self, job: Job, adapter: StateDict,
                 metrics: dict[str, float]) -> list[UpdateHeader]:
        updates = []
        for device_id in job.device_ids:
            head = self._store.head(device_id)
            enc = self._codec.encode(adapter, head.target, head.residual)
            figures = dict(metrics, payload_bytes=float(enc.stats.payload_bytes),
                           energy_share=enc.stats.energy_share,
                           relative_error=enc.stats.relative_error)
            updates.append(NewUpdate(
                device_id, head.version, self._codec_name, self._trainer.base_model_hash,
                enc.payload, adapter, enc.residual, figures))
        return self._store.publish(job.job_id, updates,
                                   lambda h: signing.sign_header(self._key, h))
