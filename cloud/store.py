"""The cloud's durable state: one SQLite database (WAL) under the data directory."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path

from shared.errors import AuthenticationError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    description TEXT NOT NULL,
    base_model_hash TEXT NOT NULL,
    adapter_version INTEGER NOT NULL DEFAULT 0,
    registered_at REAL NOT NULL
);
"""


def token_digest(token: str) -> str:
    """sha256 hex of a bearer token: the only form tokens are stored in."""
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """Thread-safe access to the cloud database. Every write commits before returning."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            data_dir / "cloud.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def enroll(self, device_id: str, token: str, description: str, base_model_hash: str) -> int:
        """Create or re-key a device; returns its recorded adapter version."""
        with self._lock:
            self._db.execute(
                "INSERT INTO devices(device_id, token_sha256, description, base_model_hash,"
                " registered_at) VALUES (?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET"
                " token_sha256=excluded.token_sha256, description=excluded.description",
                (device_id, token_digest(token), description, base_model_hash, time.time()),
            )
            row = self._db.execute(
                "SELECT adapter_version FROM devices WHERE device_id=?", (device_id,)
            ).fetchone()
        return int(row[0])

    def authenticate(self, device_id: str, token: str) -> None:
        """Raise AuthenticationError unless `token` is the device's current token."""
        with self._lock:
            row = self._db.execute(
                "SELECT token_sha256 FROM devices WHERE device_id=?", (device_id,)
            ).fetchone()
        if row is None or row[0] != token_digest(token):
            raise AuthenticationError(f"unknown device {device_id!r} or wrong token")

    def adapter_version(self, device_id: str) -> int:
        """The version the device last acknowledged as applied."""
        with self._lock:
            row = self._db.execute(
                "SELECT adapter_version FROM devices WHERE device_id=?", (device_id,)
            ).fetchone()
        return int(row[0]) if row else 0
