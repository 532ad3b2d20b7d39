"""hybrid_vlm.flops against an independent count (FlopCounterMode on real modules) and the facts file."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hybrid_vlm import HybridConfig, apply_hybrid, flops, remove_hybrid
from hybrid_vlm.hf_compat import cache_kwarg, output_cache
from hybrid_vlm.tiny import build_tiny_llava, synthetic_image

# ----------------------------------------------------------------------------- pure arithmetic


def test_facts_file_fastv_ratios():
    """facts.md: LLaVA-1.5-7B, 636 tokens, FastV K=2 keeping 288/144/64 -> 0.573 / 0.361 / 0.243."""
    check = flops.facts_check()
    for keep, expected in {288: 0.573, 144: 0.361, 64: 0.243}.items():
        assert check["llm_ratio"][keep] == pytest.approx(expected, abs=5e-4)
    # facts.md: "the CLIP tower is ~4.4% of prefill MACs" (24 bidirectional layers of encoder + LLM)
    assert check["clip_share_of_prefill"] == pytest.approx(0.044, abs=1e-3)


def test_llama_layer_matches_the_facts_formula():
    shape = flops.LLAVA_15_7B.llm
    d, m = shape.hidden, shape.intermediate
    for n in (1, 60, 636):
        assert flops.llama_layer_macs(n, shape) == 4 * n * d * d + 3 * n * d * m + n * (n + 1) * d
        assert flops.llama_layer_macs(n, shape, attention="dense") == 4 * n * d * d + 3 * n * d * m + 2 * n * n * d


def test_gqa_projection_widths():
    shape = flops.LlamaShape(hidden=256, intermediate=512, layers=2, heads=8, kv_heads=2)
    n = 10
    assert flops.llama_linear_macs(n, shape) == n * (2 * 256 * 256 + 2 * 256 * 64 + 3 * 256 * 512)


def test_prefill_plus_decode_is_a_longer_prefill():
    shape = flops.LLAVA_15_7B.llm
    n = 636
    one_step = flops.llm_decode_macs(shape, n, lm_head=False)
    assert flops.llm_prefill_macs(shape, n, lm_head_tokens=0) + one_step == flops.llm_prefill_macs(
        shape, n + 1, lm_head_tokens=0
    )


def test_method_orderings_and_dymu_counts():
    shape = flops.LLAVA_15_7B
    vanilla = flops.prefill_macs(shape, 60)
    fastv = flops.prefill_macs(shape, 60, visual_kept=144)
    dymu = flops.prefill_macs(shape, 60, visual_tokens=195, vit_counts=[577 - 16 * (i + 1) for i in range(24)])
    hybrid = flops.prefill_macs(shape, 60, visual_tokens=195, visual_kept=64, vit_counts=[577 - 16 * (i + 1) for i in range(24)])
    assert hybrid.total < dymu.total < vanilla.total and fastv.total < vanilla.total
    assert dymu.vision < vanilla.vision and fastv.vision == vanilla.vision
    assert flops.vit_macs(shape.vit, [577] * 24) == flops.vit_macs(shape.vit)
    # DyMU merges after attention: layer 0 attends at 577 tokens, its MLP runs at the merged count
    assert flops.vit_layer_macs(577, shape.vit, 300) < flops.vit_layer_macs(577, shape.vit)
    # decode: pruned layers hold shorter caches
    assert flops.llm_decode_macs(shape.llm, 636, 124) < flops.llm_decode_macs(shape.llm, 636)
    assert flops.kv_cache_bytes(shape.llm, 636, 124) < flops.kv_cache_bytes(shape.llm, 636)


def test_dymu_tower_counts_each_layer_at_the_tokens_it_receives():
    """DyMU's tower, written out by hand for a 6 x 6 image of 2 x 2 patches (9 patches + CLS, width 4,
    MLP 8) merging to 7 then 5 tokens: each layer's attention runs at the tokens the layer before
    left (4nd² projections + 2n²d scores and values), its MLP (2·n_out·d·m) at its own merged count."""
    shape = flops.VitShape(hidden=4, intermediate=8, layers=2, heads=1, image_size=6, patch_size=2, channels=3)
    patch_embed = 9 * 3 * 2 * 2 * 4  # 432
    layer_1 = 4 * 10 * 4 * 4 + 2 * 10 * 10 * 4 + 2 * 7 * 4 * 8  # 640 + 800 + 448
    layer_2 = 4 * 7 * 4 * 4 + 2 * 7 * 7 * 4 + 2 * 5 * 4 * 8  # 448 + 392 + 320
    assert flops.vit_macs(shape, [7, 5]) == patch_embed + layer_1 + layer_2 == 3480
    assert flops.vit_macs(shape, [7, 5], layers_run=1, patch_embed=False) == 1888


# ---------------------------------------------------------------- against FlopCounterMode
# FlopCounterMode counts FLOPs (2 per MAC) of mm/bmm/addmm/convolution. On CPU it counts nothing
# for SDPA's fused kernel (aten._scaled_dot_product_flash_attention_for_cpu has no formula), so
# the count runs under the MATH backend, which decomposes attention into bmm's over every
# query-key pair: that is the formula's attention="dense" convention. The LLM part is the total
# minus the vision tower and projector modules (the hybrid forward calls layer internals directly).

ROOT = "HybridLlavaForConditionalGeneration"


def counted_macs(model, **forward_kwargs) -> tuple[dict, object]:
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=None) as counter:
        output = model(**forward_kwargs)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def module(name):
        return sum(counts.get(f"{root}.{name}", {}).values()) // 2

    total = counter.get_total_flops() // 2
    vision, projector = module("model.vision_tower"), module("model.multi_modal_projector")
    return dict(vision=vision, projector=projector, llm=total - vision - projector), output


_MODELS: dict = {}


def tiny_model(**shape):
    """A tiny LLaVA (built once per shape), its inputs, the text-token count and its LlavaShape."""
    key = tuple(sorted(shape.items()))
    if key not in _MODELS:
        model, processor = build_tiny_llava(**shape)
        prompt = "USER: <image>\n" + "describe this picture briefly " * 8 + "ASSISTANT:"
        inputs = processor(images=[synthetic_image(0)], text=[prompt], return_tensors="pt")
        text = int((inputs["input_ids"] != model.config.image_token_id).sum())
        _MODELS[key] = model, inputs, text, flops.shape_from_config(model.config)
    return _MODELS[key]


GQA = dict(text_layers=4, kv_heads=2)  # grouped-query attention, head_dim 32
WIDER = dict(text_layers=6, kv_heads=4, text_hidden=192)  # MHA, head_dim 48


@pytest.mark.parametrize(
    "dims, hybrid",
    [
        (GQA, None),
        (GQA, HybridConfig()),
        (GQA, HybridConfig(fastv_k=64)),
        (GQA, HybridConfig(fastv_k=0.5, fastv_layer=1, scoring="eager")),
        (WIDER, HybridConfig(fastv_k=144, fastv_layer=3)),
    ],
    ids=["stock", "vanilla", "fastv-k64", "fastv-r0.5-l1-eager", "wider-fastv-k144-l3"],
)
def test_prefill_and_decode_match_flop_counter(dims, hybrid):
    model, inputs, text, shape = tiny_model(**dims)
    if hybrid is not None:
        apply_hybrid(model, hybrid)
    else:
        from transformers import LlavaForConditionalGeneration

        model.__class__ = LlavaForConditionalGeneration
    counted, output = counted_macs(model, **inputs, use_cache=True, logits_to_keep=1)

    keep = None
    if hybrid is not None and hybrid.prunes:
        state = output_cache(output).hybrid_state
        keep = int(state.prompt_tokens_kept[0]) - text
        assert keep == (hybrid.fastv_k if isinstance(hybrid.fastv_k, int) else 288)
    expected = flops.prefill_macs(
        shape, text, visual_kept=keep, fastv_layer=getattr(hybrid, "fastv_layer", 2), attention="dense",
        scoring=getattr(hybrid, "scoring", None),
    )
    assert counted["vision"] == expected.vision
    assert counted["projector"] == expected.projector
    assert counted["llm"] == pytest.approx(expected.llm_total, rel=1e-9)

    # one decode step over the (per-layer) caches
    token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    counted_step, _ = counted_macs(
        model, input_ids=token, attention_mask=mask, use_cache=True, **cache_kwarg(output_cache(output)), logits_to_keep=1
    )
    prompt = text + 576
    kept = prompt if keep is None else text + keep
    step = flops.llm_decode_macs(shape.llm, prompt, kept, fastv_layer=getattr(hybrid, "fastv_layer", 2), attention="dense")
    assert counted_step["llm"] == step
    assert counted_step["vision"] == 0


def test_mean_decode_step_matches_flop_counter_over_several_steps():
    """The bench's decode_gmacs_per_token is llm_decode_macs_mean: the mean over steps whose caches
    grow by one token each. Three greedy steps after a FastV prefill, counted."""
    model, inputs, text, shape = tiny_model(**GQA)
    apply_hybrid(model, HybridConfig(fastv_k=64))
    with torch.inference_mode():
        output = model(**inputs, use_cache=True, logits_to_keep=1)
    mask, steps, counted = inputs["attention_mask"], 3, 0
    for _ in range(steps):
        token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        step, output = counted_macs(model, input_ids=token, attention_mask=mask, use_cache=True, **cache_kwarg(output_cache(output)), logits_to_keep=1)
        counted += step["llm"]
    mean = flops.llm_decode_macs_mean(shape.llm, text + 576, text + 64, steps=steps, fastv_layer=2, attention="dense")
    assert counted / steps == pytest.approx(mean, rel=1e-12)
    remove_hybrid(model)


def test_readme_methods_table_is_the_committed_command_output(capsys):
    """The README's methods MACs table is `python -m hybrid_vlm.flops --methods`, verbatim."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    quoted = readme.split("<!-- methods-macs:begin -->", 1)[1].split("<!-- methods-macs:end -->", 1)[0]
    flops.print_methods_table()
    assert quoted.strip() == capsys.readouterr().out.strip()


