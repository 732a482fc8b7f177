"""Tiny VLMs built from configs: architectures, tokenizer, processor, checkpoints, evaluation.

See `shared.models.architectures` for the shared-vision-tower design of teacher and student.
"""

from shared.models.architectures import ARCHITECTURES, VLMSpec, build_vlm, visual_hash
from shared.models.checkpoint import QUANTIZATIONS, LoadedVLM, load_vlm, save_vlm
from shared.models.evaluate import evaluate, first_frame_only, generate_answers
from shared.models.processor import ProcessorConfig, VLMProcessor

__all__ = [
    "ARCHITECTURES", "QUANTIZATIONS", "LoadedVLM", "ProcessorConfig", "VLMProcessor", "VLMSpec",
    "build_vlm", "evaluate", "first_frame_only", "generate_answers", "load_vlm", "save_vlm",
    "visual_hash",
]
