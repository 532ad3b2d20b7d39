"""The methods before the LLM (VisionZip, VisPruner, DivPrune, adaptive pooling) in the engine,
against independent references: the kept set from NumPy re-implementations (`method_reference`)
fed by stock eager CLIP, logits from the masked-attention reference, a batch against each sample
alone, cached generation against recomputation, no host syncs, and the per-row token counts."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid, flops
from hybrid_vlm.hf_compat.clip import vision_reads
from hybrid_vlm.methods import get_method, list_methods
from hybrid_vlm.methods.visionzip import visionzip_split
from hybrid_vlm.methods.vispruner import vispruner_split
from hybrid_vlm.syncs import check_no_host_syncs

from conftest import QUESTIONS, assert_batched_generation_equals_each_alone, hybrid_copy, image_inputs
from method_reference import divprune_reference, visionzip_reference, vispruner_reference
from reference import greedy_without_cache, masked_reference, numpy_adaptive_pool, stock_vision_reads

REFERENCE_RTOL = 1e-4
NEW_TOKENS = 5
METHODS = ("visionzip", "vispruner", "divprune", "pool")
BUDGETS = (192, 128, 64)


def reference_selection(model, reads: dict, image: int, method: str, budget: int) -> tuple[np.ndarray, torch.Tensor]:
    """(kept slots, projected tokens [K, hidden]) of one image, from the NumPy references."""
    projector = model.model.multi_modal_projector
    cls, keys, hidden, projected = (reads[k][image] for k in ("cls_attention", "keys", "hidden", "projected"))
    if method == "visionzip":
        kept, tokens = visionzip_reference(cls, keys, hidden, *visionzip_split(budget))
        return kept, projector(torch.from_numpy(tokens).to(model.dtype))
    if method == "vispruner":
        kept = vispruner_reference(cls, hidden, budget, vispruner_split(budget))
        return kept, projector(torch.from_numpy(hidden[kept]).to(model.dtype))
    if method == "divprune":
        kept = divprune_reference(projected, budget)
        return kept, torch.from_numpy(projected[kept]).to(model.dtype)
    rows, cols = {192: (16, 12), 128: (16, 8), 64: (8, 8)}[budget]  # by hand: the squarest factor pairs
    kept, tokens = numpy_adaptive_pool(projected, rows, cols)
    return kept, torch.from_numpy(tokens).to(model.dtype)


def engine_kept_slots(out, inputs, image_token_id: int) -> list[np.ndarray]:
    """Per sample, the patch indices (0..575) of the visual tokens that entered the LLM."""
    kept = []
    for b in range(inputs["input_ids"].shape[0]):
        visual = torch.nonzero(inputs["input_ids"][b] == image_token_id).flatten()
        slot_of = {int(p): i for i, p in enumerate(visual)}
        kept.append(np.asarray(sorted(slot_of[int(p)] for p in out.kept_positions[b] if int(p) in slot_of)))
    return kept


@torch.no_grad()
def engine_vision_reads(model, pixel_values) -> dict[str, np.ndarray]:
    """The engine's reads (its CLIP loop and [CLS] row, `hf_compat.clip.vision_reads`), as float64."""
    vision = vision_reads(model, pixel_values, attention=True)
    projected = torch.stack(list(model.model.get_image_features(pixel_values, return_dict=True).pooler_output))
    return {k: v.double().numpy() for k, v in
            dict(cls_attention=vision.cls_attention, keys=vision.keys, hidden=vision.features, projected=projected).items()}