def test_methods_table_counts_follow_each_budget_rule():
    """Rule A methods let the budget in at every layer; rule B keeps it after layer 2 (of 32)."""
    rows = {(row["method"], row["budget"]): row for row in flops.methods_table()}
    assert rows[("visionzip", 64)]["visual_layer_mean"] == 64 and rows[("visionzip", 64)]["visual_in"] == 64
    assert rows[("fastv", 64)]["visual_layer_mean"] == (2 * 576 + 30 * 64) / 32
    assert rows[("divprune", 64)]["scoring_gmacs"] == 576 * 576 * 4096 / 1e9


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "divprune", "pool"])
@pytest.mark.parametrize("budget", [192, 64])
def test_method_prefill_matches_flop_counter_with_its_scoring(method, budget):
    """The whole prefill under a method before the LLM (its own CLIP loop or the stock tower, its
    scoring matmuls, the projector on what it projects, the LLM at text + budget) equals
    FlopCounterMode's count, and the scoring term is part of it."""
    model, inputs, text, shape = tiny_model(**GQA)
    config = HybridConfig(visual_method=method, visual_budget=budget)
    apply_hybrid(model, config)
    try:
        counted, _ = counted_macs(model, **inputs, use_cache=True, logits_to_keep=1)
    finally:
        remove_hybrid(model)
    expected = flops.method_prefill_macs(shape, config, text, attention="dense")
    assert sum(counted.values()) == expected.total
    if method != "pool":
        assert expected.selection > 0


