"""Uploaded visual tokens keep their full-prompt RoPE positions in distillation prompts (the
layout a device serving with `original_positions` and the zoo's token-drop training use)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cloud.distill import label
from cloud.distill.prompt import pack
from shared.errors import ConfigError
from tests.distill import tiny_pair


def test_kept_tokens_sit_at_their_grid_positions_and_text_after_the_full_block() -> None:
    fmt = dataclasses.replace(tiny_pair.formatter(), full_visual=10)
    answer = torch.tensor(fmt.answer_ids("red"))
    batch = pack(fmt, ["what colour is the shape", "is the circle red"], [3, 10],
                 [answer, answer], [torch.tensor([1, 4, 9]), None])
    v0 = batch.visual_positions[0]
    assert torch.equal(batch.position_ids[0, v0], int(v0[0]) + torch.tensor([1, 4, 9]))
    assert torch.equal(batch.position_ids[0, : int(v0[0])], torch.arange(int(v0[0])))
    after = torch.arange(int(v0[-1]) + 1, int(batch.attention_mask[0].sum()))
    assert torch.equal(batch.position_ids[0, after], after + 10 - 3)  # past the full block
    n1 = int(batch.attention_mask[1].sum())  # no positions given: compact
    assert torch.equal(batch.position_ids[1, :n1], torch.arange(n1))
    assert int(batch.position_ids[0, int(batch.attention_mask[0].sum()):].abs().sum()) == 0


def test_without_full_block_size_positions_are_compact() -> None:
    fmt = tiny_pair.formatter()
    answer = torch.tensor(fmt.answer_ids("red"))
    batch = pack(fmt, ["is the circle red"], [3], [answer], [torch.tensor([1, 4, 9])])
    n = int(batch.attention_mask[0].sum())
    assert torch.equal(batch.position_ids[0, :n], torch.arange(n))


@pytest.mark.parametrize("positions", [[1, 4, 10], [4, 1, 2], [1, 1, 2], [1, 2]])
def test_positions_outside_or_out_of_order_are_refused(positions: list[int]) -> None:
    fmt = dataclasses.replace(tiny_pair.formatter(), full_visual=10)
    answer = torch.tensor(fmt.answer_ids("red"))
    with pytest.raises(ConfigError, match="visual positions must be 3 ascending"):
        pack(fmt, ["is the circle red"], [3], [answer], [torch.tensor(positions)])


def test_teacher_reads_the_positions() -> None:
    teacher = tiny_pair.vlm(2, seed=1)
    sample = tiny_pair.samples(1, seed=3)[0]
    compact = label(teacher, [sample], tiny_pair.formatter(), max_new_tokens=1)[0]
    spread = dataclasses.replace(sample, positions=sample.positions * 5)
    fmt = dataclasses.replace(tiny_pair.formatter(), full_visual=5 * tiny_pair.K)
    placed = label(teacher, [spread], fmt, max_new_tokens=1)[0]
    again = label(teacher, [spread], fmt, max_new_tokens=1)[0]
    assert torch.equal(placed.logits, again.logits)
    k = sample.visual_tokens.shape[0]
    assert not torch.allclose(compact.hidden[:k], placed.hidden[:k], atol=1e-4)
