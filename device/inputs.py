"""Input streams of the agent: the zoo's procedural QA stream, or a folder of media + questions.

Every stream has a stable name and random access by position, so a restarted agent resumes at
the outbox's committed cursor instead of answering (and uploading) samples twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.errors import ConfigError
from shared.media import procedural as P

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")


@dataclass(frozen=True, slots=True)
class InputItem:
    """One question about one clip or image."""

    sample_id: str
    frames: torch.Tensor
    """uint8 (F, H, W, 3)."""
    question: str
    media_kind: str
    answer: str | None = None
    """Ground truth when the stream has it (evaluation only; never uploaded)."""
    meta: dict[str, str] = field(default_factory=dict)


class ProceduralInput:
    """Round-robin over `domains` of the zoo's procedural streams (a mixed stream when > 1)."""

    def __init__(self, domains: list[str], seed: int, media_kind: str,
                 limit: int | None = None, generator: P.GeneratorConfig | None = None) -> None:
        for d in domains:
            if d not in P.DOMAINS:
                raise ConfigError(f"`input.domains`: {d!r} is not one of {P.DOMAINS}")
        if not domains:
            raise ConfigError("`input.domains` must name at least one domain")
        self.domains, self.seed, self.media_kind, self.limit = domains, seed, media_kind, limit
        self.generator = generator or P.GeneratorConfig()
        """Scene geometry; match the student's training data (frame size, frames per video)."""
        g = self.generator
        self.name = (f"procedural:{'+'.join(domains)}:{seed}:{media_kind}:"
                     f"{g.frame_size}px:{g.num_frames}f")

    def item(self, position: int) -> InputItem:
        """The item at `position` of the interleaved stream."""
        domain = self.domains[position % len(self.domains)]
        s = P.sample(domain, self.seed, position // len(self.domains), self.media_kind,
                     self.generator)
        return InputItem(s.sample_id, s.frames, s.question, s.media_kind, s.answer,
                         {"domain": domain, "qtype": s.qtype})

    def iterate(self, start: int) -> Iterator[tuple[int, InputItem]]:
        """(position, item) from `start` to the limit (forever without one)."""
        pos = start
        while self.limit is None or pos < self.limit:
            yield pos, self.item(pos)
            pos += 1


class FolderInput:
    """`questions.jsonl` ({"id", "media", "question"[, "answer"]}) beside the media files."""

    def __init__(self, folder: Path, limit: int | None = None) -> None:
        index = folder / "questions.jsonl"
        if not index.is_file():
            raise ConfigError(f"`input.folder` {str(folder)!r} has no questions.jsonl")
        self.folder = folder
        self.rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
        for i, r in enumerate(self.rows):
            if not {"id", "media", "question"} <= set(r):
                raise ConfigError(f"questions.jsonl line {i + 1}: needs id, media, question")
        self.limit = len(self.rows) if limit is None else min(limit, len(self.rows))
        self.name = f"folder:{folder.resolve()}"

    def iterate(self, start: int) -> Iterator[tuple[int, InputItem]]:
        """(position, item) from `start` to the end of the index."""
        for pos in range(start, self.limit):
            r = self.rows[pos]
            frames = load_media(self.folder / r["media"])
            kind = "image" if frames.shape[0] == 1 else "video"
            yield pos, InputItem(str(r["id"]), frames, str(r["question"]), kind, r.get("answer"))


def load_media(path: Path) -> torch.Tensor:
    """uint8 (F, H, W, 3) frames of a .npy array, an image or a video file."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif suffix in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))[None]
    elif suffix in VIDEO_SUFFIXES:
        import av

        with av.open(str(path)) as container:
            arr = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    else:
        raise ConfigError(f"media {str(path)!r}: unsupported suffix {suffix!r}")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ConfigError(f"media {str(path)!r}: expected uint8 (F, H, W, 3), "
                          f"got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.array(arr, dtype=np.uint8, order="C", copy=True))


def generator_for(image_size: int, num_frames: int) -> P.GeneratorConfig:
    """Procedural scenes at the student's input size (the nearest valid multiple of 16)."""
    size = max(32, round(image_size / 16) * 16)
    return P.GeneratorConfig(frame_size=size, num_frames=max(4, min(32, num_frames)))