@pytest.mark.parametrize("config", [
    HybridConfig(fastv_k=64, scoring="eager"), HybridConfig(visual_method="divprune", visual_budget=192, fastv_k=64, scoring="eager"),
], ids=["fastv-eager", "divprune-fastv-eager"])
def test_method_prefill_with_eager_scoring_counts_no_extra_row(config):
    """Eager scoring reads the scoring layer's own attention matrix and runs no extra row: the
    count the plugin's per-row prefill_gmacs take must equal FlopCounterMode's."""
    model, inputs, text, shape = tiny_model(**GQA)
    apply_hybrid(model, config)
    try:
        counted, output = counted_macs(model, **inputs, use_cache=True, logits_to_keep=1)
    finally:
        remove_hybrid(model)
    counts = output_cache(output).hybrid_state.visual_counts()
    expected = flops.method_prefill_macs(shape, config, text, attention="dense", visual_entered=counts.entered[0], visual_kept=counts.kept[0])
    assert sum(counted.values()) == expected.total


@pytest.mark.parametrize("config, tolerance", [
    (HybridConfig(), 0), (HybridConfig(fastv_k=128), 0), (HybridConfig(visual_method="divprune", visual_budget=64), 0),
    (HybridConfig(visual_method="visionzip", visual_budget=64), 0), (HybridConfig(visual_pool=3), 0),
    # the staged methods' scoring is modelled, not traced op by op (key norms, one query row): within 0.2%
    (HybridConfig(visual_method="pdrop", visual_budget=200), 2e-3), (HybridConfig(visual_method="dart", visual_budget=128), 2e-3),
], ids=["vanilla", "fastv-k128", "divprune-b64", "visionzip-b64", "pool3", "pdrop-b200", "dart-b128"])
def test_a_prompt_of_two_images_counts_each_image(config, tolerance):
    """A LLaVA-1.5 prompt of two images: the tower, the projector and a method's scoring run per
    image, and pdrop and dart rank the 1152 tokens as one pool at the prompt's budget; the row's
    MACs, from what it recorded, equal FlopCounterMode's count of the forward that ran."""
    model, processor = build_tiny_llava(text_layers=16)
    prompt = "USER: <image>\n<image>\n" + "compare these pictures briefly " * 4 + "ASSISTANT:"
    inputs = processor(images=[synthetic_image(0), synthetic_image(1)], text=[prompt], return_tensors="pt")
    apply_hybrid(model, config)
    counted, output = counted_macs(model, **inputs, use_cache=True, logits_to_keep=1)
    counts = output_cache(output).hybrid_state.visual_counts()
    text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    expected = flops.method_prefill_macs(flops.shape_from_config(model.config), config, text, attention="dense",
                                         visual_entered=counts.entered[0], visual_kept=counts.kept[0], images=2)
    if config.visual_method not in ("visionzip", "vispruner"):  # their own CLIP loop is traced outside the tower module
        assert counted["vision"] == expected.vision and counted["projector"] == expected.projector
    assert sum(counted.values()) == pytest.approx(expected.total, rel=tolerance, abs=0)


