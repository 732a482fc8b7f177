"""Teacher label cache: AKD's labelling stage (CD-CCA §3.3 pseudo-labels) run once per input.

A label (answer ids, logits, last hidden states) is a pure function of the teacher's weights,
the sample's content and the labelling options, so it is keyed by exactly those three hashes and
reused by every later distillation job and retry. The embedded `SqliteLabelCache` keeps one
safetensors file per label plus an SQLite index row (never pickle); several processes may read
and write the same directory at once (WAL, idempotent inserts, atomic file renames).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import safetensors.torch
import torch
from torch import nn

from cloud.distill import DistillSample, PromptFormatter, TeacherLabel, label
from shared.errors import ConfigError, IntegrityError

log = logging.getLogger(__name__)

LABEL_FORMAT = 1
"""Bumped when the label tensors' meaning changes; part of every key."""
WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
"""Files of a checkpoint directory that enter its hash (weights, config, tokenizer)."""


@dataclass(frozen=True, slots=True)
class LabellingConfig:
    """Options that change what the teacher says (everything else is not part of the key)."""

    max_new_tokens: int = 16
    """Greedy answer length cap."""
    prefer_reference: bool = True
    """Teacher-force the sample's reference answer when it has one."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}")

    def digest(self) -> str:
        """sha256 hex of the options and the label format."""
        text = json.dumps({**asdict(self), "format": LABEL_FORMAT}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_hash(directory: str | Path) -> str:
    """sha256 hex over the weight, config and tokenizer files of a checkpoint directory."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ConfigError(f"checkpoint directory {str(root)!r} has no weight or config files")
    h = hashlib.sha256()
    for p in files:
        file_hash = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                file_hash.update(block)
        h.update(f"{p.relative_to(root).as_posix()}\0{file_hash.hexdigest()}\n".encode())
    return h.hexdigest()


def sample_hash(sample: DistillSample) -> str:
    """sha256 hex of what the teacher reads from a sample (not its id: equal content, one label)."""
    h = hashlib.sha256()
    tokens = sample.visual_tokens.detach().to("cpu", torch.float32).contiguous()  # (K, D)
    head = {"question": sample.question, "reference": sample.reference_answer,
            "feature_space": sample.feature_space, "shape": list(tokens.shape)}
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(tokens.numpy().tobytes())
    if sample.positions is not None:  # the teacher reads them as RoPE positions
        h.update(sample.positions.detach().cpu().long().numpy().tobytes())
    return h.hexdigest()


def prompt_digest(formatter: PromptFormatter) -> str:
    """sha256 hex of the prompt layout and vocabulary: the same text tokenizes the same way."""
    vocab = sorted(formatter.tokenizer.get_vocab().items())
    layout = [formatter.visual_id, formatter.eos_id, formatter.pad_id, formatter.bos_id,
              formatter.answer_id, list(formatter.visual_prefix), list(formatter.visual_suffix),
              formatter.layout, formatter.full_visual]
    return hashlib.sha256(json.dumps([layout, vocab]).encode()).hexdigest()


def label_key(teacher_hash: str, sample: DistillSample, config: LabellingConfig,
              prompt: str = "") -> str:
    """Cache key of one label: sha256 hex of (teacher, sample content, labelling options,
    prompt layout digest)."""
    text = f"{teacher_hash}\0{sample_hash(sample)}\0{config.digest()}\0{prompt}"
    return hashlib.sha256(text.encode()).hexdigest()


