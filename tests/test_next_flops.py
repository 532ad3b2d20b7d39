"""hybrid_vlm.flops on LLaVA-NeXT against FlopCounterMode: every crop through the tower, a method
before the LLM reading per crop and selecting per image (or per crop), pdrop and dart over the packed
spans, FastV after them; and the groups the MACs model assumes against the engine's own."""

from __future__ import annotations

import pytest
import torch
from test_flops import counted_macs

from hybrid_vlm import HybridConfig, apply_hybrid, flops, remove_hybrid
from hybrid_vlm.adapters import anyres_images, selection_groups
from hybrid_vlm.hf_compat import output_cache
from hybrid_vlm.hf_compat.llava_next import anyres_layouts
from hybrid_vlm.tiny import build_tiny_llava_next, synthetic_image

from conftest import chat_prompt

# (width, height): a wide image; one of about 30:1 whose grid crops unpadding leaves with 48 patches
# each, and one of 100:1 whose grid crops it leaves with none
SIZES = {"wide": (336, 200), "strip": (672, 22), "sliver": (1000, 10)}


@pytest.fixture(scope="module")
def next_model():
    model, processor = build_tiny_llava_next(text_layers=8)
    return model, processor


def prompt_inputs(processor, size: tuple[int, int]):
    prompt = chat_prompt(processor, "describe this picture briefly, what is on the left and on the right?")
    return processor(images=[synthetic_image(0).resize(size)], text=[prompt], return_tensors="pt")


def counted_run(model, inputs, config: HybridConfig | None):
    """(FlopCounterMode's MACs by part, the visual counts the engine recorded or None for stock)."""
    if config is None:
        counted, _ = counted_macs(model, **inputs, use_cache=True, logits_to_keep=1)
        return counted, None
    apply_hybrid(model, config)
    try:
        counted, output = counted_macs(model, **inputs, use_cache=True, logits_to_keep=1)
    finally:
        remove_hybrid(model)
    return counted, output_cache(output).hybrid_state.visual_counts()


CONFIGS = {
    "stock": (None, 0),
    "fastv-k64": (HybridConfig(fastv_k=64), 0),
    "fastv-k64-newlines-keep": (HybridConfig(fastv_k=64, fastv_newlines="keep"), 0),  # 64 of the patches, and every newline
    "random-r0.5-newlines-keep": (HybridConfig(fastv_k=0.5, fastv_select="random", fastv_newlines="keep"), 0),
    "random-r0.25": (HybridConfig(fastv_k=0.25, fastv_select="random"), 0),
    "visionzip-0.11": (HybridConfig(visual_method="visionzip", visual_budget=0.11), 0),
    "visionzip-40-per-crop": (HybridConfig(visual_method="visionzip", visual_budget=40, budget_scope="crop"), 0),
    "vispruner-300-per-crop": (HybridConfig(visual_method="vispruner", visual_budget=300, budget_scope="crop"), 0),
    "vispruner-64": (HybridConfig(visual_method="vispruner", visual_budget=64), 0),
    "divprune-0.1-fastv-k16": (HybridConfig(visual_method="divprune", visual_budget=0.1, fastv_k=16), 0),
    # the staged methods' scoring is modelled, not traced op by op (key norms, one query row): within 0.2%
    "pdrop-0.3": (HybridConfig(visual_method="pdrop", visual_budget=0.3), 2e-3),
    "dart-320": (HybridConfig(visual_method="dart", visual_budget=320), 2e-3),
}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_next_prefill_matches_flop_counter(next_model, name, size):
    """The whole prefill of one LLaVA-NeXT prompt, counted from the image size and the config alone
    (the visual counts are derived, not read from the run), equals FlopCounterMode's count of the
    forward that ran; the tower and the projector match part by part."""
    model, processor = next_model
    config, tolerance = CONFIGS[name]
    inputs = prompt_inputs(processor, SIZES[size])
    counted, _ = counted_run(model, inputs, config)
    text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    images = anyres_images(model, inputs["image_sizes"])
    expected = flops.next_method_prefill_macs(flops.shape_from_config(model.config), config or HybridConfig(), images, text, attention="dense")
    if config is None or config.staged_method is None:  # pdrop and dart rank the packed span after the tower
        assert counted["projector"] == expected.projector
    if config is None or config.pre_llm_method not in ("visionzip", "vispruner"):  # their own CLIP loop runs outside the tower module
        assert counted["vision"] == expected.vision
    assert sum(counted.values()) == pytest.approx(expected.total, rel=tolerance, abs=0)


