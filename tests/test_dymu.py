"""DyMU vision-side merging: checked against stock LLaVA and against independent NumPy/Python references."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

from hybrid_vlm.calibrate import add_signature, calibrate_thresholds, count_summary, load_thresholds, measure_token_counts
from hybrid_vlm.calibrate import main as calibrate_main
from hybrid_vlm.dymu import (
    SPLITS,
    MergeState,
    attention_bias,
    bipartite_scores,
    merge_tokens,
    official_order,
    plan_merging,
    r_schedule,
    representative_slots,
    threshold_merge_mask,
)
from hybrid_vlm.hf_compat import stock_image_features
from hybrid_vlm.hf_compat.clip import (
    clip_layer_attention,
    dymu_image_features,
    merging_vision_forward,
    vision_fingerprint,
    vision_parts,
)
from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from hybrid_vlm.provenance import portable_path
from hybrid_vlm.tiny import build_tiny_llava, synthetic_image

from reference import official_dymu_partitions, official_get_rs, official_layer0_cutoff

INF = float("inf")
NUM_IMAGES = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are small: on a shared 2-core machine, two OpenMP threads fighting
    another process are ~8x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_llava()
    return model, processor


@pytest.fixture(scope="module")
def pixels(tiny):
    _, processor = tiny
    images = [synthetic_image(seed) for seed in range(NUM_IMAGES)]
    return processor.image_processor(images, return_tensors="pt").pixel_values


def layers_of(model) -> int:
    return len(vision_parts(model).layers)


# ------------------------------------------------------------------------------------------------
# Equivalence with stock LLaVA
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("compact", [False, True])
def test_infinite_thresholds_equal_stock_image_features(tiny, pixels, compact, split):
    model, _ = tiny
    reference = stock_image_features(model, pixels)  # get_image_features, layer -2, CLS dropped
    out = dymu_image_features(model, pixels, torch.full((layers_of(model),), INF), compact=compact, split=split)
    assert layers_of(model) == model.config.vision_config.num_hidden_layers - 1  # last layer never runs
    assert out.features.shape == reference.shape == (NUM_IMAGES, 576, model.config.text_config.hidden_size)
    assert (out.features - reference).abs().max().item() <= 1e-6 * max(1.0, reference.abs().max().item())
    assert out.valid.all()
    assert (out.sizes == 1).all()
    assert (out.coverage == torch.arange(576)).all()
    assert (out.num_tokens == 576).all()


@torch.no_grad()
@pytest.mark.parametrize("split", SPLITS)
def test_static_path_has_no_host_reads(tiny, split):
    """On the meta device any .item(), bool(tensor), nonzero or boolean-mask indexing raises."""
    model, _ = tiny
    meta_model = build_tiny_llava()[0].to("meta")
    pixels = torch.empty(2, 3, 336, 336, device="meta")
    thresholds = torch.full((layers_of(model),), 0.7, device="meta")
    out = dymu_image_features(meta_model, pixels, thresholds, split=split)
    assert out.features.shape == (2, 576, model.config.text_config.hidden_size)
    with pytest.raises(RuntimeError):  # the optional compacting path reads the batch max on the host
        dymu_image_features(meta_model, pixels, thresholds, compact=True, split=split)


def test_unknown_split_is_rejected(tiny, pixels):
    with pytest.raises(ValueError, match="official, slot"):
        dymu_image_features(tiny[0], pixels[:1], torch.full((layers_of(tiny[0]),), INF), split="raster")


# ------------------------------------------------------------------------------------------------
# Pure merging maths against NumPy references
# ------------------------------------------------------------------------------------------------


def numpy_bipartite(metric: np.ndarray, valid: np.ndarray, order: np.ndarray | None = None):
    """Plain loop: valid slots, listed by `order` (default: slot order), alternate A/B; the first
    (CLS) is protected; the best B is the first maximum in that listing."""
    batch, slots, _ = metric.shape
    node_max = np.full((batch, slots), -np.inf)
    node_idx = np.full((batch, slots), -1)
    for b in range(batch):
        live = [s for s in range(slots) if valid[b, s]]
        if order is not None:
            live.sort(key=lambda s: order[b, s])
        set_a, set_b = live[2::2], live[1::2]  # live[0] is CLS
        for a in set_a:
            best, best_j = -np.inf, -1
            for j in set_b:
                cos = metric[b, a] @ metric[b, j] / (np.linalg.norm(metric[b, a]) * np.linalg.norm(metric[b, j]))
                if cos > best:
                    best, best_j = cos, j
            node_max[b, a], node_idx[b, a] = best, best_j
    return node_max, node_idx


def test_bipartite_scores_match_numpy_loop():
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 15, 6, generator=generator)
    valid = torch.rand(3, 15, generator=generator) > 0.3
    valid[:, 0] = True
    node_max, node_idx = bipartite_scores(metric, valid)
    ref_max, ref_idx = numpy_bipartite(metric.double().numpy(), valid.numpy())
    finite = np.isfinite(ref_max)
    assert (torch.isfinite(node_max).numpy() == finite).all()
    np.testing.assert_allclose(node_max.numpy()[finite], ref_max[finite], atol=1e-6)
    assert (node_idx.numpy()[finite] == ref_idx[finite]).all()


def test_bipartite_scores_follow_the_sequence_order():
    """The official split: A/B alternate by each valid slot's sequence position, not by slot index;
    equal best scores go to the B token first in sequence order."""
    generator = torch.Generator().manual_seed(4)
    batch, slots = 3, 15
    metric = torch.randn(batch, slots, 6, generator=generator)
    metric[:, 9] = metric[:, 4]  # two B candidates with identical keys: a tie for some A tokens
    valid = torch.rand(batch, slots, generator=generator) > 0.2
    valid[:, [0, 4, 9]] = True
    order = torch.zeros(batch, slots, dtype=torch.long)
    for b in range(batch):  # CLS first, the other valid slots in a random sequence order
        live = [s for s in range(1, slots) if valid[b, s]]
        shuffled = [live[i] for i in torch.randperm(len(live), generator=generator).tolist()]
        order[b, [0] + shuffled] = torch.arange(len(shuffled) + 1)
    node_max, node_idx = bipartite_scores(metric, valid, order)
    ref_max, ref_idx = numpy_bipartite(metric.double().numpy(), valid.numpy(), order.numpy())
    finite = np.isfinite(ref_max)
    assert (torch.isfinite(node_max).numpy() == finite).all()
    np.testing.assert_allclose(node_max.numpy()[finite], ref_max[finite], atol=1e-6)
    assert (node_idx.numpy()[finite] == ref_idx[finite]).all()
    slot_max, _ = bipartite_scores(metric, valid)
    assert not torch.equal(torch.isfinite(slot_max), torch.isfinite(node_max))  # the order really matters here


def test_official_order_after_a_merge():
    """[CLS and unmerged A tokens, then B tokens], each in its previous order, as a Python list;
    an image that merges nothing keeps its order."""
    generator = torch.Generator().manual_seed(5)
    batch, slots = 4, 17
    valid = torch.rand(batch, slots, generator=generator) > 0.25
    valid[:, 0] = True
    order = torch.zeros(batch, slots, dtype=torch.long)
    sequences = []
    for b in range(batch):
        live = [s for s in range(1, slots) if valid[b, s]]
        sequence = [0] + [live[i] for i in torch.randperm(len(live), generator=generator).tolist()]
        order[b, sequence] = torch.arange(len(sequence))
        sequences.append(sequence)
    merge = torch.zeros(batch, slots, dtype=torch.bool)
    for b, sequence in enumerate(sequences[:3]):  # the last image merges nothing
        a_tokens = sequence[2::2]
        merge[b, a_tokens[:: 2 if b else 1]] = True
    new_order = official_order(order, valid, merge)
    for b, sequence in enumerate(sequences):
        if merge[b].any():
            a_side, b_side = sequence[0::2], sequence[1::2]
            expected = [s for s in a_side if not merge[b, s]] + b_side
        else:
            expected = sequence
        assert [s for s in sorted(expected, key=lambda s: int(new_order[b, s]))] == expected
        assert sorted(int(new_order[b, s]) for s in expected) == list(range(len(expected)))


def test_merging_is_size_weighted_average_of_covered_tokens():
    """Several merge steps on a small random token set: every surviving token equals the plain mean
    of the original tokens it covers (= size-weighted average of what merged into it), with
    coverage sets tracked independently here in Python."""
    generator = torch.Generator().manual_seed(1)
    batch, slots, channels = 2, 13, 5
    x0 = torch.randn(batch, slots, channels, generator=generator, dtype=torch.float64)
    x = x0.clone()
    state = MergeState.initial(batch, slots, "cpu")
    groups = [{s: [s] for s in range(slots)} for _ in range(batch)]
    for _ in range(3):
        metric = torch.randn(batch, slots, 4, generator=generator)
        node_max, node_idx = bipartite_scores(metric, state.valid, state.order)
        merge = threshold_merge_mask(node_max, 0.0)
        before = state.valid.sum(dim=1)
        # independent check of one weighted-average step for non-unit sizes
        expected = x.clone()
        for b in range(batch):
            into: dict[int, list[int]] = {}
            for a in range(slots):
                if merge[b, a]:
                    into.setdefault(int(node_idx[b, a]), []).append(a)
            for dst, sources in into.items():
                members = [dst] + sources
                weights = np.array([float(state.size[b, m]) for m in members])
                rows = np.stack([x[b, m].numpy() for m in members])
                expected[b, dst] = torch.from_numpy((weights[:, None] * rows).sum(0) / weights.sum())
                for a in sources:
                    groups[b][dst] += groups[b].pop(a)
                    pass  # merged-away slots keep stale values (invalid, never read)
        x, state = merge_tokens(x, state, merge, node_idx)
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
        assert ((before - state.valid.sum(dim=1)) == merge.sum(dim=1)).all()
    assert state.valid.sum() < batch * slots  # something merged
    for b in range(batch):
        assert sorted(groups[b]) == [s for s in range(slots) if state.valid[b, s]]
        for slot, members in groups[b].items():
            torch.testing.assert_close(x[b, slot], x0[b, members].mean(dim=0), rtol=1e-12, atol=1e-12)
            assert state.size[b, slot] == len(members)
            assert all(int(state.owner[b, m]) == slot for m in members)
        assert state.size[b].sum() == slots


def brute_force_representative(members: list[int], width: int) -> int:
    coords = [((m - 1) // width, (m - 1) % width) for m in members]
    cy = sum(r for r, _ in coords) / len(coords)
    cx = sum(c for _, c in coords) / len(coords)
    best = min(members, key=lambda m: (round(((m - 1) // width - cy) ** 2 + ((m - 1) % width - cx) ** 2, 9), m))
    return best


def test_representative_is_covered_patch_nearest_to_centroid():
    generator = torch.Generator().manual_seed(2)
    width, patches = 6, 36
    tokens = patches + 1
    owner = torch.randint(1, tokens, (4, tokens), generator=generator)
    owner[:, 0] = 0  # CLS alone in slot 0
    owner[0, 1:] = 5  # one token covering everything
    owner[1, 1:] = torch.arange(1, tokens)  # nothing merged: every patch represents itself
    rep = representative_slots(owner, tokens, width)
    for b in range(owner.shape[0]):
        for slot in set(owner[b].tolist()) - {0}:
            members = [i for i in range(1, tokens) if owner[b, i] == slot]
            assert int(rep[b, slot]) == brute_force_representative(members, width)
    assert (rep[1, 1:] == torch.arange(1, tokens)).all()
    # ties go to the lowest index: two patches, centroid halfway
    owner = torch.arange(tokens)[None].clone()
    owner[0, 8] = 7
    assert int(representative_slots(owner, tokens, width)[0, 7]) == 7


@torch.no_grad()
def test_model_outputs_are_consistent_placements(tiny, pixels):
    model, _ = tiny
    out = dymu_image_features(model, pixels, torch.full((layers_of(model),), 0.75))
    assert (out.sizes.sum(dim=1) == 576).all()
    assert (out.num_tokens < 576).all()
    assert ((out.sizes > 0) == out.valid).all()
    assert (out.features[~out.valid] == 0).all()
    for b in range(NUM_IMAGES):
        cover = out.coverage[b]
        counts = torch.bincount(cover, minlength=576)
        assert (counts == out.sizes[b]).all()  # coverage and sizes agree
        positions = out.valid[b].nonzero().flatten()
        assert (cover[positions] == positions).all()  # every token covers its own position
        for position in positions[:40].tolist():  # and sits at its representative patch
            members = (cover == position).nonzero().flatten().add(1).tolist()
            assert brute_force_representative(members, 24) - 1 == position


# ------------------------------------------------------------------------------------------------
# Merge limits, monotonicity, batching
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_at_most_half_merged_per_layer_and_cls_never_merged(tiny, pixels):
    model, _ = tiny
    seen = []

    def merge_everything(index, node_max, state):
        merge = threshold_merge_mask(node_max, -2.0)  # below any cosine: merge every A token
        seen.append((state.valid.sum(dim=1).clone(), merge.sum(dim=1).clone(), merge[:, 0].clone()))
        return merge

    _, state, _ = merging_vision_forward(model, pixels, merge_everything)
    for tokens, merged, cls_merged in seen:
        assert (merged <= (tokens - 1) // 2).all()
        assert (merged == (tokens - 1) // 2).all()  # with every pair above threshold, exactly half go
        assert not cls_merged.any()
    assert state.valid[:, 0].all() and (state.size[:, 0] == 1).all() and (state.owner[:, 0] == 0).all()
    assert (state.counts() == 1 + 144).all()  # 577 -> 289 -> 145 in two merging layers


@torch.no_grad()
def test_higher_thresholds_never_give_fewer_tokens(tiny, pixels):
    model, _ = tiny
    layers = layers_of(model)
    counts = []
    for value in np.linspace(0.5, 0.95, 10):
        counts.append(dymu_image_features(model, pixels, torch.full((layers,), float(value))).num_tokens)
    base = torch.tensor([0.7, 0.65])
    counts = torch.stack(counts)  # [thresholds, images]
    assert (counts[1:] >= counts[:-1]).all(), counts
    assert counts[-1].float().mean() > counts[0].float().mean()
    per_layer = [dymu_image_features(model, pixels, base + torch.tensor([d, 0.0])).num_tokens for d in (-0.1, 0.0, 0.1)]
    per_layer = torch.stack(per_layer)
    assert (per_layer[1:] >= per_layer[:-1]).all(), per_layer


@torch.no_grad()
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("compact", [False, True])
def test_batched_equals_per_image(tiny, pixels, compact, split):
    model, _ = tiny
    thresholds = torch.tensor([0.72, 0.7])
    batched = dymu_image_features(model, pixels, thresholds, compact=compact, split=split)
    assert len(set(batched.num_tokens.tolist())) > 1  # the images really have different counts
    for b in range(NUM_IMAGES):
        single = dymu_image_features(model, pixels[b : b + 1], thresholds, compact=compact, split=split)
        assert torch.equal(single.valid[0], batched.valid[b])
        assert torch.equal(single.sizes[0], batched.sizes[b])
        assert torch.equal(single.coverage[0], batched.coverage[b])
        scale = batched.features[b].abs().max()
        assert (single.features[0] - batched.features[b]).abs().max() <= 1e-5 * scale
    static = dymu_image_features(model, pixels, thresholds, compact=not compact, split=split)
    assert torch.equal(static.valid, batched.valid)  # compacting keeps the bipartite split


# ------------------------------------------------------------------------------------------------
# The official split order, against DyMU's merging loop re-implemented in tests/reference.py
# ------------------------------------------------------------------------------------------------

DEEP_IMAGES = 8


@pytest.fixture(scope="module")
def deep_tower():
    """A tiny CLIP with ViT-L's depth (24 layers, 23 merging), thresholds calibrated for DyMU's
    192out with the official split, the model in float64 (so no score lands within rounding noise
    of a threshold: the tests compare merge decisions, not float32 rounding), and 8 test images."""
    model, processor = build_tiny_llava(vision_layers=24)
    calibration = processor.image_processor([synthetic_image(300 + s) for s in range(8)], return_tensors="pt").pixel_values
    thresholds = torch.tensor(calibrate_thresholds(model, [calibration], "192out", progress=False)["thresholds"])
    images = processor.image_processor([synthetic_image(s) for s in range(DEEP_IMAGES)], return_tensors="pt").pixel_values
    return model.double(), images.double(), thresholds.double()


def engine_partitions(model, pixels, thresholds, split) -> list[list[set[frozenset[int]]]]:
    """[image][layer]: the engine's partition of the original tokens after every merging layer."""
    owners = []

    def select(index, node_max, state):
        if index > 0:
            owners.append(state.owner.clone())  # after layer index - 1
        return threshold_merge_mask(node_max, thresholds[index])

    _, state, _ = merging_vision_forward(model, pixels, select, split=split)
    owners.append(state.owner)
    partitions = []
    for b in range(pixels.shape[0]):
        per_layer = []
        for owner in owners:
            groups: dict[int, set[int]] = {}
            for token, slot in enumerate(owner[b].tolist()):
                groups.setdefault(slot, set()).add(token)
            per_layer.append({frozenset(group) for group in groups.values()})
        partitions.append(per_layer)
    return partitions


