"""AKD's inputs_embeds path equals the stock `mm_encoder_outputs` path on zoo architectures."""

from __future__ import annotations

import pytest
import torch

from cloud.distill import DistillSample, PromptFormatter
from cloud.distill.akd import _forward
from cloud.distill.prompt import pack

models = pytest.importorskip("shared.models")
arch = pytest.importorskip("shared.models.architectures")
zoo = pytest.importorskip("shared.models.zoo")
procedural = pytest.importorskip("shared.media.procedural")


def test_formatter_and_embeds_match_the_processor_and_stock_forward() -> None:
    tok, ids = zoo.make_tokenizer_ids()
    spec = models.VLMSpec(text_layers=2, vision_layers=1)
    teacher = models.build_vlm(spec, ids, seed=1)
    proc = models.VLMProcessor.from_spec(spec, tok)
    fmt = PromptFormatter.from_processor(proc, "video")
    sample = procedural.batch("color_cast", 1, seed=3,
                              config=procedural.GeneratorConfig(frame_size=spec.image_size,
                                                                num_frames=spec.num_frames))[0]
    inputs = proc([sample])
    with torch.no_grad():
        feats = arch.encode_visual(teacher, arch.pixel_keys(inputs))["video"][0]  # (N, D)
        stock = teacher(**arch.text_keys(inputs), mm_encoder_outputs=arch.as_encoder_outputs(
            teacher, {"video": [feats]})).logits[0]
    ds = DistillSample(question=sample.question, visual_tokens=feats)
    batch = pack(fmt, [ds.question], [feats.shape[0]], [torch.zeros(0, dtype=torch.long)])
    assert torch.equal(batch.input_ids[0], inputs["input_ids"][0])
    with torch.no_grad():
        mine = _forward(teacher, batch, [ds])[0][0]
    torch.testing.assert_close(mine, stock, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["visual_first", "question_first", "question_both"])
def test_formatter_follows_the_processor_prompt_layout(layout: str) -> None:
    from shared.models.processor import VLMProcessor

    tok, _ = zoo.make_tokenizer_ids()
    spec = models.VLMSpec(text_layers=1, vision_layers=1)
    proc = VLMProcessor.from_spec(spec, tok, layout)
    fmt = PromptFormatter.from_processor(proc, "video")
    assert fmt.layout == layout
    sample = procedural.batch("source", 1, seed=3, config=procedural.GeneratorConfig(
        frame_size=spec.image_size, num_frames=spec.num_frames))[0]
    inputs = proc([sample])
    k = int((inputs["input_ids"][0] == fmt.visual_id).sum())
    batch = pack(fmt, [sample.question], [k], [torch.zeros(0, dtype=torch.long)])
    assert torch.equal(batch.input_ids[0], inputs["input_ids"][0])
