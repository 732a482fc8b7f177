"""Real-media loader: a tiny .mp4 written with PyAV and a .jpg, through the same preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from shared.errors import ConfigError
from shared.media import procedural as P
from shared.media.real import load_real


def _write_mp4(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_real_folder_round_trip(tmp_path: Path) -> None:
    src = P.batch("source", 1, seed=0)[0]
    # a 16-frame, 96 px clip: the loader must sample 8 frames and resize to 48 px
    frames = np.repeat(np.repeat(src.frames.numpy(), 2, axis=1), 2, axis=2)  # (8, 96, 96, 3)
    frames = np.repeat(frames, 2, axis=0)  # (16, 96, 96, 3)
    _write_mp4(tmp_path / "clip.mp4", frames)
    image = P.batch("source", 1, seed=0, media_kind="image")[0]
    Image.fromarray(image.frames[0].numpy()).save(tmp_path / "still.jpg", quality=95)
    rows = [{"media": "clip.mp4", "question": src.question, "answer": src.answer},
            {"media": "still.jpg", "question": image.question, "answer": image.answer,
             "qtype": image.qtype, "domain": "lab"}]
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    video, still = load_real(tmp_path, num_frames=8, size=48)
    assert video.media_kind == "video" and video.frames.shape == (8, 48, 48, 3)
    assert still.media_kind == "image" and still.frames.shape == (1, 48, 48, 3)
    assert still.domain == "lab" and video.domain == "real"
    # lossy codecs: close to the originals, frame by frame (uniform sampling keeps the order)
    err = (video.frames.float() - src.frames.float()).abs().mean()
    assert err < 12, f"decoded video differs from the source by {err:.1f} on average"
    assert (still.frames.float() - image.frames.float()).abs().mean() < 8


def test_real_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="questions file"):
        load_real(tmp_path)
    (tmp_path / "questions.jsonl").write_text(json.dumps({"media": "x.mp4"}) + "\n")
    with pytest.raises(ConfigError, match="missing field"):
        load_real(tmp_path)
    (tmp_path / "questions.jsonl").write_text(
        json.dumps({"media": "x.gif", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ConfigError, match="suffix"):
        load_real(tmp_path)
