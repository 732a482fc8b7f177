"""A tiny LLaVA-OneVision student checkpoint built from a config (no download), for device tests."""

from __future__ import annotations

from pathlib import Path

from shared.models.architectures import TokenIds, VLMSpec, build_vlm
from shared.models.processor import VLMProcessor
from shared.models.tokenizer import train_tokenizer

SPEC = VLMSpec(text_layers=2, text_intermediate=256, vision_layers=2)


def token_ids(tok) -> TokenIds:  # noqa: ANN001 - a PreTrainedTokenizerFast
    conv = tok.convert_tokens_to_ids
    return TokenIds(pad=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id,
                    image=conv("<image>"), video=conv("<video>"),
                    vision_start=conv("<|vision_start|>"), vision_end=conv("<|vision_end|>"),
                    vocab_size=len(tok))


def write_checkpoint(directory: Path, seed: int = 0, spec: VLMSpec = SPEC) -> Path:
    """save_pretrained of a random-init student and its processor into `directory`."""
    tok = train_tokenizer()
    model = build_vlm(spec, token_ids(tok), seed)
    model.save_pretrained(directory)
    VLMProcessor.from_spec(spec, tok).save_pretrained(directory)
    return directory