class LabelCache(Protocol):
    """Where teacher labels are kept between jobs. Safe for concurrent processes."""

    def contains(self, key: str) -> bool:
        """Whether a label is stored under `key` (without reading it)."""
        ...

    def get(self, key: str) -> TeacherLabel | None:
        """The label stored under `key`, or None."""
        ...

    def put(self, key: str, value: TeacherLabel) -> None:
        """Store a label; a second put of the same key keeps the first (labels are pure)."""
        ...

    def close(self) -> None:
        """Release the index."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    key TEXT PRIMARY KEY,
    file TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""


class SqliteLabelCache:
    """`LabelCache` on an SQLite index + one safetensors file per label under `root`."""

    def __init__(self, root: str | Path) -> None:
        self._root = Path(root)
        self._files = self._root / "files"
        self._files.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self._root / "labels.sqlite", timeout=60.0,
                                   isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def contains(self, key: str) -> bool:
        """Whether a label is stored under `key`."""
        return self._db.execute("SELECT 1 FROM labels WHERE key = ?", (key,)).fetchone() is not None

    def get(self, key: str) -> TeacherLabel | None:
        """The label stored under `key`, or None."""
        row = self._db.execute("SELECT file, nbytes FROM labels WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        data = (self._files / row[0]).read_bytes()
        if len(data) != row[1]:
            raise IntegrityError(f"label file {row[0]} has {len(data)} bytes, index says {row[1]}")
        t = safetensors.torch.load(data)
        return TeacherLabel(answer_ids=t["answer_ids"], logits=t["logits"], hidden=t["hidden"])

    def put(self, key: str, value: TeacherLabel) -> None:
        """Write the file (temp, fsync, rename), then the index row; first writer wins."""
        data = safetensors.torch.save({
            "answer_ids": value.answer_ids.detach().cpu().contiguous(),  # (A,)
            "logits": value.logits.detach().cpu().contiguous(),  # (A, V)
            "hidden": value.hidden.detach().cpu().contiguous(),  # (K + A, Dt)
        })
        name = f"{key[:16]}-{uuid.uuid4().hex[:8]}.safetensors"
        tmp = self._files / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._files / name)
        cur = self._db.execute(
            "INSERT OR IGNORE INTO labels (key, file, nbytes, created_at) VALUES (?, ?, ?, ?)",
            (key, name, len(data), time.time()))
        if cur.rowcount == 0:  # another process labelled the same sample first
            (self._files / name).unlink()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM labels").fetchone()[0])

    def close(self) -> None:
        """Close the index connection."""
        self._db.close()


@dataclass(slots=True)
class CacheStats:
    """Lookups of one labelling pass."""

    hits: int = 0
    misses: int = 0
    label_s: float = 0.0
    """Wall seconds spent running the teacher on the misses."""

    @property
    def hit_rate(self) -> float:
        """hits / lookups (0 when nothing was looked up)."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


def cached_labels(
    teacher: nn.Module | None, samples: Sequence[DistillSample], formatter: PromptFormatter,
    cache: LabelCache, teacher_hash: str, config: LabellingConfig, *,
    labeller: Callable[[Sequence[DistillSample]], list[TeacherLabel]] | None = None,
    batch_size: int = 16,
) -> tuple[list[TeacherLabel], CacheStats]:
    """Labels of `samples` in order: from the cache, the misses labelled in batches and stored.

    Args:
        teacher: the frozen teacher; may be None when every label is cached.
        labeller: runs the teacher on a batch (default: `cloud.distill.label` with `config`).
        batch_size: misses labelled and stored per batch, so an interrupted pass keeps its work.
    """
    if batch_size < 1:
        raise ConfigError(f"`batch_size` must be >= 1, got {batch_size}")
    prompt = prompt_digest(formatter)
    keys = [label_key(teacher_hash, s, config, prompt) for s in samples]
    found: list[TeacherLabel | None] = [cache.get(k) for k in keys]
    stats = CacheStats(hits=sum(lab is not None for lab in found))
    missing = [i for i, lab in enumerate(found) if lab is None]
    stats.misses = len(missing)
    if missing and teacher is None and labeller is None:
        raise ConfigError(f"{len(missing)} labels are not cached and no `teacher` was given")

    def default(batch: Sequence[DistillSample]) -> list[TeacherLabel]:
        if teacher is None:
            raise ConfigError("no `teacher` to label cache misses with")
        return label(teacher, batch, formatter, max_new_tokens=config.max_new_tokens,
                     prefer_reference=config.prefer_reference)

    run = labeller or default
    start = time.monotonic()
    for b in range(0, len(missing), batch_size):
        idx = missing[b:b + batch_size]
        for i, lab in zip(idx, run([samples[i] for i in idx]), strict=True):
            cache.put(keys[i], lab)
            found[i] = lab
    stats.label_s = time.monotonic() - start
    if missing:
        log.info("labelled %d samples (%d cached) in %.2f s", stats.misses, stats.hits,
                 stats.label_s)
    return [lab for lab in found if lab is not None], stats