@pytest.fixture(scope="module")
def reads(tiny):
    """A float64 copy of the tiny model, its batch, and the engine's reads. Float64, because
    VisPruner's residual order is decided by every adjacent gap of its [CLS] attention and
    de-duplication scores, and on 576 patches some gaps are ~1e-7, inside float32 noise: in float32
    the engine and a NumPy reference part ways at the first such near-tie. In float64 every gap is
    far above the arithmetic's noise (the clear margins the comparison needs). The selections are
    compared on the engine's reads; the reads themselves are compared with stock eager CLIP's below."""
    model, processor = tiny
    model64 = copy.deepcopy(model).double()
    inputs = image_inputs(processor, QUESTIONS)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return model64, inputs, engine_vision_reads(model64, inputs["pixel_values"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vision_reads_equal_stock_eager_clip(tiny, dtype):
    """The [CLS] row from q.K^T, the hooked keys and the read layer's output, against transformers'
    eager attention weights and hidden states."""
    model, processor = tiny
    model = copy.deepcopy(model).to(dtype)
    pixels = image_inputs(processor, QUESTIONS)["pixel_values"].to(dtype)
    engine, stock = engine_vision_reads(model, pixels), stock_vision_reads(model, pixels)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-5  # stock eager CLIP takes its softmax in float32 even for a float64 model
    for name in ("cls_attention", "keys", "hidden", "projected"):
        np.testing.assert_allclose(engine[name], stock[name], rtol=tolerance, atol=tolerance * np.abs(stock[name]).max(), err_msg=name)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("method", METHODS)
def test_kept_set_and_logits_match_the_references(reads, method, budget):
    """The engine keeps the re-implementation's tokens and, with them, gives the masked reference's
    logits: a left-padded batch of three different images, logical positions."""
    model, inputs, vision = reads
    with torch.no_grad():
        out = hybrid_copy(model, visual_method=method, visual_budget=budget)(**inputs)
        expected = [reference_selection(model, vision, b, method, budget) for b in range(3)]
    for b, kept in enumerate(engine_kept_slots(out, inputs, model.config.image_token_id)):
        assert kept.tolist() == expected[b][0].tolist(), f"sample {b}"
    features = torch.zeros(3, 576, model.config.text_config.hidden_size, dtype=torch.float64)
    slot_valid = torch.zeros(3, 576, dtype=torch.bool)
    for b, (kept, tokens) in enumerate(expected):
        features[b, kept], slot_valid[b, kept] = tokens, True
    reference_logits, reference_kept = masked_reference(model, inputs, None, 2, image_features=(features, slot_valid))
    assert out.kept_positions.shape[1] == inputs["input_ids"].shape[1] - 576 + budget
    gathered = reference_logits.gather(1, out.kept_positions[..., None].expand(-1, -1, reference_logits.shape[-1]))
    real = inputs["attention_mask"].bool().gather(1, out.kept_positions)
    assert (out.logits - gathered)[real].abs().max() <= REFERENCE_RTOL * gathered.abs().max()
    kept_mask = torch.zeros_like(reference_kept).scatter(1, out.kept_positions, True) & inputs["attention_mask"].bool()
    assert torch.equal(kept_mask, reference_kept)


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "divprune"])
def test_methods_choose_differently(reads, method):
    """Else the kept-set test could not tell the methods apart (or from FastV's first tokens)."""
    model, _, vision = reads
    chosen = {name: set(reference_selection(model, vision, 0, name, 64)[0].tolist()) for name in METHODS}
    for other in METHODS:
        if other != method:  # VisionZip and VisPruner share most of their [CLS]-attention tokens, not all
            assert len(chosen[method] ^ chosen[other]) >= 10, other
    assert chosen[method] != set(range(64))


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "divprune"])
def test_renumbered_positions_match_the_reference_at_contiguous_positions(tiny, reads, method):
    """HYBRID_POSITIONS=renumbered gives the official contiguous positions: the same logits as
    stock transformers fed only the kept tokens (the sequence physically shortened)."""
    model, _, vision = reads
    sample = image_inputs(tiny[1], QUESTIONS[:1])
    sample["pixel_values"] = sample["pixel_values"].double()
    with torch.no_grad():
        out = hybrid_copy(model, visual_method=method, visual_budget=64, position_mode="renumbered")(**sample)
        kept, tokens = reference_selection(model, vision, 0, method, 64)
        ids = sample["input_ids"][0]
        visual = torch.nonzero(ids == model.config.image_token_id).flatten()
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[visual] = False
        keep[visual[torch.from_numpy(kept)]] = True
        embeds = model.model.language_model.embed_tokens(ids[keep][None]).clone()
        short_visual = torch.nonzero(ids[keep] == model.config.image_token_id).flatten()
        embeds[0, short_visual] = tokens
        stock = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        expected = model.lm_head(stock)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings", [dict(visual_method="visionzip", visual_budget=64), dict(visual_method="vispruner", visual_budget=128),
                                      dict(visual_method="divprune", visual_budget=64), dict(visual_method="pool", visual_budget=192, fastv_k=32)])