@torch.no_grad()
def test_official_split_gives_dymu_partitions_at_every_layer(deep_tower):
    model, images, thresholds = deep_tower
    reference = official_dymu_partitions(model, images, thresholds)  # each image alone, tokens reordered physically
    engine = engine_partitions(model, images, thresholds, "official")  # batched, static slots
    assert len(engine[0]) == len(reference[0]) == 23
    for b in range(DEEP_IMAGES):
        for layer in range(23):
            assert engine[b][layer] == reference[b][layer], f"image {b}, layer {layer}"
    counts = [len(reference[b][-1]) - 1 for b in range(DEEP_IMAGES)]
    assert len(set(counts)) > 1 and all(50 < c < 500 for c in counts), counts  # real, image-dependent merging


@torch.no_grad()
def test_slot_split_really_differs_from_the_official(deep_tower):
    """Guards the test above: on this tower the two splits must disagree, or it proves nothing."""
    model, images, thresholds = deep_tower
    official = engine_partitions(model, images, thresholds, "official")
    slot = engine_partitions(model, images, thresholds, "slot")
    for b in range(DEEP_IMAGES):
        assert official[b][0] == slot[b][0]  # layer 0 is the same split
        assert official[b][-1] != slot[b][-1]
    assert sum(len(official[b][-1]) != len(slot[b][-1]) for b in range(DEEP_IMAGES)) >= DEEP_IMAGES // 2


