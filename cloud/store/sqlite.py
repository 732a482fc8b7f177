"""The embedded store: one SQLite database (WAL, synchronous=FULL) plus blob files.

Write order is always blob files first (temp, fsync, rename), then one SQLite transaction that
references them; a crash in between leaves only unreferenced files, which the next start deletes.
So a committed row always has its blobs, and nothing is acknowledged before its commit.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from cloud.store import files
from cloud.store.base import Head, Job, NewUpdate, Pending, Quota, Signer, StateDict
from shared.errors import (
    ConfigError,
    NotFoundError,
    PermissionDeniedError,
    StoreFullError,
    WireFormatError,
)
from shared.types import (
    DeviceStatus,
    SampleBatch,
    UpdateAck,
    UpdateHeader,
    UploadReceipt,
    UploadSample,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    base_model_hash TEXT NOT NULL,
    adapter_version INTEGER NOT NULL DEFAULT 0,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    device_id TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    payload_sha256 BLOB NOT NULL,
    blob TEXT,
    stored_samples INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (device_id, upload_id)
);
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    sample_id TEXT NOT NULL,
    fields TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    job_id TEXT,
    UNIQUE (device_id, sample_id)
);
CREATE INDEX IF NOT EXISTS samples_job ON samples(job_id);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    cohort TEXT NOT NULL,
    devices TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS updates (
    version INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    codec TEXT NOT NULL,
    base_model_hash TEXT NOT NULL,
    payload_sha256 BLOB NOT NULL,
    payload_bytes INTEGER NOT NULL,
    signature BLOB NOT NULL,
    payload_blob TEXT NOT NULL,
    target_blob TEXT NOT NULL,
    residual_blob TEXT NOT NULL,
    job_id TEXT NOT NULL,
    metrics TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    acked_at REAL,
    probe_accuracy REAL,
    previous_probe_accuracy REAL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS updates_device ON updates(device_id, base_version);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_LIVE = "('produced', 'applied')"
_MAX_VERSION = 2**63 - 1
"""SQLite INTEGER's range; versions are assigned from 1 upwards, so larger ones never exist."""
_OPEN_JOB = "(SELECT job_id FROM jobs WHERE state IN ('pending', 'running'))"


