"""Uplink samplers (UTS; random selection as its control) and their registry:
`SAMPLERS.build(settings.sampler, options)`."""

from __future__ import annotations

from device.sampling.base import InferenceRecord, Sampler, Selection
from device.sampling.random_policy import RandomSampler, RandomSamplerConfig
from device.sampling.uncertainty import UncertaintySampler, UncertaintySamplerConfig
from shared.registry import Registry

SAMPLERS: Registry[Sampler] = Registry("uplink sampler")
SAMPLERS.register("uts", UncertaintySamplerConfig, UncertaintySampler)
SAMPLERS.register("random", RandomSamplerConfig, RandomSampler)

__all__ = ["SAMPLERS", "InferenceRecord", "RandomSampler", "RandomSamplerConfig", "Sampler",
           "Selection", "UncertaintySampler", "UncertaintySamplerConfig"]
