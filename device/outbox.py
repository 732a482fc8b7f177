"""Durable upload outbox (UTS uplink): SQLite in WAL mode, exactly-once delivery by upload id.

A selected sample is written here (fsynced by SQLite, `synchronous=FULL`) before any upload is
attempted. Samples are grouped into an *upload* in one transaction: the upload row stores the
exact serialized SampleBatch and its idempotency id, and the grouped samples leave the pending
table. An upload is deleted only after the cloud's receipt for that id. After a crash the same
upload, byte for byte with the same id, is sent again, so the cloud stores every sample once.

The disk budget is explicit: when a new sample does not fit, `full_policy` decides
("drop_oldest" evicts the oldest pending samples, "reject_new" refuses the new one), and every
sample lost that way is counted in the persistent `counters` table and logged, never silently.
A full disk (SQLITE_FULL) is the same: the new samples are refused with StoreFullError and
counted, nothing half-written stays, and every write path reports it as StoreFullError.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError, StoreFullError
from shared.types import SampleBatch, UploadSample
from shared.wire import convert

log = logging.getLogger(__name__)

FULL_POLICIES = ("drop_oldest", "reject_new")
COUNTERS = ("enqueued", "uploaded_samples", "uploaded_bytes", "uploads", "duplicates",
            "dropped_oldest", "rejected_new", "dead_lettered", "resumed_cursor")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL UNIQUE,
    adapter_version INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    samples INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    upload_id TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """Budget and batching of the outbox."""

    max_bytes: int = 64 * 1024 * 1024
    """Payload bytes (pending + grouped uploads) the outbox may hold on disk."""
    full_policy: str = "drop_oldest"
    """What happens when a new sample does not fit: "drop_oldest" or "reject_new"."""
    batch_samples: int = 16
    """Most samples grouped into one upload."""
    disk_reserve_bytes: int = 4 * 1024 * 1024
    """Free space left on the outbox's filesystem: new samples that would eat into it are
    refused and counted (rejected_new) like an exhausted budget. Grouping, acknowledging and the
    WAL checkpoint all need a little space, so on a disk filled to the last byte the queue could
    never drain again."""

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ConfigError(f"`max_bytes` must be > 0, got {self.max_bytes}")
        if self.full_policy not in FULL_POLICIES:
            raise ConfigError(f"`full_policy` must be one of {FULL_POLICIES}, "
                              f"got {self.full_policy!r}")
        if not 1 <= self.batch_samples <= 256:
            raise ConfigError(f"`batch_samples` must be in 1..256, got {self.batch_samples}")
        if self.disk_reserve_bytes < 0:
            raise ConfigError(f"`disk_reserve_bytes` must be >= 0, got {self.disk_reserve_bytes}")


@dataclass(frozen=True, slots=True)
class Upload:
    """One grouped upload, ready to send (or resend) as-is."""

    upload_id: str
    payload: bytes
    samples: int
    attempts: int


class Outbox:
    """The on-disk queue of samples awaiting the cloud's receipt; safe across threads."""

    def __init__(self, path: Path, config: OutboxConfig,
                 clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._dir = path.parent
        self.config = config
        self._clock = clock
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # Keep the WAL within a quarter of the disk reserve (checkpoint early, truncate after),
        # or the WAL alone (default: 4 MB before a checkpoint) can fill a small disk.
        wal_cap = max(64 * 1024, config.disk_reserve_bytes // 4)
        page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        self._db.execute(f"PRAGMA wal_autocheckpoint={max(16, wal_cap // page)}")
        self._db.execute(f"PRAGMA journal_size_limit={wal_cap}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database (all writes are already durable)."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction (the caller holds the lock); SQLITE_FULL -> StoreFullError."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as e:
            if self._db.in_transaction:  # SQLite has already rolled back after SQLITE_FULL
                self._db.execute("ROLLBACK")
            if (isinstance(e, sqlite3.OperationalError)
                    and e.sqlite_errorcode == sqlite3.SQLITE_FULL):
                raise StoreFullError(f"outbox disk full: {e}") from e
            raise

    # ------------------------------------------------------------------ accounting

    def _bump(self, name: str, by: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))

    def counters(self) -> dict[str, int]:
        """Persistent counters (see COUNTERS), zero when never bumped."""
        with self._lock:
            rows = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return {name: int(rows.get(name, 0)) for name in COUNTERS}

    def stored_bytes(self) -> int:
        """Payload bytes held (pending samples and grouped uploads)."""
        with self._lock:
            return self._stored_bytes()

    def _stored_bytes(self) -> int:
        a = self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM pending").fetchone()
        b = self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM uploads").fetchone()
        return int(a[0]) + int(b[0])

    def depth(self) -> tuple[int, int]:
        """(pending samples, samples inside grouped uploads not yet acknowledged)."""
        with self._lock:
            p = self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
            u = self._db.execute("SELECT COALESCE(SUM(samples), 0) FROM uploads").fetchone()[0]
        return int(p), int(u)

    # ------------------------------------------------------------------ input cursor

    def cursor(self, name: str) -> int:
        """How many items of input stream `name` are fully processed (0 when new)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM cursors WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def advance(self, name: str, value: int) -> None:
        """Record progress of an input stream without enqueuing anything."""
        with self._lock, self._write():
            self._set_cursor(name, value)

    def _set_cursor(self, name: str, value: int) -> None:
        self._db.execute("INSERT INTO cursors(name, value) VALUES (?, ?) ON CONFLICT(name) "
                         "DO UPDATE SET value = excluded.value", (name, value))

    # ------------------------------------------------------------------ enqueue

    def enqueue(self, batch: SampleBatch, cursor: tuple[str, int] | None = None) -> int:
        """Store the samples of `batch` (and, in the same transaction, the input cursor).

        Returns the number of samples stored. Samples whose id is already held are ignored.
        Raises:
            StoreFullError: `full_policy` is "reject_new" and the samples do not fit, or they
                would eat into the disk reserve (the cursor still advances: the rejection is
                counted, the sample is not retried); or the disk is full (SQLITE_FULL: nothing
                was written, not even the cursor; counted if the counter still fits).
        """
        rows = [(s.sample_id, convert.encode_sample_batch(SampleBatch(batch.adapter_version, (s,))))
                for s in batch.samples]
        need = sum(len(p) for _, p in rows)
        with self._lock:
            try:
                with self._write():
                    stored = self._make_room(need, len(rows))
                    if stored:
                        for sample_id, payload in rows:
                            cur = self._db.execute(
                                "INSERT OR IGNORE INTO pending(sample_id, adapter_version,"
                                " payload, created_at) VALUES (?,?,?,?)",
                                (sample_id, batch.adapter_version, payload, self._clock()))
                            self._bump("enqueued", cur.rowcount)
                    if cursor is not None:
                        self._set_cursor(*cursor)
            except StoreFullError as e:
                self._count_disk_full(len(rows), e)
                raise
        if not stored:
            raise StoreFullError(f"outbox full (budget {self.config.max_bytes} bytes, disk "
                                 f"reserve {self.config.disk_reserve_bytes} bytes): "
                                 f"rejected {len(rows)} new sample(s)")
        return len(rows)

    def _count_disk_full(self, n_new: int, error: StoreFullError) -> None:
        log.warning("outbox disk full: rejecting new samples",
                    extra={"samples": n_new, "reason": str(error)})
        try:
            with self._write():  # an update in place usually still fits; if not, say so loudly
                self._bump("rejected_new", n_new)
        except StoreFullError:
            log.error("outbox disk full: could not even count %d rejected sample(s)", n_new)

    def _disk_has_room(self, need: int) -> bool:
        # pages freed by acknowledged uploads are reused before the file grows
        pages = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        room = shutil.disk_usage(self._dir).free + int(pages) * int(page_size)
        return 2 * need + self.config.disk_reserve_bytes <= room  # 2x: WAL, then the database

    def _make_room(self, need: int, n_new: int) -> bool:
        if need > self.config.max_bytes:  # could never fit: evicting others would not help
            self._bump("rejected_new", n_new)
            log.warning("samples larger than the whole outbox budget: rejected",
                        extra={"samples": n_new, "bytes": need})
            return False
        if not self._disk_has_room(need):
            self._bump("rejected_new", n_new)
            log.warning("outbox filesystem nearly full: rejecting new samples",
                        extra={"samples": n_new, "bytes": need,
                               "reserve": self.config.disk_reserve_bytes})
            return False
        free = self.config.max_bytes - self._stored_bytes()
        if need <= free:
            return True
        if self.config.full_policy == "reject_new":
            self._bump("rejected_new", n_new)
            log.warning("outbox full: rejecting new samples", extra={"samples": n_new})
            return False
        dropped = 0
        for seq, size in self._db.execute(
                "SELECT seq, LENGTH(payload) FROM pending ORDER BY seq").fetchall():
            if need <= free:
                break
            self._db.execute("DELETE FROM pending WHERE seq=?", (seq,))
            free += int(size)
            dropped += 1
        if dropped:
            self._bump("dropped_oldest", dropped)
            log.warning("outbox full: dropped oldest pending samples", extra={"samples": dropped})
        if need > free:  # only grouped uploads left; they are never evicted
            self._bump("rejected_new", n_new)
            log.warning("outbox full of in-flight uploads: rejecting new samples",
                        extra={"samples": n_new})
            return False
        return True

    # ------------------------------------------------------------------ uploads

    def next_upload(self) -> Upload | None:
        """The oldest unacknowledged upload, grouping pending samples into a new one if needed."""
        with self._lock:
            row = self._db.execute("SELECT upload_id, payload, samples, attempts FROM uploads "
                                   "ORDER BY created_at, upload_id LIMIT 1").fetchone()
            if row is not None:
                return Upload(row[0], bytes(row[1]), int(row[2]), int(row[3]))
            return self._group()

    def _group(self) -> Upload | None:
        first = self._db.execute(
            "SELECT adapter_version FROM pending ORDER BY seq LIMIT 1").fetchone()
        if first is None:
            return None
        version = int(first[0])
        rows = self._db.execute(
            "SELECT seq, payload FROM pending WHERE adapter_version=? ORDER BY seq LIMIT ?",
            (version, self.config.batch_samples)).fetchall()
        samples: list[UploadSample] = []
        for _, payload in rows:
            samples.extend(convert.decode_sample_batch(bytes(payload), _LIMITS).samples)
        payload = convert.encode_sample_batch(SampleBatch(version, tuple(samples)))
        ids = "\n".join(s.sample_id for s in samples).encode()
        upload_id = "u-" + hashlib.sha256(ids).hexdigest()[:40]
        with self._write():  # deletes first: their freed pages can hold the upload
            self._db.executemany("DELETE FROM pending WHERE seq=?", [(r[0],) for r in rows])
            self._db.execute("INSERT INTO uploads(upload_id, payload, samples, created_at) "
                             "VALUES (?,?,?,?)", (upload_id, payload, len(samples), self._clock()))
        return Upload(upload_id, payload, len(samples), 0)

    def mark_attempt(self, upload_id: str) -> None:
        """Count one send attempt of `upload_id`."""
        with self._lock, self._write():
            self._db.execute("UPDATE uploads SET attempts = attempts + 1 WHERE upload_id=?",
                             (upload_id,))

    def acknowledge(self, upload_id: str, duplicate: bool) -> None:
        """The cloud's receipt arrived: forget the upload and count it."""
        with self._lock, self._write():
            row = self._db.execute("SELECT samples, LENGTH(payload) FROM uploads "
                                   "WHERE upload_id=?", (upload_id,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM uploads WHERE upload_id=?", (upload_id,))
                self._bump("uploads")
                self._bump("uploaded_samples", int(row[0]))
                self._bump("uploaded_bytes", int(row[1]))
                if duplicate:
                    self._bump("duplicates")

    def dead_letter(self, upload_id: str, reason: str) -> None:
        """The cloud refused the upload for good: keep it aside, counted, out of the queue."""
        with self._lock, self._write():
            row = self._db.execute("SELECT payload, samples FROM uploads WHERE upload_id=?",
                                   (upload_id,)).fetchone()
            if row is not None:
                self._db.execute("INSERT OR REPLACE INTO dead_letter VALUES (?,?,?,?)",
                                 (upload_id, row[0], reason[:1024], self._clock()))
                self._db.execute("DELETE FROM uploads WHERE upload_id=?", (upload_id,))
                self._bump("dead_lettered", int(row[1]))
        log.error("upload refused by the cloud; moved to dead letter",
                  extra={"upload_id": upload_id, "reason": reason})


_LIMITS = convert.UploadLimits()
"""Our own rows are re-read with the same bounds the cloud applies."""