def test_batched_generation_equals_each_sample_alone(tiny, settings):
    model, processor = tiny
    assert_batched_generation_equals_each_alone(hybrid_copy(model, **settings), processor, NEW_TOKENS)


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "divprune"])
def test_cached_generation_equals_recomputation(tiny, method):
    model, processor = tiny
    hybrid = hybrid_copy(model, visual_method=method, visual_budget=64)
    inputs = image_inputs(processor, QUESTIONS)
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        assert torch.equal(cached, greedy_without_cache(hybrid, inputs, NEW_TOKENS))


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "divprune", "pool"])
def test_no_host_syncs(tiny, method):
    model, processor = tiny
    assert check_no_host_syncs(hybrid_copy(model, visual_method=method, visual_budget=64, fastv_k=16), image_inputs(processor, QUESTIONS[:2])) == "pass"


@pytest.mark.parametrize("method", METHODS)
def test_per_row_token_counts_are_text_plus_budget(tiny, method):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)).sum(dim=1)
    with torch.no_grad():
        out = hybrid_copy(model, visual_method=method, visual_budget=128, fastv_k=40)(**inputs, use_cache=True)
    state = out.past_key_values.hybrid_state
    assert state.prompt_tokens.tolist() == (text + 128).tolist()
    assert state.visual_tokens.tolist() == [128] * 3
    assert state.prompt_tokens_kept.tolist() == (text + 40).tolist()