@torch.no_grad()
def test_official_split_batched_equals_alone_on_the_deep_tower(deep_tower):
    model, images, thresholds = deep_tower
    batched = dymu_image_features(model, images, thresholds, split="official")
    for b in range(DEEP_IMAGES):
        alone = dymu_image_features(model, images[b : b + 1], thresholds, split="official")
        assert torch.equal(alone.valid[0], batched.valid[b])
        assert torch.equal(alone.sizes[0], batched.sizes[b])
        assert torch.equal(alone.coverage[0], batched.coverage[b])
        assert (alone.features[0] - batched.features[b]).abs().max() <= 1e-9 * batched.features[b].abs().max()


# ------------------------------------------------------------------------------------------------
# Proportional attention
# ------------------------------------------------------------------------------------------------


def test_proportional_attention_adds_log_size(tiny):
    model, _ = tiny
    layer = vision_parts(model).layers[0]
    generator = torch.Generator().manual_seed(3)
    batch, tokens, channels = 2, 9, model.config.vision_config.hidden_size
    hidden = torch.randn(batch, tokens, channels, generator=generator)
    size = torch.tensor([[1, 3, 0, 1, 2, 5, 1, 0, 4], [1, 1, 1, 7, 0, 2, 1, 1, 1]], dtype=torch.float32)
    state = MergeState(size=size, valid=size > 0, owner=torch.zeros(batch, tokens, dtype=torch.long), order=torch.zeros(batch, tokens, dtype=torch.long))
    with torch.no_grad():
        out, metric = clip_layer_attention(layer, hidden, attention_bias(state, hidden.dtype))
        plain, _ = clip_layer_attention(layer, hidden, None)

        # direct eager computation, one head at a time
        attention = layer.self_attn
        heads, head_dim = attention.num_heads, attention.head_dim
        normed = layer.layer_norm1(hidden)
        q = attention.q_proj(normed).double()
        k = attention.k_proj(normed).double()
        v = attention.v_proj(normed).double()
        expected = torch.zeros(batch, tokens, channels, dtype=torch.float64)
        for b in range(batch):
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                logits = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(head_dim)
                for j in range(tokens):
                    logits[:, j] += math.log(size[b, j]) if size[b, j] > 0 else -math.inf
                expected[b, :, cols] = torch.softmax(logits, dim=-1) @ v[b, :, cols]
        expected = hidden.double() + torch.nn.functional.linear(
            expected, attention.out_proj.weight.double(), attention.out_proj.bias.double()
        )
        keys_mean = k.view(batch, tokens, heads, head_dim).mean(dim=2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(metric.double(), keys_mean, rtol=1e-5, atol=1e-5)
    assert (out - plain).abs().max() > 1e-2  # the bias does change the layer


# ------------------------------------------------------------------------------------------------
# Calibration, threshold files
# ------------------------------------------------------------------------------------------------


# DyMU's released ViT-L-14-336 configs: name -> (r_total over 24 blocks, schedule), from
# open_clip/model_configs/ViT-L-14-336-tome-*.json.
OFFICIAL_CONFIGS = {
    "72out": (504, "constant"), "192out": (384, "constant"), "384out": (192, "constant"), "480out": (96, "constant"),
    "72out-linear": (504, "linear"), "192out-linear": (384, "linear"), "192out-reverse-linear": (384, "reverse_linear"),
}


def test_r_schedule_equals_dymu_get_rs_wherever_that_terminates():
    compared = 0
    for layers in (3, 6, 23, 24):
        for r_total in range(0, 577, 7):
            for schedule in ("constant", "linear", "reverse_linear"):
                official = official_get_rs(layers, r_total, schedule)
                if official is not None:
                    assert r_schedule(layers, r_total, schedule) == official, (layers, r_total, schedule)
                    compared += 1
    assert compared > 500


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_official_config_names_give_dymu_r_per_layer(name):
    r_total, schedule = OFFICIAL_CONFIGS[name]
    official = official_get_rs(24, r_total, schedule)
    plan = plan_merging(name, None, tower_layers=24, read_layers=23, num_patches=576)
    assert plan.schedule == schedule and plan.tokens == 576 - r_total
    assert plan.r_per_layer == official[:23]  # LLaVA reads block 23: the 24th r never applies


def test_72out_linear_is_dymus_list():
    """The numbers DyMU's own code prints for ViT-L-14-336-tome-72out-linear, and the nominal count
    LLaVA sees: its last blocks remove nothing, so 72 tokens reach the read layer (93 with the
    former read-layer mapping)."""
    plan = plan_merging("72out-linear", None, tower_layers=24, read_layers=23, num_patches=576)
    assert plan.r_per_layer[:6] == [42, 40, 38, 36, 35, 33]
    assert plan.r_per_layer[-2:] == [0, 0]
    assert 576 - sum(plan.r_per_layer) == 72
    former = plan_merging("low", "read_linear", tower_layers=24, read_layers=23, num_patches=576)  # what "low" + linear was
    assert former.r_per_layer[:6] == [42, 40, 38, 36, 34, 32] and 576 - sum(former.r_per_layer) == 93


def test_presets_and_target_errors():
    for preset, name, per_layer in (("low", "72out", 21), ("mid", "192out", 16), ("high", "384out", 8)):
        plan = plan_merging(preset, None, tower_layers=24, read_layers=23, num_patches=576)
        assert plan.r_per_layer == [per_layer] * 23 == plan_merging(name, None, 24, 23, 576).r_per_layer
        assert plan_merging(preset, "read_constant", 24, 23, 576).r_per_layer == [per_layer] * 23  # same r, other mapping
    assert plan_merging(195, None, 24, 23, 576).r_per_layer == official_get_rs(24, 381)[:23]
    assert plan_merging(195, "read_constant", 24, 23, 576).r_per_layer == [17] * 13 + [16] * 10
    with pytest.raises(ValueError, match="--target 'medium'"):
        plan_merging("medium", None, 24, 23, 576)
    with pytest.raises(ValueError, match="--schedule 'cosine'.*read_constant"):
        plan_merging("mid", "cosine", 24, 23, 576)
    with pytest.raises(ValueError, match="linear schedule"):
        plan_merging("72out-linear", "constant", 24, 23, 576)
    with pytest.raises(ValueError, match="1..576"):
        plan_merging("700out", None, 24, 23, 576)


CALIBRATION_TOLERANCE = 0.10  # mean achieved count within 10% of the target on the calibration images


@torch.no_grad()
@pytest.mark.parametrize(
    "vision_layers,target,schedule,read_count",
    [
        (3, 200, None, 576 - sum(official_get_rs(3, 376)[:2])),  # DyMU's mapping: r_total over all 3 blocks
        (6, 100, None, 576 - sum(official_get_rs(6, 476)[:5])),
        (3, 200, "read_constant", 200),  # the former mapping: 200 at the read layer
    ],
)
def test_calibration_hits_target(tiny, vision_layers, target, schedule, read_count):
    # 3 CLIP layers merge in 2 (reachable down to 576/4 = 144 tokens); 6 layers merge in 5
    model = tiny[0] if vision_layers == 3 else build_tiny_llava(vision_layers=vision_layers)[0]
    processor = tiny[1]
    images = [synthetic_image(100 + seed) for seed in range(12)]
    pixels = processor.image_processor(images, return_tensors="pt").pixel_values
    batches = [pixels[:6], pixels[6:]]
    payload = calibrate_thresholds(model, batches, target, schedule=schedule, progress=False)
    assert payload["calibration"]["tokens_during_calibration_mean"] == read_count  # exactly r*B merged per layer
    assert payload["split"] == "official"
    thresholds = torch.tensor(payload["thresholds"])
    summary = count_summary(measure_token_counts(model, batches, thresholds, progress=False))
    assert abs(summary["tokens_mean"] - read_count) <= CALIBRATION_TOLERANCE * read_count, summary
    assert summary["tokens_std"] > 0  # counts vary per image


@torch.no_grad()
def test_layers_with_r_zero_never_merge(tiny):
    """DyMU skips merging in a block whose r is 0 (`if r > 0` in its block's forward): in
    calibration and at inference. reverse_linear on 6 blocks starts with r = 0."""
    model = build_tiny_llava(vision_layers=6)[0]
    processor = tiny[1]
    pixels = processor.image_processor([synthetic_image(100 + s) for s in range(6)], return_tensors="pt").pixel_values
    rs = official_get_rs(6, 376, "reverse_linear")[:5]
    assert rs[0] == 0 and all(r > 0 for r in rs[1:])
    payload = calibrate_thresholds(model, [pixels], 200, schedule="reverse_linear", progress=False)
    assert payload["target"]["r_per_layer"] == rs
    assert payload["thresholds"][0] == INF and all(math.isfinite(t) for t in payload["thresholds"][1:])
    counts = []

    def select(index, node_max, state):
        counts.append(state.counts())  # before layer `index` merges
        return threshold_merge_mask(node_max, torch.tensor(payload["thresholds"])[index])

    _, state, _ = merging_vision_forward(model, pixels, select)
    assert (counts[1] == 577).all() and (state.counts() < 577).all()  # nothing merged in layer 0, later layers did


def test_calibrate_cli_and_fingerprint_check(tmp_path, tiny, capsys):
    from hybrid_vlm.tiny import ensure_tiny_llava

    model_dir = ensure_tiny_llava(tmp_path / "tiny")
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for seed in range(8):
        synthetic_image(200 + seed).save(image_dir / f"{seed:02d}.png")
    out = tmp_path / "thresholds.json"
    payload = calibrate_main(
        ["--model", str(model_dir), "--images", str(image_dir), "--target", "200", "--out", str(out), "--batch-size", "4", "--no-progress",
         "--device", "cpu"]  # float32 whatever the machine: the fingerprint checks below are of a float32 calibration
    )
    saved = json.loads(out.read_text())
    assert "made one batch" not in capsys.readouterr().err  # 8 images in batches of 4: a mean over two cutoffs
    assert saved["target"]["tokens"] == 200 and len(saved["thresholds"]) == 2
    assert saved["model"]["fingerprint"] == payload["model"]["fingerprint"]
    assert saved["split"] == "official" and saved["calibration"]["batch_size"] == 4
    read_count = 576 - sum(official_get_rs(3, 376)[:2])  # 200 after all 3 blocks: 325 at the read layer
    assert abs(saved["achieved"]["tokens_mean"] - read_count) <= CALIBRATION_TOLERANCE * read_count

    from transformers import LlavaForConditionalGeneration

    same = LlavaForConditionalGeneration.from_pretrained(model_dir, **NO_HUB_KERNELS)
    torch.testing.assert_close(load_thresholds(out, same), torch.tensor(saved["thresholds"]))
    half = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16, **NO_HUB_KERNELS)
    assert vision_fingerprint(half)["fingerprint"] == saved["model"]["fingerprint"]  # the same digest
    # float16 rounds this float32 checkpoint twice on its way to the digest: the signature carries it
    # (on a GPU the plugin's default dtype is float16, so the shipped testbed's DyMU names failed there)
    fp16 = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float16, **NO_HUB_KERNELS)
    assert vision_fingerprint(fp16)["fingerprint"] != saved["model"]["fingerprint"]
    torch.testing.assert_close(load_thresholds(out, fp16), torch.tensor(saved["thresholds"]))
    for seed in range(5):  # a fine-tune's worth of change in one merging weight: other weights, whatever the draw
        nudged = LlavaForConditionalGeneration.from_pretrained(model_dir, **NO_HUB_KERNELS)
        with torch.no_grad():
            weight = nudged.model.vision_tower.encoder.layers[0].self_attn.k_proj.weight
            weight.add_(0.05 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
        with pytest.raises(ValueError, match="calibrated for model"):
            load_thresholds(out, nudged)
    # a file made before signatures: refused in float16 until `--sign` adds its model's signature
    unsigned = json.loads(out.read_text())
    del unsigned["model"]["signature"]
    out.write_text(json.dumps(unsigned))
    with pytest.raises(ValueError, match="calibrated for model"):
        load_thresholds(out, fp16)
    with pytest.raises(ValueError, match="not this model's"):
        add_signature(out, nudged)
    # --dtype float16 (what "auto" means on a GPU) must not change what is signed: the file's weights, read in float32;
    # --device is ignored too (--device cuda was refused on a machine without one)
    calibrate_main(["--sign", "--model", str(model_dir), "--out", str(out), "--device", "cuda", "--dtype", "float16"])
    torch.testing.assert_close(load_thresholds(out, fp16), torch.tensor(saved["thresholds"]))
    assert {key: value for key, value in json.loads(out.read_text()).items() if key != "model"} == {
        key: value for key, value in saved.items() if key != "model"}

    other, _ = build_tiny_llava(seed=1)  # same config, other weights
    other_print = vision_fingerprint(other)["fingerprint"]
    assert other_print != saved["model"]["fingerprint"]
    with pytest.raises(ValueError) as error:
        load_thresholds(out, other)
    message = str(error.value)
    assert saved["model"]["fingerprint"] in message and other_print in message
    assert portable_path(model_dir) in message and "calibrated for model" in message  # as recorded: no machine path
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    with pytest.raises(SystemExit) as exit_info:  # --sign with another model's file: a usage error, not a traceback
        calibrate_main(["--sign", "--model", str(other_dir), "--out", str(out)])
    assert exit_info.value.code == 2


def test_a_tower_that_differs_only_off_the_key_path_is_refused_and_older_files_are_re_signed(tmp_path, tiny):
    """A layer's keys depend on every earlier layer, not only on its own q/k: a tower whose first
    layer's MLP and value projection differ merges differently (the reviewer's counts: 317/339/309
    calibrated, 289/313/263 on the other tower) and passed the fingerprint of the q/k path alone.
    A file of that older coverage still loads, with a warning, and --sign re-fingerprints it."""
    from hybrid_vlm.calibrate import write_threshold_file
    from hybrid_vlm.hf_compat.clip import MERGING_KEYS, vision_parts, vision_signature

    model, processor = tiny
    pixel_values = image_inputs_for(processor, [400, 401])
    path = tmp_path / "t.json"
    write_threshold_file(path, calibrate_thresholds(model, [pixel_values], target=200, progress=False))
    other = copy.deepcopy(model)
    with torch.no_grad():
        first = vision_parts(other).layers[0]
        first.mlp.fc2.weight.mul_(1.5)
        first.self_attn.v_proj.weight.neg_()
    thresholds = load_thresholds(path, model)
    assert not torch.equal(dymu_merge_counts(other, pixel_values, thresholds), dymu_merge_counts(model, pixel_values, thresholds))
    with pytest.raises(ValueError, match="calibrated for model"):
        load_thresholds(path, other)

    older = json.loads(path.read_text())  # as calibrate wrote it before the coverage was recorded
    older["model"] = {**vision_fingerprint(model, MERGING_KEYS), "signature": vision_signature(model, MERGING_KEYS)}
    older.pop("format")
    write_threshold_file(path, older)
    with pytest.warns(UserWarning, match="fingerprints only the q/k path"):
        torch.testing.assert_close(load_thresholds(path, model), thresholds)
    add_signature(path, model)
    assert json.loads(path.read_text())["model"]["weights"] == "read_layers"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(load_thresholds(path, model), thresholds)
    with pytest.raises(ValueError, match="calibrated for model"):
        load_thresholds(path, other)


def dymu_merge_counts(model, pixel_values, thresholds) -> torch.Tensor:
    with torch.no_grad():
        return dymu_image_features(model, pixel_values, thresholds).num_tokens


@pytest.mark.parametrize(
    "field, value, named",
    [("thresholds", None, "'thresholds' must be a non-empty list"), ("thresholds", "0.9", "'thresholds' must be"),
     ("thresholds", [], "'thresholds' must be"), ("thresholds", [float("nan"), 0.8], r"thresholds\[0\] is nan"),
     ("thresholds", [0.9, "0.8"], r"thresholds\[1\] is '0.8'"), ("thresholds", [True, 0.8], r"thresholds\[0\] is True"),
     ("model", "tiny", "'model' must be"), ("split", "bogus", "'split' is 'bogus'; calibrate writes one of")],
)
def test_a_malformed_threshold_file_is_refused_naming_the_field(tmp_path, tiny, field, value, named):
    """A hand-edited file is refused with the file and the field, where it would otherwise raise a
    KeyError or merge silently at a threshold nobody calibrated (a NaN layer never merges)."""
    from hybrid_vlm.calibrate import write_threshold_file

    model, processor = tiny
    pixels = processor.image_processor([synthetic_image(s) for s in range(2)], return_tensors="pt").pixel_values
    path = tmp_path / "edited.json"
    write_threshold_file(path, calibrate_thresholds(model, [pixels], 300, progress=False))
    load_thresholds(path, model)  # the file as written loads
    payload = json.loads(path.read_text())
    if field == "thresholds" and isinstance(value, list) and len(value) == 2:
        value = value + payload["thresholds"][2:]
    payload[field] = value
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=f"{path}: {named}"):
        load_thresholds(path, model)


