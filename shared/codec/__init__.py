"""Adapter-update codecs (DWC downlink). Cloud encodes and device decodes with the same code.

    codec = CODECS.build("dwc", {"energy_share": 0.9, "bits": 8, "budget_bytes": 200_000})
    enc = codec.encode(new_adapter, device_adapter, residual=previous.residual)
    new_on_device = codec.decode(enc.payload, device_adapter)
"""

from __future__ import annotations

from shared.codec.base import CodecStats, DeltaCodec, EncodedUpdate, StateDict, TensorStats
from shared.codec.dense import DenseFp16Codec, DenseFp16Config
from shared.codec.dwc import DWCConfig, DynamicDeltaCodec
from shared.registry import Registry

CODECS: Registry[DeltaCodec] = Registry("delta codec")
CODECS.register("dwc", DWCConfig, DynamicDeltaCodec)
CODECS.register("dense-fp16", DenseFp16Config, DenseFp16Codec)

__all__ = [
    "CODECS", "CodecStats", "DeltaCodec", "DenseFp16Codec", "DenseFp16Config", "DWCConfig",
    "DynamicDeltaCodec", "EncodedUpdate", "StateDict", "TensorStats",
]
