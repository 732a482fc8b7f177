"""Versioned adapter weights on disk: write + fsync a new version, then swap one pointer file.

Layout under `<data_dir>/adapters/`: `v<version>.safetensors` per kept version and `CURRENT`
(JSON: version, previous, probation). A swap is `rename(CURRENT.tmp, CURRENT)` after both the
new weights and the temp pointer are fsynced, so a crash leaves either the old or the new
version current, never a torn one. `probation` is true between a swap and its probe verdict;
a restart during probation goes back to the previous version (the update was never vetted).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.errors import ConfigError

log = logging.getLogger(__name__)

POINTER = "CURRENT"


@dataclass(frozen=True, slots=True)
class Pointer:
    """Which version serves, which one to roll back to, and whether the probe is pending."""

    version: int
    previous: int | None
    probation: bool = False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """Adapter versions of one device; keeps the current and the previous version."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, version: int) -> Path:
        return self.dir / f"v{version:010d}.safetensors"

    def pointer(self) -> Pointer | None:
        """The current pointer, or None for a fresh device."""
        path = self.dir / POINTER
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return Pointer(int(raw["version"]), raw.get("previous"), bool(raw.get("probation")))

    def write(self, version: int, state: dict[str, torch.Tensor]) -> Path:
        """Persist one version's weights durably (temp file, fsync, rename, fsync dir)."""
        path = self._path(version)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
                  metadata={"version": str(version)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.dir)
        return path

    def read(self, version: int) -> dict[str, torch.Tensor]:
        """The weights of a stored version (safetensors: no pickle)."""
        path = self._path(version)
        if not path.exists():
            raise ConfigError(f"adapter version {version} is not stored in {self.dir}")
        return load_file(str(path))

    def swap(self, pointer: Pointer) -> None:
        """Atomically make `pointer` current, then drop versions no longer referenced."""
        tmp = self.dir / (POINTER + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"version": pointer.version, "previous": pointer.previous,
                       "probation": pointer.probation}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / POINTER)
        _fsync_dir(self.dir)
        keep = {self._path(pointer.version).name}
        if pointer.previous is not None:
            keep.add(self._path(pointer.previous).name)
        for p in self.dir.glob("v*.safetensors"):
            if p.name not in keep:
                p.unlink()

    def versions(self) -> list[int]:
        """Stored versions, ascending."""
        return sorted(int(p.stem[1:]) for p in self.dir.glob("v*.safetensors"))
