"""Uplink samplers (UTS) and their registry: `SAMPLERS.build(settings.sampler, options)`."""

from __future__ import annotations

from device.sampling.base import InferenceRecord, Sampler, Selection
from device.sampling.uncertainty import UncertaintySampler, UncertaintySamplerConfig
from shared.registry import Registry

SAMPLERS: Registry[Sampler] = Registry("uplink sampler")
SAMPLERS.register("uts", UncertaintySamplerConfig, UncertaintySampler)

__all__ = ["SAMPLERS", "InferenceRecord", "Sampler", "Selection", "UncertaintySampler",
           "UncertaintySamplerConfig"]
