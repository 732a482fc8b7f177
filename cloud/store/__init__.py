"""The cloud's durable state behind a small Protocol; SQLite + blob files is the default."""

from cloud.store.base import Head, Job, NewUpdate, Pending, Quota, StateDict, Store
from cloud.store.sqlite import SqliteStore

__all__ = ["Head", "Job", "NewUpdate", "Pending", "Quota", "SqliteStore", "StateDict", "Store"]