def test_threshold_file_split_is_checked(tmp_path, tiny):
    """A file records its split; one made before the field existed (format v1) was calibrated with
    the slot split. Using a file under another split warns (counts would not be the calibrated ones)."""
    from hybrid_vlm.calibrate import DEFAULT_BATCH_SIZE, parse_args, write_threshold_file

    model, processor = tiny
    pixels = processor.image_processor([synthetic_image(s) for s in range(4)], return_tensors="pt").pixel_values
    payload = calibrate_thresholds(model, [pixels], 300, split="slot", progress=False)
    path = tmp_path / "slot.json"
    write_threshold_file(path, payload)
    with pytest.warns(UserWarning, match="DYMU_SPLIT=slot, but DYMU_SPLIT=official"):
        load_thresholds(path, model, "official")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matching split loads silently
        load_thresholds(path, model, "slot")
    old = json.loads(path.read_text())
    old["format"] = "hybrid-vlm/dymu-thresholds/v1"
    del old["split"]
    path.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="calibrated with DYMU_SPLIT=slot"):
        load_thresholds(path, model, "official")
    assert DEFAULT_BATCH_SIZE == 64 == parse_args(["--model", "m", "--images", "i", "--out", "o"]).batch_size


def _image_dir(tmp_path, size=(336, 168), count=4):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(count):
        synthetic_image(500 + seed).resize(size).save(folder / f"{seed:02d}.png")
    return folder


