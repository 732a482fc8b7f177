"""DeviceSettings sections (TOML + env), and the raw-frames upload payload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from device.agent import build_upload_sample
from device.inputs import FolderInput, InputItem, ProceduralInput, load_media
from device.runtime.inference import Inference
from device.sampling.base import InferenceRecord, Selection
from device.settings import DeviceSettings
from shared.errors import ConfigError
from shared.settings import load_settings
from shared.types import SampleBatch
from shared.wire import convert


def test_nested_sections_from_toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'device_id = "cam-9"\ndata_dir = "{tmp_path}"\n'
                   f'[model]\ncheckpoint_dir = "{tmp_path}"\nquantization = "bnb4"\n'
                   '[sampler_options]\nmode = "budget"\n')
    monkeypatch.setenv("CDCA_DEVICE_MODEL__QUANTIZATION", "int8_dynamic")
    monkeypatch.setenv("CDCA_DEVICE_UPLINK__FULL_POLICY", "reject_new")
    s = load_settings(DeviceSettings, cfg)
    assert s.model is not None and s.model.quantization == "int8_dynamic"
    assert s.uplink.full_policy == "reject_new" and s.sampler_options == {"mode": "budget"}
    monkeypatch.setenv("CDCA_DEVICE_MODEL__QUANTIZATION", "int3")
    with pytest.raises(ConfigError, match="model.quantization"):
        load_settings(DeviceSettings, cfg)


def _inference(k: int = 5) -> Inference:
    rec = InferenceRecord("s1", torch.tensor([-0.1]), torch.tensor([0.2]), 50,
                          torch.rand(k), torch.arange(k) * 3)
    return Inference("red", rec, torch.randn(k, 16), (8, 3, 3), "video", 73)


def test_frames_payload_carries_sampled_uint8_frames() -> None:
    frames = torch.randint(0, 255, (16, 40, 40, 3), dtype=torch.uint8)
    item = InputItem("s1", frames, "what colour was the flash?", "video", "red",
                     {"domain": "blur", "qtype": "flash"})
    s = build_upload_sample(Selection("s1", 0.3, torch.tensor([0, 2])), item, _inference(),
                            "frames", "projected", "int8", num_frames=8)
    assert s.tokens is None and s.frames.shape == (8, 40, 40, 3) and s.frames.dtype == np.uint8
    assert s.meta == {"domain": "blur"}  # evaluation labels other than the domain stay home
    back = convert.decode_sample_batch(convert.encode_sample_batch(SampleBatch(0, (s,))),
                                       convert.UploadLimits()).samples[0]
    assert np.array_equal(back.frames, frames[[1, 3, 5, 7, 9, 11, 13, 15]].numpy())
    t = build_upload_sample(Selection("s1", 0.3, torch.tensor([0, 2])), item, _inference(),
                            "tokens", "projected", "float16", num_frames=8).tokens
    assert t.values.dtype == np.float16 and t.positions.tolist() == [0, 6] and t.scales is None


def test_inputs_resume_and_folder(tmp_path: Path) -> None:
    src = ProceduralInput(["source", "blur"], 1, "video", limit=5)
    got = list(src.iterate(3))
    assert [p for p, _ in got] == [3, 4] and got[0][1].meta["domain"] == "blur"
    assert got[0][1].sample_id == src.item(3).sample_id
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "questions.jsonl").write_text(
        '{"id": "a", "media": "a.npy", "question": "q?", "answer": "yes"}\n')
    (item,) = [i for _, i in FolderInput(tmp_path).iterate(0)]
    assert item.media_kind == "video" and item.answer == "yes"
    with pytest.raises(ConfigError, match="unsupported suffix"):
        load_media(tmp_path / "questions.jsonl")
    with pytest.raises(ConfigError, match="domains"):
        ProceduralInput(["mars"], 0, "video")


def test_prometheus_gauges_mirror_status() -> None:
    import urllib.request

    from device.metrics import DeviceMetrics

    m = DeviceMetrics("127.0.0.1:0")
    try:
        m.update({"samples_seen": 12, "uploaded_bytes": 3456, "adapter_version": 2, "x": "y"})
        port = m.server.server_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        m.close()
    text = body.decode()
    assert "cdca_device_samples_seen 12.0" in text and "cdca_device_adapter_version 2.0" in text
    with pytest.raises(ConfigError, match="metrics_address"):
        DeviceMetrics("nowhere")


def test_load_media_decodes_png_and_mp4(tmp_path: Path) -> None:
    import av
    from PIL import Image

    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :16] = (200, 30, 30)
    Image.fromarray(img).save(tmp_path / "a.png")
    png = load_media(tmp_path / "a.png")
    assert png.shape == (1, 32, 48, 3) and png[0, 0, 0].tolist() == [200, 30, 30]
    with av.open(str(tmp_path / "v.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(6):
            frame = np.full((32, 48, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    vid = load_media(tmp_path / "v.mp4")
    assert vid.shape == (6, 32, 48, 3) and vid.dtype == torch.uint8
    assert abs(int(vid[5].float().mean()) - 200) < 12  # lossy codec, brightness kept
