"""A tiny LLaVA-OneVision teacher/student pair with a word-level tokenizer, built in-process."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from cloud.distill import DistillSample, PromptFormatter

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<ans>", "<image>", "<video>"]
WORDS = ("what colour is the shape how many shapes are there red green blue one two three "
         "circle square moving left right").split()
HIDDEN = 32
K = 6


def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS with the zoo's special tokens."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def formatter() -> PromptFormatter:
    """Zoo layout: <bos> K x <video> question <ans> answer <eos>."""
    tok = tokenizer()
    ids = tok.convert_tokens_to_ids(["<pad>", "<bos>", "<eos>", "<ans>", "<video>"])
    return PromptFormatter(tokenizer=tok, pad_id=ids[0], bos_id=ids[1], eos_id=ids[2],
                           answer_id=ids[3], visual_id=ids[4])


def vlm(layers: int, seed: int) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OV with a 1-layer SigLIP and a Qwen2 LLM of width HIDDEN and `layers` layers."""
    tok = tokenizer()
    ids = tok.convert_tokens_to_ids(["<pad>", "<bos>", "<eos>", "<image>", "<video>"])
    cfg = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=HIDDEN,
                         intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=ids[0], bos_token_id=ids[1],
                         eos_token_id=ids[2], tie_word_embeddings=True,
                         initializer_range=HIDDEN ** -0.5),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16,
                           patch_size=4),
        image_token_index=ids[3], video_token_index=ids[4],
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 16]], tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlavaOnevisionForConditionalGeneration._from_config(cfg).eval()


def samples(n: int, seed: int, with_reference: bool = False) -> list[DistillSample]:
    """Random post-projector visual tokens (K, HIDDEN) and template questions."""
    g = torch.Generator().manual_seed(seed)
    questions = ["what colour is the shape", "how many shapes are there",
                 "what shape is moving left", "is the circle red"]
    answers = ["red", "two", "square", "green"]
    out = []
    for i in range(n):
        k = K - int(torch.randint(0, 3, (1,), generator=g))  # compressed: 4..6 tokens kept
        out.append(DistillSample(
            question=questions[i % len(questions)],
            visual_tokens=torch.randn(k, HIDDEN, generator=g),
            positions=torch.sort(torch.randperm(K, generator=g)[:k]).values,
            grid=(1, 2, 3),
            reference_answer=answers[i % len(answers)] if with_reference else None,
            sample_id=f"s{seed}-{i}",
        ))
    return out
