"""Visual-token compressors (VidCom2, SparseVLM, baselines) and their one registry.

Build one from settings: `COMPRESSORS.build(settings.compressor, settings.compressor_config())`.
Known names: "none", "random", "uniform", "vidcom2", "sparsevlm", "vidcom2+sparsevlm".
"""

from __future__ import annotations

from device.compress.base import KeepPlan, Stage, TokenCompressor, VisualBatch
from device.compress.baselines import (
    NoCompressionConfig,
    NoCompressor,
    RandomCompressor,
    RandomConfig,
    UniformCompressor,
    UniformConfig,
)
from device.compress.sparsevlm import (
    SparseVLMCompressor,
    SparseVLMConfig,
    VidCom2SparseVLMConfig,
)
from device.compress.vidcom2 import VidCom2Compressor, VidCom2Config
from shared.registry import Registry

COMPRESSORS: Registry[TokenCompressor] = Registry("token compressor")
COMPRESSORS.register("none", NoCompressionConfig, NoCompressor)
COMPRESSORS.register("random", RandomConfig, RandomCompressor)
COMPRESSORS.register("uniform", UniformConfig, UniformCompressor)
COMPRESSORS.register("vidcom2", VidCom2Config, VidCom2Compressor)
# In-LLM (Stage.IN_LLM): run inside the decoder with device.vlm.sparsevlm_hooks.SparseVLMPruner.
COMPRESSORS.register("sparsevlm", SparseVLMConfig, SparseVLMCompressor)
COMPRESSORS.register("vidcom2+sparsevlm", VidCom2SparseVLMConfig, SparseVLMCompressor)

__all__ = ["COMPRESSORS", "KeepPlan", "Stage", "TokenCompressor", "VisualBatch"]