def test_a_text_only_row_counts_no_tower():
    config = HybridConfig(visual_method="divprune", visual_budget=64)
    macs = flops.method_prefill_macs(flops.LLAVA_15_7B, config, 60, visual_entered=0, visual_kept=0)
    assert macs.vision == macs.projector == macs.selection == 0
    assert macs.total == flops.llm_prefill_macs(flops.LLAVA_15_7B.llm, 60)


def test_qwen_eager_scoring_adds_no_row_as_on_llava():
    """`scoring="eager"` materialises the scoring layer's matrix inside the layer's own attention:
    no extra row (flops.llm_prefill_macs); the Qwen count charged the row whatever the setting."""
    from hybrid_vlm import HybridConfig
    from hybrid_vlm.qwen_flops import QWEN25_VL_7B, qwen_method_prefill_macs

    grids, text = [(1, 80, 64)], 60
    for scoring in ("row", "eager"):
        macs = qwen_method_prefill_macs(QWEN25_VL_7B, HybridConfig(fastv_k=64, scoring=scoring), grids, text)
        assert macs.llm == flops.llm_prefill_macs(QWEN25_VL_7B.llm, text + 1280, text + 64, fastv_layer=2, scoring=scoring, lm_head_tokens=0)
    row, eager = (qwen_method_prefill_macs(QWEN25_VL_7B, HybridConfig(fastv_k=64, scoring=s), grids, text).llm for s in ("row", "eager"))
    assert eager < row
