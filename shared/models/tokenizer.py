"""Offline word-level tokenizer trained with `tokenizers` on the task's own vocabulary.

No hub download: the vocabulary is every word of the question templates and answers of
`shared.media.procedural`, plus the special tokens both architectures need. It is wrapped in a
`PreTrainedTokenizerFast`, so it saves and loads like any Hugging Face tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from shared.media import procedural as P

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
ANSWER = "<ans>"
"""Separates the question from the answer; generation starts after it."""
IMAGE, VIDEO = "<image>", "<video>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, ANSWER, IMAGE, VIDEO, VISION_START,
                                   VISION_END)


def task_corpus() -> list[str]:
    """Every question template instantiation's words and every answer word."""
    lines = [
        "what colour was the flash?",
        "which way is the object moving?",
        *[f"how many {c} objects are there?" for c in P.COLOR_NAMES],
        *[f"is there a {c} {s}?" for c in P.COLOR_NAMES for s in P.SHAPES],
        *[f"what colour is the {s}?" for s in P.SHAPES],
        *[f"what shape is the {c} object?" for c in P.COLOR_NAMES],
        " ".join(P.COLOR_NAMES), " ".join(P.SHAPES), " ".join(P.DIRECTIONS),
        " ".join(P.COUNT_WORDS), "yes no",
    ]
    return lines


def train_tokenizer(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train the word-level tokenizer (milliseconds) and wrap it for transformers."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator(corpus if corpus is not None else task_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"answer_token": ANSWER, "image_token": IMAGE,
                              "video_token": VIDEO, "vision_start_token": VISION_START,
                              "vision_end_token": VISION_END},
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    return fast
