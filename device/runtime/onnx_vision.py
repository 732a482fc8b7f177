"""The student's vision encoder (tower + projector + video pooling) as an ONNX Runtime session.

`device-agent export-onnx` exports it from the loaded student (batch >= 2 in the example, batch
axis dynamic), quantizes it to int8 (dynamic, weights int8) with onnxruntime, and checks both
files against torch on procedural videos; the report carries the max |diff|. At run time
`OnnxVisionEncoder` replaces `CompressedVLM.encode` for LLaVA-OneVision videos.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from device.vlm.archs import VisualItem
from shared.errors import ConfigError

log = logging.getLogger(__name__)


class _VideoEncoder(nn.Module):
    """pixel_values_videos (B, F, 3, S, S) -> post-projector tokens (B, F*M + 1, D)."""

    def __init__(self, hf_model: Any) -> None:
        super().__init__()
        self.inner = hf_model.model

    def forward(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        out = self.inner.get_video_features(pixel_values_videos, return_dict=True).pooler_output
        return out if isinstance(out, torch.Tensor) else torch.stack(list(out))  # (B, N, D)


def _hf(model: Any) -> Any:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hf.config.model_type != "llava_onevision":
        raise ConfigError(f"ONNX vision export supports llava_onevision, got "
                          f"{hf.config.model_type!r}")
    return hf


def export_vision(model: Any, example: torch.Tensor, path: Path) -> Path:
    """Export the video encoder of `model` to `path` (float32)."""
    if example.shape[0] < 2:
        raise ConfigError("export example needs batch >= 2 so the batch axis stays dynamic")
    enc = _VideoEncoder(_hf(model)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, (example,), str(path), input_names=["pixel_values_videos"],
                          output_names=["features"], dynamo=False, opset_version=17,
                          dynamic_axes={"pixel_values_videos": {0: "batch"},
                                        "features": {0: "batch"}})
    return path


def quantize_int8(src: Path, dst: Path) -> Path:
    """onnxruntime dynamic int8 quantization of `src` into `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


class OnnxVisionEncoder:
    """`encode(inputs)` with the same result type as `CompressedVLM.encode` (videos only)."""

    def __init__(self, path: Path, model: Any) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise ConfigError(f"`model.onnx_vision` {str(path)!r} does not exist; run "
                              "`device-agent export-onnx` first")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        _hf(model)

    def features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, S, S) -> (B, N, D) float32."""
        out = self.session.run(None, {"pixel_values_videos":
                                      pixel_values_videos.float().numpy()})[0]
        return torch.from_numpy(np.asarray(out))

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, list[VisualItem]]:
        """Visual items per modality (LLaVA-OV: F frames of M pooled tokens + 1 newline)."""
        if inputs.get("pixel_values") is not None:
            raise ConfigError("the ONNX vision encoder serves videos only; got image input")
        pv = inputs["pixel_values_videos"]  # (B, F, 3, S, S)
        feats = self.features(pv)  # (B, N, D)
        frames = int(pv.shape[1])
        m = (feats.shape[1] - 1) // frames
        side = math.isqrt(m)
        grid = (side, side) if side * side == m else None
        return {"image": [], "video": [VisualItem("video", f, frames, m, grid, extra=1)
                                       for f in feats]}


def export_from_settings(settings: Any) -> dict[str, object]:
    """`device-agent export-onnx`: export, quantize, check against torch; returns a report."""
    from device.runtime.loader import StudentConfig, load_student
    from shared.media import procedural as P

    m = settings.model
    if m is None:
        raise ConfigError("field `model`: missing; export-onnx needs [model] checkpoint_dir")
    target = m.onnx_vision or settings.data_dir / "vision.int8.onnx"
    student = load_student(StudentConfig(m.checkpoint_dir, "fp32", m.adapter_dir, m.lora_r,
                                         m.lora_alpha, m.lora_targets, attention_scores=False))
    samples = [P.sample(d, 0, i) for i, d in enumerate(P.DOMAINS)]
    pv = student.processor(samples)["pixel_values_videos"]  # (B, F, 3, S, S)
    fp32_path = target.with_name(target.stem.replace(".int8", "") + ".fp32.onnx")
    export_vision(student.model, pv[:2], fp32_path)
    quantize_int8(fp32_path, target)
    with torch.no_grad():
        ref = _VideoEncoder(_hf(student.model)).eval()(pv)  # (B, N, D)
    report: dict[str, object] = {"fp32": str(fp32_path), "int8": str(target),
                                 "check_batch": int(pv.shape[0])}
    for name, path in (("fp32", fp32_path), ("int8", target)):
        got = OnnxVisionEncoder(path, student.model).features(pv)
        report[f"{name}_max_abs_diff"] = float((got - ref).abs().max())
        report[f"{name}_rel_diff"] = float((got - ref).norm() / ref.norm())
        report[f"{name}_bytes"] = path.stat().st_size
    log.info("exported vision encoder", extra=report)
    return report