def test_calibration_pads_llava_15_images_as_inference_does(tmp_path, tiny):
    """LLaVA-1.5's inference pads each image to a square of the mean colour before the processor
    (VLMEvalKit's LLaVA, the plugin); calibrating on the processor's centre crop instead gave other
    pixels, so other counts (the shipped testbed on 336 x 224 scenes: 235 tokens calibrated, 361 at
    inference). By default the CLI's batches are the padded images, pixel for pixel; --preprocess crop
    keeps the crop, and the file says which it used."""
    from PIL import Image

    from hybrid_vlm.calibrate import pixel_batches
    from hybrid_vlm.tiny import ensure_tiny_llava

    model, processor = tiny
    folder = _image_dir(tmp_path)
    files = sorted(folder.iterdir())
    mean = np.array([int(v * 255) for v in processor.image_processor.image_mean], dtype=np.uint8)
    padded = []
    for path in files:  # the reference pad, written out: 336 x 168 centred on a 336 x 336 canvas of the mean colour
        canvas = np.broadcast_to(mean, (336, 336, 3)).copy()
        canvas[84:252] = np.asarray(Image.open(path).convert("RGB"))
        padded.append(Image.fromarray(canvas))
    expected = processor.image_processor(padded, return_tensors="pt").pixel_values
    got = torch.cat(list(pixel_batches(files, processor.image_processor, 3, "cpu", torch.float32, model)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    cropped = torch.cat(list(pixel_batches(files, processor.image_processor, 3, "cpu", torch.float32, model, "crop")))
    assert not torch.equal(cropped, got)

    model_dir = ensure_tiny_llava(tmp_path / "tiny")
    common = ["--model", str(model_dir), "--images", str(folder), "--target", "200", "--batch-size", "2", "--no-progress"]
    pad = calibrate_main([*common, "--out", str(tmp_path / "pad.json")])
    crop = calibrate_main([*common, "--out", str(tmp_path / "crop.json"), "--preprocess", "crop"])
    assert pad["calibration"]["preprocess"].startswith("centred on a square") and crop["calibration"]["preprocess"].startswith("the processor alone")
    assert pad["thresholds"] != crop["thresholds"]
    assert pad["calibration"]["source_images"] == pad["calibration"]["images"] == 4


@pytest.mark.parametrize("extra,named", [
    (["--max-images", "0"], "--max-images 0: use at least 1"),
    (["--max-images", "-3"], "--max-images -3: use at least 1"),
    (["--batch-size", "0"], "--batch-size 0: use at least 1"),
    (["--target", "bogus"], "--target 'bogus' is not valid"),
    (["--target", "9999"], "--target '9999' is not valid: use 1..576"),
    (["--out-is-dir"], "is a directory"),
    (["--empty-images"], "no image files"),
    (["--out-an-image"], "name a .json file"),  # it overwrote that image after the first pass
    (["--model-gpt2"], "a llava-hf LLaVA-1.5 or LLaVA-NeXT checkpoint is needed (model_type llava or llava_next), this one is 'gpt2'"),
    (["--model-qwen"], "DyMU is not implemented for Qwen2.5-VL"),
    (["--model-missing"], "no such checkpoint directory"),
])
def test_calibrate_refuses_bad_settings_before_loading_the_model(tmp_path, monkeypatch, capsys, extra, named):
    """Each bad setting is a usage error (exit 2) naming it, raised before the model loads (minutes
    for a 7B); before, several were a traceback after the load or after both passes."""
    from hybrid_vlm import model as model_module
    from hybrid_vlm.tiny import ensure_tiny_llava

    model_dir = ensure_tiny_llava(tmp_path / "tiny")
    monkeypatch.setattr(model_module, "load_supported_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    folder = _image_dir(tmp_path, count=2)
    out = str(tmp_path / "t.json")
    if extra == ["--out-is-dir"]:
        extra, out = [], str(tmp_path)
    if extra == ["--empty-images"]:
        extra, folder = [], tmp_path / "empty"
        folder.mkdir()
    if extra == ["--out-an-image"]:
        extra, out = [], str(next(folder.iterdir()))
    image = next(folder.iterdir(), None)
    before = image.read_bytes() if image is not None else None
    if extra in (["--model-gpt2"], ["--model-qwen"]):
        from transformers import GPT2Config, Qwen2_5_VLConfig

        model_dir = tmp_path / extra[0]
        model_dir.mkdir()
        (GPT2Config() if extra == ["--model-gpt2"] else Qwen2_5_VLConfig()).save_pretrained(model_dir)
        extra = []
    if extra == ["--model-missing"]:
        extra, model_dir = [], tmp_path / "no" / "such"
    with pytest.raises(SystemExit) as exit_info:
        calibrate_main(["--model", str(model_dir), "--images", str(folder), "--out", out, "--no-progress", *extra])
    assert image is None or image.read_bytes() == before
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_an_undecodable_image_file_is_named_and_left_out(tmp_path, capsys):
    """A truncated download or a stray '._x.jpg' ended the run in its batch, losing the batches
    before it; it is now named, left out, and recorded in the file. A --sign on a file that is not a
    threshold file is a usage error naming it."""
    from hybrid_vlm.tiny import ensure_tiny_llava

    model_dir = ensure_tiny_llava(tmp_path / "tiny")
    folder = _image_dir(tmp_path, size=(336, 336), count=3)
    (folder / "._01.jpg").write_bytes(b"\x00\x05\x16\x07 not a jpeg")
    out = tmp_path / "t.json"
    payload = calibrate_main(["--model", str(model_dir), "--images", str(folder), "--target", "200", "--out", str(out), "--no-progress"])
    assert payload["calibration"]["images"] == 3 and len(payload["achieved"]) and payload["achieved"]["images"] == 3
    assert [p.rsplit("/", 1)[-1] for p in payload["calibration"]["unreadable_files_left_out"]] == ["._01.jpg"]
    err = capsys.readouterr().err
    assert "leaving out" in err and "all 3 images made one batch (--batch-size 64)" in err
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        calibrate_main(["--sign", "--model", str(model_dir), "--out", str(tmp_path / "bad.json")])
    assert exit_info.value.code == 2 and "--sign --out" in capsys.readouterr().err


def test_a_failure_after_the_calibration_pass_keeps_its_thresholds(tmp_path, monkeypatch, capsys):
    """The second pass only measures what the thresholds achieve: an image that vanished, an out-of-
    memory error or a Ctrl-C there kept nothing of the long calibration pass. The file now holds the
    thresholds a full run writes, with "achieved" null, and the error still ends the run."""
    import hybrid_vlm.calibrate as calibrate
    from hybrid_vlm.tiny import ensure_tiny_llava

    model_dir = ensure_tiny_llava(tmp_path / "tiny")
    common = ["--model", str(model_dir), "--images", str(_image_dir(tmp_path)), "--target", "200", "--batch-size", "2", "--no-progress",
              "--device", "cpu"]  # two calibrations compared exactly: CUDA's index_add_ may sum in another order
    calibrate_main([*common, "--out", str(tmp_path / "complete.json")])
    complete = json.loads((tmp_path / "complete.json").read_text())

    def lost_image(*args, **kwargs):
        raise FileNotFoundError("an image of the calibration set is gone")

    monkeypatch.setattr(calibrate, "measure_token_counts", lost_image)
    out = tmp_path / "cut.json"
    with pytest.raises(FileNotFoundError):
        calibrate_main([*common, "--out", str(out)])
    kept = json.loads(out.read_text())
    assert kept["thresholds"] == complete["thresholds"] and kept["achieved"] is None
    assert f"the thresholds are written to {out}" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))


def test_the_first_layer_threshold_is_dymus_cutoff_rule_computed_independently(tiny):
    """The calibrated threshold of the first CLIP layer, where the A/B split and the token counts are
    the same in every image, equals DyMU's rule written out in tests/reference.py: per batch the best
    score left unmerged by the top r x B merges, at least 0, averaged over batches of unequal sizes."""
    model, processor = tiny
    images = [image_inputs_for(processor, seeds) for seeds in ([300, 301, 302], [303, 304])]
    payload = calibrate_thresholds(model, images, target=200, progress=False)
    r = official_get_rs(3, 376)[0]  # 200 tokens after the 3 blocks: r_total 376, constant
    expected = official_layer0_cutoff(model, images, r)
    assert payload["thresholds"][0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert 0 < expected < 1


def image_inputs_for(processor, seeds: list[int]) -> torch.Tensor:
    return processor.image_processor([synthetic_image(seed) for seed in seeds], return_tensors="pt").pixel_values


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_proportional_attention_bias_is_log_size_in_the_model_precision(dtype):
    """The float64 references run the tower in float64 so that no score sits within rounding of a
    threshold; the bias log(size) must be that exact too (math.log), and -inf where merged away."""
    state = MergeState.initial(1, 5, "cpu")
    state.size = torch.tensor([[1.0, 3.0, 7.0, 0.0, 11.0]])
    state.valid = torch.tensor([[True, True, True, False, True]])
    bias = attention_bias(state, dtype)[0, 0, 0]
    expected = torch.tensor([math.log(1.0), math.log(3.0), math.log(7.0), float("-inf"), math.log(11.0)], dtype=dtype)
    assert bias.dtype == dtype and torch.equal(bias, expected)