class SqliteStore:
    """`cloud.store.base.Store` on SQLite + files under `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._dirs = {k: data_dir / "blobs" / k for k in ("uploads", "adapters", "updates", "jobs")}
        for d in self._dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            data_dir / "cloud.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._sweep_orphans()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self._rollback()
                if e.sqlite_errorcode == sqlite3.SQLITE_FULL:
                    raise StoreFullError(f"store database full: {e}") from e
                raise
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        # SQLite has already rolled back after some errors (SQLITE_FULL, I/O errors); a second
        # ROLLBACK would raise and hide the original error.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _one(self, sql: str, args: tuple[object, ...] = ()) -> tuple[object, ...] | None:
        with self._lock:
            row: tuple[object, ...] | None = self._db.execute(sql, args).fetchone()
            return row

    def _sweep_orphans(self) -> None:
        """Delete blob files no row references: leftovers of a crash before a commit."""
        with self._lock:
            used: set[str] = set()
            queries = (
                "SELECT blob FROM uploads",
                "SELECT payload_blob FROM updates",
                "SELECT target_blob FROM updates",
                "SELECT residual_blob FROM updates",
                "SELECT checkpoint FROM jobs",
                "SELECT value FROM meta WHERE key='initial_adapter'",
            )
            for q in queries:
                used.update(r[0] for r in self._db.execute(q) if r[0])
        removed = 0
        for d in self._dirs.values():
            for path in d.iterdir():
                if path.name not in used:
                    path.unlink()
                    removed += 1
        if removed:
            log.warning("removed %d orphan blob file(s) left by an interrupted write", removed)

    # -- devices --------------------------------------------------------------------------

    def enroll(self, device_id: str, token_sha256: str, description: str,
               base_model_hash: str) -> int:
        """Create or re-key a device; returns its recorded adapter version."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO devices(device_id, token_sha256, description, base_model_hash,"
                " registered_at) VALUES (?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET"
                " token_sha256=excluded.token_sha256, description=excluded.description",
                (device_id, token_sha256, description, base_model_hash, time.time()),
            )
            row = db.execute(
                "SELECT adapter_version FROM devices WHERE device_id=?", (device_id,)
            ).fetchone()
        return int(row[0])

    def identify(self, token_sha256: str) -> str | None:
        """The device owning this token hash, or None."""
        row = self._one("SELECT device_id FROM devices WHERE token_sha256=?", (token_sha256,))
        return str(row[0]) if row else None

    def status(self, device_id: str) -> DeviceStatus:
        """Versions and queue depths of one device."""
        with self._lock:
            row = self._db.execute(
                "SELECT adapter_version FROM devices WHERE device_id=?", (device_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"device {device_id!r} is not enrolled")
            latest = self._db.execute(
                f"SELECT COALESCE(MAX(version), 0) FROM updates WHERE device_id=?"
                f" AND status IN {_LIVE}", (device_id,)).fetchone()[0]
            # finished rounds that distilled this device's samples, published or withheld
            rounds = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state='done' AND EXISTS"
                " (SELECT 1 FROM json_each(jobs.devices) WHERE value=?)",
                (device_id,)).fetchone()[0]
            stored = self._db.execute(
                "SELECT COUNT(*) FROM samples WHERE device_id=?", (device_id,)).fetchone()[0]
            pending = self._pending(device_id)[0]
        return DeviceStatus(device_id, int(row[0]), int(latest), pending, int(stored), int(rounds))

    def adapter_versions(self) -> dict[str, int]:
        """Acknowledged adapter version of every device."""
        with self._lock:
            rows = self._db.execute("SELECT device_id, adapter_version FROM devices").fetchall()
        return {str(d): int(v) for d, v in rows}

    # -- ingestion ------------------------------------------------------------------------

    def _pending(self, device_id: str) -> tuple[int, int]:
        row = self._db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM samples WHERE device_id=?"
            f" AND (job_id IS NULL OR job_id IN {_OPEN_JOB})", (device_id,)).fetchone()
        return int(row[0]), int(row[1])

    def _receipt(self, device_id: str, upload_id: str) -> tuple[bytes, UploadReceipt] | None:
        row = self._db.execute(
            "SELECT payload_sha256, stored_samples FROM uploads WHERE device_id=? AND upload_id=?",
            (device_id, upload_id)).fetchone()
        if row is None:
            return None
        pending = self._pending(device_id)[0]
        return bytes(row[0]), UploadReceipt(upload_id, int(row[1]), True, pending)

    def find_upload(self, device_id: str, upload_id: str) -> tuple[bytes, UploadReceipt] | None:
        """(payload sha256, duplicate receipt) of a stored upload, or None."""
        with self._lock:
            return self._receipt(device_id, upload_id)

    def put_upload(self, device_id: str, upload_id: str, payload_sha256: bytes,
                   batch: SampleBatch, quota: Quota) -> UploadReceipt:
        """Blobs first, then one transaction; see the Protocol for the contract."""
        with self._lock:
            marks = ",".join("?" * len(batch.samples))
            known = {r[0] for r in self._db.execute(
                f"SELECT sample_id FROM samples WHERE device_id=? AND sample_id IN ({marks})",
                (device_id, *(s.sample_id for s in batch.samples)))}
        fresh = [s for s in batch.samples if s.sample_id not in known]
        blob = files.new_name(".safetensors") if fresh else None
        if blob is not None:
            files.write_atomic(self._dirs["uploads"] / blob, files.samples_to_bytes(fresh))
        try:
            with self._tx() as db:
                earlier = self._receipt(device_id, upload_id)
                if earlier is not None:
                    self._check_same(upload_id, earlier[0], payload_sha256)
                    if blob is not None:
                        (self._dirs["uploads"] / blob).unlink()
                    return earlier[1]
                sizes = [_nbytes(s) for s in fresh]
                count, nbytes = self._pending(device_id)
                if count + len(fresh) > quota.max_pending_samples:
                    raise StoreFullError(
                        f"device {device_id!r}: {count} samples pending + {len(fresh)} would exceed"
                        f" the quota of {quota.max_pending_samples}")
                if nbytes + sum(sizes) > quota.max_pending_bytes:
                    raise StoreFullError(
                        f"device {device_id!r}: {nbytes} pending bytes + {sum(sizes)} would exceed"
                        f" the quota of {quota.max_pending_bytes}")
                stored = 0
                for i, (s, size) in enumerate(zip(fresh, sizes, strict=True)):
                    cur = db.execute(
                        "INSERT OR IGNORE INTO samples(device_id, upload_id, idx, sample_id,"
                        " fields, nbytes) VALUES (?,?,?,?,?,?)",
                        (device_id, upload_id, i, s.sample_id, files.sample_row(s), size))
                    stored += cur.rowcount
                db.execute(
                    "INSERT INTO uploads(device_id, upload_id, payload_sha256, blob,"
                    " stored_samples, created_at) VALUES (?,?,?,?,?,?)",
                    (device_id, upload_id, payload_sha256, blob, stored, time.time()))
                pending = self._pending(device_id)[0]
        except BaseException:
            if blob is not None:
                (self._dirs["uploads"] / blob).unlink(missing_ok=True)
            raise
        return UploadReceipt(upload_id, stored, False, pending)

    @staticmethod
    def _check_same(upload_id: str, stored: bytes, received: bytes) -> None:
        if stored != received:
            raise WireFormatError(
                f"upload_id: {upload_id!r} was already used for a different payload")

    def pending_by_device(self) -> dict[str, Pending]:
        """Unclaimed samples per device (devices without any are absent)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.device_id, COUNT(*), MAX(u.created_at) FROM samples s"
                " JOIN uploads u ON u.device_id = s.device_id AND u.upload_id = s.upload_id"
                " WHERE s.job_id IS NULL GROUP BY s.device_id"
            ).fetchall()
        return {str(d): Pending(int(n), float(t)) for d, n, t in rows}

    # -- jobs -----------------------------------------------------------------------------

    def create_job(self, cohort: str, device_ids: tuple[str, ...], max_samples: int) -> Job | None:
        """Claim up to `max_samples` unclaimed samples of `device_ids` for a new job."""
        job_id = uuid.uuid4().hex
        marks = ",".join("?" * len(device_ids))
        with self._tx() as db:
            rows = db.execute(
                f"SELECT seq, device_id FROM samples WHERE job_id IS NULL AND device_id IN"
                f" ({marks}) ORDER BY seq LIMIT ?", (*device_ids, max_samples)).fetchall()
            if not rows:
                return None
            claimed = tuple(sorted({str(r[1]) for r in rows}))
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs(job_id, seq, cohort, devices, state, created_at)"
                " VALUES (?,?,?,?,'pending',?)",
                (job_id, seq, cohort, json.dumps(claimed), time.time()))
            db.executemany("UPDATE samples SET job_id=? WHERE seq=?",
                           [(job_id, r[0]) for r in rows])
        return Job(job_id, cohort, claimed, "pending", 0, 0)

    def _job(self, job_id: str) -> Job:
        row = self._db.execute(
            "SELECT job_id, cohort, devices, state, attempts, step FROM jobs WHERE job_id=?",
            (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"job {job_id!r} does not exist")
        return Job(row[0], row[1], tuple(json.loads(row[2])), row[3], int(row[4]), int(row[5]))

    def open_jobs(self) -> list[Job]:
        """Jobs not finished yet, oldest first."""
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT job_id FROM jobs WHERE state IN ('pending', 'running') ORDER BY seq")]
            return [self._job(i) for i in ids]

    def job(self, job_id: str) -> Job:
        """One job's record."""
        with self._lock:
            return self._job(job_id)

    def start_job(self, job_id: str) -> Job:
        """Mark a job running and count the attempt."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='running', attempts=attempts+1 WHERE job_id=?",
                       (job_id,))
            return self._job(job_id)

    def job_samples(self, job_id: str) -> list[UploadSample]:
        """The samples a job claimed, in upload order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.sample_id, s.fields, s.idx, u.blob FROM samples s JOIN uploads u"
                " ON s.device_id=u.device_id AND s.upload_id=u.upload_id"
                " WHERE s.job_id=? ORDER BY s.seq", (job_id,)).fetchall()
        arrays: dict[str, dict] = {}
        out = []
        for sample_id, fields, idx, blob in rows:
            if blob not in arrays:
                arrays[blob] = files.load_arrays(self._dirs["uploads"] / blob)
            out.append(files.sample_from(sample_id, fields, arrays[blob], int(idx)))
        return out

    def save_checkpoint(self, job_id: str, step: int, tensors: StateDict) -> None:
        """Write a new checkpoint file, point the job at it, delete the previous one."""
        name = files.new_name(".safetensors")
        files.write_atomic(self._dirs["jobs"] / name, files.state_to_bytes(tensors))
        with self._tx() as db:
            old = db.execute("SELECT checkpoint FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            db.execute("UPDATE jobs SET checkpoint=?, step=? WHERE job_id=?", (name, step, job_id))
        if old and old[0]:
            (self._dirs["jobs"] / old[0]).unlink(missing_ok=True)

    def load_checkpoint(self, job_id: str) -> tuple[int, StateDict] | None:
        """(step, tensors) of the job's checkpoint, or None."""
        row = self._one("SELECT checkpoint, step FROM jobs WHERE job_id=?", (job_id,))
        if row is None or not row[0]:
            return None
        data = (self._dirs["jobs"] / str(row[0])).read_bytes()
        return int(row[1]), files.state_from_bytes(data)  # type: ignore[call-overload]

    def fail_job(self, job_id: str, reason: str) -> None:
        """Give up on a job; its samples stay claimed by it."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='failed', reason=?, finished_at=? WHERE job_id=?",
                       (reason[:2000], time.time(), job_id))

    def withhold_job(self, job_id: str, reason: str) -> None:
        """Finish a job without publishing anything; its samples stay with it (consumed)."""
        with self._tx() as db:
            old = db.execute("SELECT checkpoint FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            db.execute("UPDATE jobs SET state='done', checkpoint=NULL, reason=?, finished_at=?"
                       " WHERE job_id=?", (reason[:2000], time.time(), job_id))
        if old and old[0]:
            (self._dirs["jobs"] / old[0]).unlink(missing_ok=True)

    # -- updates --------------------------------------------------------------------------

    def initial_adapter(self) -> StateDict | None:
        """The shipped adapter (version 0), once recorded."""
        row = self._one("SELECT value FROM meta WHERE key='initial_adapter'")
        if row is None:
            return None
        return files.state_from_bytes((self._dirs["adapters"] / str(row[0])).read_bytes())

    def set_initial_adapter(self, adapter: StateDict) -> None:
        """Record the shipped adapter once; a different one later is a configuration error."""
        current = self.initial_adapter()
        if current is not None:
            same = current.keys() == adapter.keys() and all(
                torch.equal(current[k], adapter[k].detach().cpu()) for k in current)
            if not same:
                raise ConfigError(
                    "trainer: its shipped adapter (version 0) differs from the one this store was"
                    " created with; use the same trainer options or a fresh `data_dir`")
            return
        name = files.new_name(".safetensors")
        files.write_atomic(self._dirs["adapters"] / name, files.state_to_bytes(adapter))
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES ('initial_adapter', ?)", (name,))

    def head(self, device_id: str) -> Head:
        """The device's newest live version, its target adapter and residual."""
        row = self._one(
            f"SELECT version, target_blob, residual_blob FROM updates WHERE device_id=?"
            f" AND status IN {_LIVE} ORDER BY version DESC LIMIT 1", (device_id,))
        if row is None:
            initial = self.initial_adapter()
            if initial is None:
                raise ConfigError("store: no initial adapter recorded (start the worker first)")
            return Head(0, initial, None)
        adapters = self._dirs["adapters"]
        return Head(
            int(row[0]),  # type: ignore[call-overload]
            files.state_from_bytes((adapters / str(row[1])).read_bytes()),
            files.state_from_bytes((adapters / str(row[2])).read_bytes()),
        )

    def cohort_adapter(self, cohort: str) -> StateDict | None:
        """The adapter the cohort's latest finished round produced, or None."""
        row = self._one(
            "SELECT u.target_blob FROM updates u JOIN jobs j ON u.job_id=j.job_id"
            " WHERE j.cohort=? ORDER BY u.version DESC LIMIT 1", (cohort,))
        if row is None:
            return None
        return files.state_from_bytes((self._dirs["adapters"] / str(row[0])).read_bytes())

    def publish(self, job_id: str, updates: list[NewUpdate], sign: Signer) -> list[UpdateHeader]:
        """Write payload/target/residual blobs, then one transaction for all rows + the job."""
        written: list[Path] = []
        targets: dict[int, str] = {}  # a fleet round shares one target file among its devices
        rows = []
        try:
            for u in updates:
                payload = self._dirs["updates"] / files.new_name(".dwc")
                files.write_atomic(payload, u.payload)
                written.append(payload)
                if id(u.target) not in targets:
                    target = self._dirs["adapters"] / files.new_name(".safetensors")
                    files.write_atomic(target, files.state_to_bytes(u.target))
                    written.append(target)
                    targets[id(u.target)] = target.name
                residual = self._dirs["adapters"] / files.new_name(".safetensors")
                files.write_atomic(residual, files.state_to_bytes(u.residual))
                written.append(residual)
                rows.append((u, payload.name, targets[id(u.target)], residual.name))
            headers = []
            with self._tx() as db:
                state = db.execute("SELECT state, checkpoint FROM jobs WHERE job_id=?",
                                   (job_id,)).fetchone()
                if state is None or state[0] != "running":
                    raise NotFoundError(f"job {job_id!r} is not running (state {state})")
                version = db.execute("SELECT COALESCE(MAX(version), 0) FROM updates").fetchone()[0]
                for u, payload_name, target_name, residual_name in rows:
                    version += 1
                    header = UpdateHeader(
                        u.base_version, version, u.codec, u.base_model_hash,
                        files.sha256(u.payload), len(u.payload), u.device_id)
                    signature = sign(header)
                    db.execute(
                        "INSERT INTO updates(version, device_id, base_version, codec,"
                        " base_model_hash, payload_sha256, payload_bytes, signature, payload_blob,"
                        " target_blob, residual_blob, job_id, metrics, status, created_at)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,'produced',?)",
                        (version, u.device_id, u.base_version, u.codec, u.base_model_hash,
                         header.payload_sha256, header.payload_bytes, signature, payload_name,
                         target_name, residual_name, job_id, json.dumps(dict(u.metrics)),
                         time.time()))
                    headers.append(_signed(header, signature))
                db.execute("UPDATE jobs SET state='done', checkpoint=NULL, finished_at=?"
                           " WHERE job_id=?", (time.time(), job_id))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        if state[1]:
            (self._dirs["jobs"] / state[1]).unlink(missing_ok=True)
        return headers

    def _owned(self, device_id: str, version: int) -> tuple[object, ...]:
        if not 0 <= version <= _MAX_VERSION:  # the wire's uint64 exceeds SQLite's int64
            raise NotFoundError(f"version: no update {version} exists")
        row = self._db.execute(
            "SELECT device_id, base_version, status FROM updates WHERE version=?",
            (version,)).fetchone()
        if row is None:
            raise NotFoundError(f"version: no update {version} exists")
        if row[0] != device_id:
            raise PermissionDeniedError(
                f"version: update {version} belongs to another device, not {device_id!r}")
        return tuple(row)

    def update_for(self, device_id: str, have_version: int) -> tuple[UpdateHeader, bytes] | None:
        """The newest live update on top of `have_version`, or None when up to date."""
        with self._lock:
            if have_version != 0:
                self._owned(device_id, have_version)
            row = self._db.execute(
                f"SELECT version, base_version, codec, base_model_hash, payload_sha256,"
                f" payload_bytes, signature, payload_blob FROM updates WHERE device_id=?"
                f" AND base_version=? AND status IN {_LIVE} ORDER BY version DESC LIMIT 1",
                (device_id, have_version)).fetchone()
        if row is None:
            return None
        header = UpdateHeader(int(row[1]), int(row[0]), row[2], row[3], bytes(row[4]),
                              int(row[5]), device_id, bytes(row[6]))
        return header, (self._dirs["updates"] / row[7]).read_bytes()

    def record_ack(self, device_id: str, ack: UpdateAck) -> int:
        """Record what the device did with an update; returns its adapter version afterwards."""
        with self._tx() as db:
            _, base_version, _ = self._owned(device_id, ack.version)
            db.execute(
                "UPDATE updates SET status=?, acked_at=?, probe_accuracy=?,"
                " previous_probe_accuracy=?, detail=? WHERE version=?",
                (ack.outcome, time.time(), ack.probe_accuracy, ack.previous_probe_accuracy,
                 ack.detail, ack.version))
            if ack.outcome == "applied":
                db.execute("UPDATE devices SET adapter_version=? WHERE device_id=?",
                           (ack.version, device_id))
            else:
                # Everything built on the refused version can never apply: encode on its base.
                db.execute("UPDATE updates SET status='abandoned' WHERE device_id=? AND version>?"
                           " AND status='produced'", (device_id, ack.version))
                db.execute("UPDATE devices SET adapter_version=? WHERE device_id=?"
                           " AND adapter_version=?", (base_version, device_id, ack.version))
            row = db.execute("SELECT adapter_version FROM devices WHERE device_id=?",
                             (device_id,)).fetchone()
        return int(row[0])


def _nbytes(sample: UploadSample) -> int:
    n = 0
    if sample.tokens is not None:
        t = sample.tokens
        n += t.values.nbytes + t.positions.nbytes + (t.scales.nbytes if t.scales is not None else 0)
    if sample.frames is not None:
        n += sample.frames.nbytes
    return n + len(sample.question) + len(sample.device_answer)


def _signed(header: UpdateHeader, signature: bytes) -> UpdateHeader:
    return UpdateHeader(header.base_version, header.version, header.codec, header.base_model_hash,
                        header.payload_sha256, header.payload_bytes, header.device_id, signature)
