"""Real media: a folder of .mp4/.jpg/.png files plus a JSONL of questions and answers.

Each JSONL line is an object with `media` (path relative to the folder), `question`, `answer`
and optionally `qtype`, `domain` (default "real") and `id`. Files are decoded with PyAV, frames
sampled uniformly in time and resized with `shared.media.frames`, i.e. exactly the preprocessing
the procedural data gets, and returned as `QASample`s that the processor and `evaluate` accept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import torch

from shared.errors import ConfigError
from shared.media.frames import resize_frames, sample_indices
from shared.media.procedural import QASample

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


def decode_frames(path: str | Path) -> torch.Tensor:
    """All frames of a video (or the one frame of an image) as uint8 (F, H, W, 3) RGB."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"media file {str(p)!r} does not exist")
    try:
        with av.open(str(p)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as e:
        raise ConfigError(f"cannot decode {str(p)!r} as video or image: {e}") from None
    if not frames:
        raise ConfigError(f"{str(p)!r} has no video frames")
    return torch.from_numpy(np.stack(frames))  # (F, H, W, 3)


def load_media(path: str | Path, num_frames: int, size: int) -> torch.Tensor:
    """Decode, sample `num_frames` uniformly (videos) and resize to size x size: (F, S, S, 3)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in VIDEO_SUFFIXES | IMAGE_SUFFIXES:
        raise ConfigError(f"media {str(p)!r}: suffix {suffix!r} is not one of "
                          f"{sorted(VIDEO_SUFFIXES | IMAGE_SUFFIXES)}")
    frames = decode_frames(p)
    if suffix in VIDEO_SUFFIXES:
        frames = frames[sample_indices(frames.shape[0], num_frames)]
    else:
        frames = frames[:1]
    return resize_frames(frames, size)


def iter_real(folder: str | Path, questions: str | Path = "questions.jsonl",
              num_frames: int = 8, size: int = 48) -> Iterator[QASample]:
    """QASamples of a real-media folder, in JSONL order (relative `questions` is in `folder`)."""
    root = Path(folder)
    qpath = Path(questions) if Path(questions).is_absolute() else root / questions
    if not qpath.is_file():
        raise ConfigError(f"questions file {str(qpath)!r} does not exist")
    with qpath.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{qpath}:{lineno}: not JSON ({e})") from None
            missing = [k for k in ("media", "question", "answer") if not row.get(k)]
            if missing:
                raise ConfigError(f"{qpath}:{lineno}: missing field(s) {missing}; "
                                  "expected media, question, answer")
            frames = load_media(root / row["media"], num_frames, size)
            yield QASample(
                sample_id=str(row.get("id", f"{qpath.stem}-{lineno}")),
                domain=str(row.get("domain", "real")),
                media_kind="video" if frames.shape[0] > 1 else "image",
                frames=frames, question=str(row["question"]), answer=str(row["answer"]),
                qtype=str(row.get("qtype", "real")),
            )


def load_real(folder: str | Path, questions: str | Path = "questions.jsonl",
              num_frames: int = 8, size: int = 48) -> list[QASample]:
    """All samples of `iter_real` as a list."""
    return list(iter_real(folder, questions, num_frames, size))