def test_next_counts_follow_the_packed_span_and_the_budget(next_model):
    """The counts the MACs model derives are the ones the engine records: stock's packed span is the
    prompt's image tokens; a per-crop budget keeps min(budget, patches) in each crop that has any."""
    model, processor = next_model
    config = HybridConfig(visual_method="visionzip", visual_budget=60, budget_scope="crop")
    seen = []
    for size in ("strip", "sliver"):
        inputs = prompt_inputs(processor, SIZES[size])
        (image,) = anyres_images(model, inputs["image_sizes"])
        assert image.tokens == int((inputs["input_ids"] == model.config.image_token_id).sum())
        _, counts = counted_run(model, inputs, config)
        assert counts.entered[0] == sum(min(60, patches) for patches in image.crop_patches)
        seen += image.crop_patches
    assert 0 in seen and any(0 < patches < 60 for patches in seen)  # both edges of a per-crop budget


@pytest.mark.parametrize("size", [(336, 200), (250, 500), (672, 22), (22, 672), (336, 336), (900, 300)])
def test_anyres_images_have_the_engine_selection_groups(next_model, size):
    """AnyresImage's candidates per selection are the sizes of the engine's `selection_groups`,
    per image and per crop, and its packed tokens the layout's."""
    model, _ = next_model
    image_sizes = torch.tensor([[size[1], size[0]]])
    (layout,), (image,) = anyres_layouts(model, image_sizes), anyres_images(model, image_sizes)
    assert image.tokens == layout.num_tokens and image.crops == layout.num_crops
    for per_crop in (False, True):
        assert image.selection_groups(per_crop) == [len(group) for group in selection_groups(layout, 576, per_crop)]


def test_next_text_only_row_counts_no_tower():
    config = HybridConfig(visual_method="divprune", visual_budget=0.1)
    macs = flops.next_method_prefill_macs(flops.LLAVA_15_7B, config, [], 60)
    assert macs.vision == macs.projector == macs.selection == 0
    assert macs.total == flops.llm_prefill_macs(flops.LLAVA_15_7B.llm, 60)


def test_next_dymu_is_refused():
    with pytest.raises(ValueError, match="DyMU"):
        flops.next_method_prefill_macs(flops.LLAVA_15_7B, HybridConfig(dymu="thresholds.json"), [flops.AnyresImage((576, 576), 1176)], 60)


def test_next_per_crop_reads_charge_every_crop():
    """VisionZip's [CLS] row runs over each crop's 577 tokens, however much unpadding leaves of it,
    while its similarity scoring runs per selection over the selection's candidates."""
    from hybrid_vlm.methods import VitDims, get_method, read_macs

    shape = flops.LLAVA_15_7B
    image = flops.AnyresImage((576, 0, 100), 700)
    config = HybridConfig(visual_method="visionzip", visual_budget=40, budget_scope="crop")
    kept, macs, _ = flops.next_selection_macs(shape, config, [image])
    method = get_method("visionzip")

    def dims(patches):
        return VitDims(patches, shape.vit.hidden, shape.vit.heads, shape.llm.hidden)

    assert kept == 80
    assert read_macs(method, dims(576)) == 577 * 1024
    assert macs == 3 * 577 * 1024 + method.scoring_macs(40, dims(576)) + method.scoring_macs(40, dims(100))


@pytest.mark.parametrize("name", ["stock", "visionzip-40-per-crop", "divprune-0.1-fastv-k16", "pdrop-0.3"])
def test_a_next_prompt_of_two_images_counts_each_image(next_model, name):
    """Two images of different aspect ratios in one prompt: each image's crops, reads and selections
    (the NeXT plugin passes a row its images), pdrop ranking both spans as one pool."""
    model, processor = next_model
    config, tolerance = CONFIGS[name]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "compare the two pictures briefly"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [synthetic_image(0).resize(SIZES["wide"]), synthetic_image(1).resize(SIZES["strip"])]
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    counted, _ = counted_run(model, inputs, config)
    text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    anyres = anyres_images(model, inputs["image_sizes"])
    assert len(anyres) == 2 and anyres[0] != anyres[1]
    expected = flops.next_method_prefill_macs(flops.shape_from_config(model.config), config or HybridConfig(), anyres, text, attention="dense")
    assert sum(counted.values()) == pytest.approx(expected.total, rel=tolerance, abs=0)