def test_every_method_declares_where_it_acts_and_what_it_reads():
    for name in list_methods():
        method = get_method(name)
        assert method.reads and method.budget_rule in ("A", "B", "C", "thresholds") and method.signal and method.deviations
        assert method.before_llm == (method.budget_rule == "A"), name


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(visual_method="visionzip", visual_budget=577), "not reachable by visionzip: use an integer 1..576"),
        (dict(visual_method="pool", visual_budget=193), "not reachable by pool"),
        (dict(visual_method="divprune", visual_budget=0), "VISUAL_BUDGET=0 is not valid"),
        (dict(visual_method="fastv", visual_budget=64), "visual_method='fastv' is not valid"),
    ],
)
def test_unreachable_budgets_and_bad_methods_are_refused(tiny, settings, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        apply_hybrid(copy.deepcopy(model), HybridConfig(**settings))


@pytest.mark.parametrize("method", ["visionzip", "vispruner"])  # divprune reads the projected features, whatever the layout
# a listed vision_feature_layer is refused for every setting (test_llava_next.test_a_listed_vision_feature_layer_is_refused_by_name)
@pytest.mark.parametrize("layout, message", [(dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy='default'")])
def test_a_tower_layout_a_method_cannot_read_is_refused_at_apply_naming_the_method(tiny, method, layout, message):
    """It was accepted, then the first forward raised a message about DyMU merging, which was not set."""
    model = copy.deepcopy(tiny[0])
    for name, value in layout.items():
        setattr(model.config, name, value)
    with pytest.raises(NotImplementedError, match=rf"VISUAL_METHOD={method} .*{re.escape(message)}"):
        apply_hybrid(model, HybridConfig(visual_method=method, visual_budget=32))
    assert type(model).__name__ == "LlavaForConditionalGeneration"  # refused before anything changed


def test_state_records_the_per_layer_kv_lengths_the_cache_holds(tiny):
    """A method before the LLM and FastV after it: the state's groups (layer 0 on: the method's
    tokens; FASTV_LAYER on: FastV's) and per-layer lengths are those of the cache's own tensors."""
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    with torch.no_grad():
        out = hybrid_copy(model, visual_method="visionzip", visual_budget=64, fastv_k=16, fastv_layer=2)(**inputs, use_cache=True)
    cache = out.past_key_values
    held = [layer.keys.shape[2] for layer in cache.layers]
    assert cache.hybrid_state.kv_lengths() == held
    assert [group.first_layer for group in cache.hybrid_state.groups] == [0, 2]
    length = inputs["input_ids"].shape[1]
    assert held == [length - 576 + 64] * 2 + [length - 576 + 16] * (len(held) - 2)


def unplanned_methods(monkeypatch):
    """Two methods registered as a contributor would first register them: one pruning inside the LLM
    at FASTV_LAYER, with no stage plan or MACs model yet, and one before the LLM reading CLIP features."""
    from hybrid_vlm import methods
    from hybrid_vlm.methods import Method, Read, Stage

    lastk = Method(name="lastk", stage=Stage.LLM, reads=(Read.LLM_EMBEDDINGS,), budget_rule="B", signal="the K last slots",
                   positions="original ids", deviations="none")
    features = Method(name="featurestride", stage=Stage.VIT, reads=(Read.VIT_FEATURES,), budget_rule="A", signal="every k-th patch",
                      positions="own patch", deviations="none", select=lambda reads, budget: None)
    for method in (lastk, features):
        monkeypatch.setitem(methods._REGISTRY, method.name, method)


def test_a_registered_method_without_a_plan_is_refused_by_name_not_run_as_another(tiny_qwen, monkeypatch):
    """A method inside the LLM that the engine has no stage plan for fails naming itself and where its
    plan goes, on the engine and in the MACs model (it ran as PyramidDrop's schedule on Qwen2.5-VL and
    was counted as DART); its tag names the layer it prunes at, as FastV's and DART's do; and a method
    reading what Qwen2.5-VL's adapter cannot give is refused there naming the read."""
    from hybrid_vlm.qwen import check_qwen_settings

    unplanned_methods(monkeypatch)
    config = HybridConfig(visual_method="lastk", visual_budget=32, fastv_layer=3)
    assert config.describe() == "lastk-b32-l3"
    model, processor = tiny_qwen
    with pytest.raises(NotImplementedError, match=r"VISUAL_METHOD=lastk .*no stage plan.*STAGE_PLANS"):
        apply_hybrid(copy.deepcopy(model), config)  # before any forward: a plugin run stops up front, not row by row
    with pytest.raises(NotImplementedError, match="VISUAL_METHOD=lastk: no MACs model"):
        flops.method_prefill_macs(flops.LLAVA_15_7B, config, 60)
    with pytest.raises(ValueError, match="featurestride is not available for Qwen2.5-VL: it reads CLIP features of the read layer"):
        check_qwen_settings(HybridConfig(visual_method="featurestride", visual_budget=16))


def test_each_budget_split_and_stage_schedule_is_the_published_rule_worked_by_hand():
    """The splits and schedules the method tests take from the code, pinned here by hand:
    - VisPruner: int(b x 0.75) important tokens at 64 or fewer (its README's operating point), else
      int(b x 0.5) (its code's default);
    - VisionZip: contextual = the integer nearest b x 10 / 64 (the official 54 : 10), so 56 -> 8.75 -> 9;
    - stage layers scaled to the LLM's depth rounded to nearest: PyramidDrop's (2, 8, 16) of 32 on
      Qwen2.5-VL's 28 layers is (1.75, 7, 14) -> (2, 7, 14); SparseVLM's stages from (3, 7, 16) are
      (2.625, 6.125, 14) -> (3, 6, 14) on 28 and (1.5, 3.5, 8) -> (2, 4, 8) on 16 (halves to even, as
      Python rounds);
    - SparseVLM's 192 schedule on 200 visual tokens: its first two stages would keep 300, capped at
      V - 1 = 199 with the one cluster that int(1/10) + 1 makes of the single token left."""
    from hybrid_vlm.methods import pdrop, sparsevlm
    from hybrid_vlm.methods.visionzip import visionzip_split
    from hybrid_vlm.methods.vispruner import vispruner_split

    assert [vispruner_split(b) for b in (64, 65, 128, 192)] == [48, 32, 64, 96]
    assert [visionzip_split(b) for b in (64, 128, 192, 56, 165)] == [(54, 10), (108, 20), (162, 30), (47, 9), (139, 26)]
    assert pdrop.stage_layers(32) == (2, 8, 16) and pdrop.stage_layers(28) == (2, 7, 14)
    assert sparsevlm.stage_layers(28) == (3, 6, 14) and sparsevlm.stage_layers(16) == (2, 4, 8)
    assert sparsevlm.stage_counts(192, 200) == ((199, 1), (199, 1), (110, 3))
