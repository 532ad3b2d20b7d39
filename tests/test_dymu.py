"""DyMU vision-side merging: checked against stock LLaVA and against independent NumPy/Python references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hybrid_vlm.calibrate import calibrate_thresholds, count_summary, load_thresholds, measure_token_counts
from hybrid_vlm.calibrate import main as calibrate_main
from hybrid_vlm.dymu import (
    PRESETS,
    MergeState,
    attention_bias,
    bipartite_scores,
    merge_tokens,
    r_schedule,
    representative_slots,
    resolve_target,
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
from hybrid_vlm.tiny import build_tiny_llava, synthetic_image

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
@pytest.mark.parametrize("compact", [False, True])
def test_infinite_thresholds_equal_stock_image_features(tiny, pixels, compact):
    model, _ = tiny
    reference = stock_image_features(model, pixels)  # get_image_features, layer -2, CLS dropped
    out = dymu_image_features(model, pixels, torch.full((layers_of(model),), INF), compact=compact)
    assert layers_of(model) == model.config.vision_config.num_hidden_layers - 1  # last layer never runs
    assert out.features.shape == reference.shape == (NUM_IMAGES, 576, model.config.text_config.hidden_size)
    assert (out.features - reference).abs().max().item() <= 1e-6 * max(1.0, reference.abs().max().item())
    assert out.valid.all()
    assert (out.sizes == 1).all()
    assert (out.coverage == torch.arange(576)).all()
    assert (out.num_tokens == 576).all()


@torch.no_grad()
def test_static_path_has_no_host_reads(tiny):
    """On the meta device any .item(), bool(tensor), nonzero or boolean-mask indexing raises."""
    model, _ = tiny
    meta_model = build_tiny_llava()[0].to("meta")
    pixels = torch.empty(2, 3, 336, 336, device="meta")
    thresholds = torch.full((layers_of(model),), 0.7, device="meta")
    out = dymu_image_features(meta_model, pixels, thresholds)
    assert out.features.shape == (2, 576, model.config.text_config.hidden_size)
    with pytest.raises(RuntimeError):  # the optional compacting path reads the batch max on the host
        dymu_image_features(meta_model, pixels, thresholds, compact=True)


# ------------------------------------------------------------------------------------------------
# Pure merging maths against NumPy references
# ------------------------------------------------------------------------------------------------


def numpy_bipartite(metric: np.ndarray, valid: np.ndarray):
    """Plain loop: valid slots alternate A/B by rank; rank 0 (CLS) is protected."""
    batch, slots, _ = metric.shape
    node_max = np.full((batch, slots), -np.inf)
    node_idx = np.full((batch, slots), -1)
    for b in range(batch):
        live = [s for s in range(slots) if valid[b, s]]
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
        node_max, node_idx = bipartite_scores(metric, state.valid)
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
@pytest.mark.parametrize("compact", [False, True])
def test_batched_equals_per_image(tiny, pixels, compact):
    model, _ = tiny
    thresholds = torch.tensor([0.72, 0.7])
    batched = dymu_image_features(model, pixels, thresholds, compact=compact)
    assert len(set(batched.num_tokens.tolist())) > 1  # the images really have different counts
    for b in range(NUM_IMAGES):
        single = dymu_image_features(model, pixels[b : b + 1], thresholds, compact=compact)
        assert torch.equal(single.valid[0], batched.valid[b])
        assert torch.equal(single.sizes[0], batched.sizes[b])
        assert torch.equal(single.coverage[0], batched.coverage[b])
        scale = batched.features[b].abs().max()
        assert (single.features[0] - batched.features[b]).abs().max() <= 1e-5 * scale
    static = dymu_image_features(model, pixels, thresholds, compact=not compact)
    assert torch.equal(static.valid, batched.valid)  # compacting keeps the bipartite split


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
    state = MergeState(size=size, valid=size > 0, owner=torch.zeros(batch, tokens, dtype=torch.long))
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


def test_r_schedule_and_presets():
    assert r_schedule(24, 504) == [21] * 24  # DyMU ViT-L-14-336-tome-72out
    assert r_schedule(23, 576 - PRESETS["low"]) == [21] * 23
    assert r_schedule(23, 576 - PRESETS["mid"]) == [16] * 23
    assert r_schedule(23, 576 - PRESETS["high"]) == [8] * 23
    assert r_schedule(23, 381) == [17] * 13 + [16] * 10
    for schedule in ("linear", "reverse_linear"):
        values = r_schedule(24, 504, schedule)
        assert sum(values) == 504 and len(values) == 24
    assert resolve_target("mid", 576) == (208, "mid")
    assert resolve_target(195, 576) == (195, None)
    with pytest.raises(ValueError):
        resolve_target("medium", 576)


CALIBRATION_TOLERANCE = 0.10  # mean achieved count within 10% of the target on the calibration images


@torch.no_grad()
@pytest.mark.parametrize("vision_layers,target", [(3, 200), (6, 100)])
def test_calibration_hits_target(tiny, vision_layers, target):
    # 3 CLIP layers merge in 2 (reachable down to 576/4 = 144 tokens); 6 layers merge in 5
    model = tiny[0] if vision_layers == 3 else build_tiny_llava(vision_layers=vision_layers)[0]
    processor = tiny[1]
    images = [synthetic_image(100 + seed) for seed in range(12)]
    pixels = processor.image_processor(images, return_tensors="pt").pixel_values
    batches = [pixels[:6], pixels[6:]]
    payload = calibrate_thresholds(model, batches, target, progress=False)
    assert payload["calibration"]["tokens_during_calibration_mean"] == target  # exactly r*B merged per layer
    thresholds = torch.tensor(payload["thresholds"])
    summary = count_summary(measure_token_counts(model, batches, thresholds, progress=False))
    assert abs(summary["tokens_mean"] - target) <= CALIBRATION_TOLERANCE * target, summary
    assert summary["tokens_std"] > 0  # counts vary per image


def test_calibrate_cli_and_fingerprint_check(tmp_path, tiny):
    from hybrid_vlm.tiny import ensure_tiny_llava

    model_dir = ensure_tiny_llava(tmp_path / "tiny")
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for seed in range(8):
        synthetic_image(200 + seed).save(image_dir / f"{seed:02d}.png")
    out = tmp_path / "thresholds.json"
    payload = calibrate_main(
        ["--model", str(model_dir), "--images", str(image_dir), "--target", "200", "--out", str(out), "--batch-size", "4", "--no-progress"]
    )
    saved = json.loads(out.read_text())
    assert saved["target"]["tokens"] == 200 and len(saved["thresholds"]) == 2
    assert saved["model"]["fingerprint"] == payload["model"]["fingerprint"]
    assert abs(saved["achieved"]["tokens_mean"] - 200) <= CALIBRATION_TOLERANCE * 200

    from transformers import LlavaForConditionalGeneration

    same = LlavaForConditionalGeneration.from_pretrained(model_dir)
    torch.testing.assert_close(load_thresholds(out, same), torch.tensor(saved["thresholds"]))
    half = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert vision_fingerprint(half)["fingerprint"] == saved["model"]["fingerprint"]  # dtype-independent

    other, _ = build_tiny_llava(seed=1)  # same config, other weights
    other_print = vision_fingerprint(other)["fingerprint"]
    assert other_print != saved["model"]["fingerprint"]
    with pytest.raises(ValueError) as error:
        load_thresholds(out, other)
    message = str(error.value)
    assert saved["model"]["fingerprint"] in message and other_print in message
    assert str(model_dir) in message and "calibrated for model" in message
