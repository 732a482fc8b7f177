"""ONNX export of the vision encoder: fp32 matches torch, int8 stays close, and the agent's
inference path gives the same kept tokens with the fp32 session as with torch."""

from __future__ import annotations

from pathlib import Path

import torch

from device.compress import COMPRESSORS
from device.runtime.inference import DeviceInference
from device.runtime.loader import StudentConfig, load_student
from device.runtime.onnx_vision import OnnxVisionEncoder, export_vision, quantize_int8
from shared.media import procedural as P


def test_export_quantize_and_serve(tiny_ckpt: Path, tmp_path: Path) -> None:
    st = load_student(StudentConfig(tiny_ckpt))
    samples = P.batch("clutter", 3, seed=5)
    pv = st.processor(samples)["pixel_values_videos"]
    fp32 = export_vision(st.model, pv[:2], tmp_path / "v.fp32.onnx")
    int8 = quantize_int8(fp32, tmp_path / "v.int8.onnx")
    assert int8.stat().st_size < fp32.stat().st_size
    ref = st.model.get_base_model().model.get_video_features(pv, return_dict=True).pooler_output
    ref = torch.stack(list(ref)) if not isinstance(ref, torch.Tensor) else ref
    got = OnnxVisionEncoder(fp32, st.model).features(pv)  # batch 3: the axis is dynamic
    assert got.shape == ref.shape and float((got - ref).abs().max()) < 1e-4
    q = OnnxVisionEncoder(int8, st.model).features(pv)
    assert float((q - ref).norm() / ref.norm()) < 0.1
    comp = COMPRESSORS.build("vidcom2", {})
    a = DeviceInference(st, comp, 2).run([s.frames for s in samples],
                                         [s.question for s in samples], ["a", "b", "c"])
    b = DeviceInference(st, comp, 2, encoder=OnnxVisionEncoder(fp32, st.model)).run(
        [s.frames for s in samples], [s.question for s in samples], ["a", "b", "c"])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.record.keep, y.record.keep)
        assert torch.allclose(x.features, y.features, atol=1e-4)


def test_export_onnx_command_reports_the_check(tiny_ckpt: Path, tmp_path: Path,
                                               capsys) -> None:  # noqa: ANN001
    import json

    from device.__main__ import main

    cfg = tmp_path / "d.toml"
    cfg.write_text(f'device_id = "cam-1"\ndata_dir = "{tmp_path}"\ninsecure = true\n'
                   f'[model]\ncheckpoint_dir = "{tiny_ckpt}"\n'
                   f'onnx_vision = "{tmp_path / "vision.int8.onnx"}"\n')
    assert main(["export-onnx", "--config", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["fp32_max_abs_diff"] < 1e-4 and report["int8_rel_diff"] < 0.1
    assert report["int8_bytes"] < report["fp32_bytes"]
    assert (tmp_path / "vision.int8.onnx").is_file() and (tmp_path / "vision.fp32.onnx").is_file()
