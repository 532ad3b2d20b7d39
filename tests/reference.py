"""Independent references the engine is tested against, built from stock transformers modules."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from conftest import generation_positions


def official_keep_count(num_visual: int, fastv_k: int | float) -> int:
    """FastV's kept count as the official llava-hf code writes it: top-n, or
    `round(FASTV_image_token_length * (1 - FASTV_r))` (Python's round: half to even)."""
    if isinstance(fastv_k, int):
        return min(fastv_k, num_visual)
    return round(num_visual * (1 - fastv_k))


def eager_copy(model):
    reference = copy.deepcopy(model)
    for config in (reference.config, reference.config.text_config, reference.config.vision_config):
        config._attn_implementation = "eager"
    return reference


def numpy_random_scores(pixel_values: torch.Tensor, seed: int, slots: int = 576) -> np.ndarray:
    """The random baseline's draw (hybrid_vlm.baselines' spec), in NumPy, one image at a time: [N, slots]."""
    modulus = 2**31
    scores = []
    for image in pixel_values.float().numpy():
        quantised = np.round(image.reshape(-1) * np.float32(16)).astype(np.int64)
        weights = (np.arange(quantised.size, dtype=np.int64) * 40503 + 1) % 65536
        key = int((quantised * weights).sum()) % modulus
        state = (key * 1_000_003 + np.arange(slots, dtype=np.int64) * 7919 + seed * 104_729) % modulus
        for _ in range(4):
            state = (state * 1_103_515_245 + 12_345) % modulus
            state ^= state >> 13
        scores.append(state / modulus)
    return np.stack(scores)


def numpy_pooled_features(features: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial pooling in NumPy: block means of the 24 x 24 grid at each block's central patch."""
    images, tokens, hidden = features.shape
    grid = int(round(tokens**0.5))
    placed = np.zeros((images, tokens, hidden), dtype=np.float64)
    valid = np.zeros((images, tokens), dtype=bool)
    values = features.double().numpy().reshape(images, grid, grid, hidden)
    for top in range(0, grid, side):
        for left in range(0, grid, side):
            centre = (top + side // 2) * grid + left + side // 2
            placed[:, centre] = values[:, top : top + side, left : left + side].mean(axis=(1, 2))
            valid[:, centre] = True
    return torch.from_numpy(placed).to(features.dtype), torch.from_numpy(valid)


@torch.no_grad()
def stock_vision_reads(model, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    """What the methods before the LLM read, from stock eager CLIP (attention weights returned by
    transformers) and a hook on the read layer's k_proj, as float64 NumPy per image:
    cls_attention [N, P] (head mean), keys [N, P, head_dim] (head mean), hidden [N, P, C] (the
    read layer's output), projected [N, P, hidden] (stock get_image_features; for LLaVA-NeXT crops,
    the projector on that layer, as stock does before packing)."""
    reference = eager_copy(model)
    tower = reference.model.vision_tower
    layers = tower.config.num_hidden_layers
    read = layers + model.config.vision_feature_layer  # hidden_states[-2] is the output of layer index 22 of 24
    captured = {}
    hook = tower.encoder.layers[read].self_attn.k_proj.register_forward_hook(lambda m, a, out: captured.update(keys=out))
    outputs = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    hook.remove()
    heads = tower.config.num_attention_heads
    keys = captured["keys"].reshape(*captured["keys"].shape[:2], heads, -1).mean(dim=2)
    if getattr(model.config, "image_grid_pinpoints", None) is None:
        projected = torch.stack(list(reference.model.get_image_features(pixel_values, return_dict=True).pooler_output))
    else:  # LLaVA-NeXT crops: stock projects each crop's read layer before packing
        projected = reference.model.multi_modal_projector(outputs.hidden_states[read + 1][:, 1:])
    return dict(
        cls_attention=outputs.attentions[read][:, :, 0, 1:].mean(dim=1).double().numpy(),
        keys=keys[:, 1:].double().numpy(),
        hidden=outputs.hidden_states[read + 1][:, 1:].double().numpy(),
        projected=projected.double().numpy(),
    )


@torch.no_grad()
def next_packed_sources(model, inputs) -> list[np.ndarray]:
    """LLaVA-NeXT: per prompt (one image each), for every packed token the index crop * P + patch
    of the crop patch it is, or -1 for a newline: stock `pack_image_features` run on index features."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config, sources = model.config, []
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    for size in inputs["image_sizes"].tolist():
        crops = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        index = torch.arange(crops * patches, dtype=torch.float64).reshape(crops, patches, 1)
        packed, _ = model.model.pack_image_features([index], torch.tensor([size]), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64))
        sources.append(packed[0][:, 0].long().numpy())
    return sources


def numpy_adaptive_pool(features: np.ndarray, rows: int, cols: int, grid: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image [R*C, D] (square unless `grid` = (R, C)) -> (kept slots, tokens): the mean of each
    adaptive window [floor(i R / n), ceil((i + 1) R / n)) per axis, at the window's central patch
    (offset h // 2, w // 2)."""
    grid_rows, grid_cols = (int(round(features.shape[0] ** 0.5)),) * 2 if grid is None else grid
    values = features.reshape(grid_rows, grid_cols, -1)
    slots, tokens = [], []
    for i in range(rows):
        top, bottom = (i * grid_rows) // rows, -((-(i + 1) * grid_rows) // rows)
        for j in range(cols):
            left, right = (j * grid_cols) // cols, -((-(j + 1) * grid_cols) // cols)
            slots.append((top + (bottom - top) // 2) * grid_cols + left + (right - left) // 2)
            tokens.append(values[top:bottom, left:right].mean(axis=(0, 1)))
    order = np.argsort(slots)
    return np.asarray(slots)[order], np.stack(tokens)[order]


@torch.no_grad()
def masked_reference(
    model, inputs, fastv_k, fastv_layer: int, thresholds: torch.Tensor | None = None, split: str = "official",
    select: str = "attention", select_seed: int = 0, pool: int | None = None, newlines: str = "prune",
    image_features: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Stock eager decoder layers over every prompt token, at the original position ids.

    Nothing is ever removed: padding, DyMU's merged-away placeholder slots (when `thresholds` is
    given; merged tokens sit at their representative placeholders) and, from `fastv_layer` on, the
    visual tokens FastV drops are masked as keys. The kept set is chosen here, with NumPy, from the
    stock eager attention weights of layer fastv_layer - 1 (last prompt token, head-averaged), and
    its size by the official rule (`official_keep_count`). `split`: DyMU's split order.
    select="random": the kept set is the top of `numpy_random_scores` instead. pool=s: the image
    features are pooled by `numpy_pooled_features` and the other placeholders masked.
    newlines="keep" (LLaVA-NeXT): newline tokens are always kept and the budget counts the others.
    image_features=(features [B, 576, hidden], slot_valid [B, 576]), or per-sample lists of [V_b, ...]:
    the image tokens a method before the LLM chose, computed by the caller (its placeholders
    without a token are masked).
    Returns (logits [B, L, V], kept [B, L] bool: real tokens that the last layer attends to).
    """
    reference = eager_copy(model)
    language_model = reference.model.language_model
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = input_ids.shape
    is_visual = (input_ids == reference.config.image_token_id).numpy()

    embeds = language_model.embed_tokens(input_ids)
    real = attention_mask.bool().clone()
    protected = np.zeros((batch, length), dtype=bool)
    if image_features is not None:
        features, slot_valid = image_features
    elif "image_sizes" in inputs:  # LLaVA-NeXT: packed anyres features, one image per prompt
        features, slot_valid = next_reference_features(reference, inputs, thresholds, split)
        if newlines == "keep":
            newline = reference.model.image_newline
            for b in range(batch):
                protected[b, np.flatnonzero(is_visual[b])] = (features[b] == newline).all(dim=-1).numpy()
    elif thresholds is None:
        features = reference.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        slot_valid = torch.ones(batch, is_visual.sum(axis=1).max(), dtype=torch.bool)
        if pool is not None:
            features, slot_valid = numpy_pooled_features(torch.stack(list(features)), pool)
    else:
        from hybrid_vlm.hf_compat import dymu_image_features

        merged = dymu_image_features(reference, inputs["pixel_values"], thresholds, split=split)
        features, slot_valid = merged.features, merged.valid
    for b in range(batch):
        slots = np.flatnonzero(is_visual[b])
        embeds[b, slots] = features[b]
        real[b, slots] &= slot_valid[b]
    positions = generation_positions(attention_mask)
    cos_sin = language_model.rotary_emb(embeds, positions)
    slot_scores = None
    if fastv_k is not None and select == "random":
        slot_scores = np.zeros((batch, length))
        for b in range(batch):
            slots = np.flatnonzero(is_visual[b])
            if "image_sizes" in inputs:  # LLaVA-NeXT: keyed on the base crop, one draw per packed token
                slot_scores[b, slots] = numpy_random_scores(inputs["pixel_values"][b : b + 1, 0], select_seed, len(slots))[0]
            else:
                slot_scores[b, slots] = numpy_random_scores(inputs["pixel_values"][b : b + 1], select_seed)[0]
    hidden, kept = masked_fastv_layers(language_model, embeds, cos_sin, real, is_visual, fastv_k, fastv_layer, slot_scores, protected,
                                       position_ids=positions)
    return reference.lm_head(language_model.norm(hidden)), kept


def next_reference_features(model, inputs, thresholds, split):
    """LLaVA-NeXT image features per prompt as the reference places them: ([V_b, hidden] each,
    [V_b] bool each). Without thresholds: stock `get_image_features`. With thresholds: every crop
    merged by `dymu_image_features` (tested against DyMU's official merging in test_dymu.py), then,
    per image, stock packing of the patch map and a NumPy loop that re-places each token at the
    real patch it covers nearest to the centroid of its real patches (ties to the earliest)."""
    if thresholds is None:
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True).pooler_output
        return list(features), [torch.ones(f.shape[0], dtype=torch.bool) for f in features]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from hybrid_vlm.hf_compat import dymu_image_features

    config = model.config
    features, valid = [], []
    for pixels, size in zip(inputs["pixel_values"], inputs["image_sizes"].tolist()):
        crops = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        merged = dymu_image_features(model, pixels[:crops], thresholds, split=split)
        patches = merged.valid.shape[1]
        owner = (torch.arange(crops)[:, None] * patches + merged.coverage).double()[..., None]  # [crops, P, 1]
        packed, _ = model.model.pack_image_features([owner], torch.tensor([size]), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64))
        owner = packed[0][:, 0].long().numpy()
        placed = np.zeros(len(owner), dtype=bool)
        placed[:patches] = merged.valid[0].numpy()
        placed[patches:] = owner[patches:] < 0  # newlines
        grid = np.flatnonzero(owner[patches:] >= 0)  # grid patches in raster order of the unpadded grid
        width = (len(owner) - patches - (owner[patches:] < 0).sum()) // max((owner[patches:] < 0).sum(), 1)
        grid_owner = owner[patches:][grid]
        for token in np.unique(grid_owner):
            members = np.flatnonzero(grid_owner == token)  # raster index on the unpadded grid (newlines skipped)
            rows, cols, n = members // width, members % width, len(members)
            distance = (n * rows - rows.sum()) ** 2 + (n * cols - cols.sum()) ** 2  # exact: n^2 x squared distance
            placed[patches + grid[members[np.argmin(distance)]]] = True  # argmin: the first, i.e. earliest, of ties
        flat = merged.features.reshape(-1, merged.features.shape[-1])
        rows = torch.where(torch.from_numpy(owner)[:, None] < 0, model.model.image_newline, flat[torch.from_numpy(owner).clamp_min(0)])
        features.append(rows)
        valid.append(torch.from_numpy(placed))
    return features, valid


@torch.no_grad()
def masked_fastv_layers(language_model, embeds, cos_sin, real, is_visual, fastv_k, fastv_layer, slot_scores=None, protected=None, **layer_kwargs):
    """The stock eager decoder layers over every token, nothing removed: padding (`real` False) and,
    from `fastv_layer` on, the visual tokens FastV drops are masked as keys. The kept set is chosen with
    NumPy from layer fastv_layer - 1's eager attention weights (last prompt token, head-averaged), or
    from `slot_scores` [B, L] when given, its size by the official rule; `protected` [B, L] slots are
    always kept and not counted. Returns (hidden [B, L, D] after the last layer, kept [B, L] bool)."""
    batch, length = real.shape
    protected = np.zeros((batch, length), dtype=bool) if protected is None else protected
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & real[:, None, :]
    kept = real.clone()
    captured = {}
    hook = language_model.layers[fastv_layer - 1].self_attn.register_forward_hook(
        lambda module, args, output: captured.update(weights=output[1])
    )
    hidden = embeds
    for layer_idx, layer in enumerate(language_model.layers):
        if fastv_k is not None and layer_idx == fastv_layer:
            row = captured["weights"][:, :, -1, :].mean(dim=1).numpy() if slot_scores is None else slot_scores  # [B, L]
            for b in range(batch):
                visual_real = np.flatnonzero(is_visual[b] & real[b].numpy() & ~protected[b])
                keep = official_keep_count(len(visual_real), fastv_k)
                order = np.argsort(-row[b, visual_real], kind="stable")
                kept[b, visual_real[order[keep:]]] = False
        pruned = fastv_k is not None and layer_idx >= fastv_layer
        layer_allowed = allowed & kept[:, None, :] if pruned else allowed
        additive = torch.zeros(batch, 1, length, length).masked_fill(~layer_allowed[:, None], torch.finfo(torch.float32).min)
        hidden = layer(hidden, attention_mask=additive, position_embeddings=cos_sin, **layer_kwargs)
    hook.remove()
    return hidden, kept


def greedy_without_cache(model, inputs, steps: int) -> torch.Tensor:
    """Recompute the whole pruned model at every step, scoring with the last prompt token.

    End-of-sequence is suppressed, as generate(min_new_tokens=steps) does on the cached side.
    """
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    last_prompt_token = input_ids.shape[1] - 1
    for _ in range(steps):
        images = {key: inputs[key] for key in ("pixel_values", "image_sizes", "image_grid_thw") if key in inputs}
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, **images, use_cache=False, fastv_query_index=last_prompt_token,
        ).logits[:, -1]
        logits[:, model.generation_config.eos_token_id] = float("-inf")
        next_token = logits.argmax(dim=-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return input_ids


# ------------------------------------------------------------------------------------------------
# DyMU as its official code runs it at inference, one image at a time
# ------------------------------------------------------------------------------------------------


def _official_block_attention(layer, x, size):
    """One ToMEResidualAttentionBlock's attention half (DyMU's transformer.py): eager softmax over
    the physical sequence x [T, C], log(size) added to every key's logit from layer 1 on (size is
    None at layer 0). Returns (x after the residual add, metric = keys averaged over heads)."""
    attention = layer.self_attn
    heads, head_dim = attention.num_heads, attention.head_dim
    normed = layer.layer_norm1(x)
    q, k, v = (proj(normed).view(-1, heads, head_dim).transpose(0, 1) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    logits = q @ k.transpose(1, 2) * head_dim**-0.5
    if size is not None:
        logits = logits + size.log()[None, None, :]
    out = (logits.softmax(dim=-1) @ v).transpose(0, 1).reshape(x.shape[0], -1)
    return x + attention.out_proj(out), k.mean(dim=0)


def _official_merge(x, size, members, metric, threshold):
    """DyMU's bipartite_soft_matching(class_token=True, specified_threshold) + merge_wavg, batch 1.

    A = even positions of the current sequence, B = odd ones; CLS (position 0) never merges; every A
    token whose best cosine to a B token exceeds the threshold merges into that B token (first
    best in B order); the new sequence is [unmerged A tokens, then B tokens], each in its previous
    order. Nothing over the threshold: the sequence is returned as it was (DyMU's do_nothing)."""
    normed = metric / metric.norm(dim=-1, keepdim=True)
    a, b = list(range(0, x.shape[0], 2)), list(range(1, x.shape[0], 2))
    scores = normed[a] @ normed[b].T
    scores[0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    merged = [i for i in range(len(a)) if node_max[i] > threshold]
    if not merged:
        return x, size, members
    total_x, total_size = (x * size[:, None])[b].clone(), size[b].clone()
    new_members = [list(members[j]) for j in b]
    for i in merged:
        j = int(node_idx[i])
        total_x[j] += x[a[i]] * size[a[i]]
        total_size[j] += size[a[i]]
        new_members[j] += members[a[i]]
    kept = [a[i] for i in range(len(a)) if i not in set(merged)]
    x = torch.cat([x[kept], total_x / total_size[:, None]])
    size = torch.cat([size[kept], total_size])
    return x, size, [members[i] for i in kept] + new_members


@torch.no_grad()
def official_layer0_cutoff(model, batches: list[torch.Tensor], r: int) -> float:
    """DyMU's threshold finding at the first CLIP layer, where every image holds all its tokens: per
    batch, every image's A tokens (even positions but CLS) scored by their best cosine to a B token
    (odd positions), all images pooled; the batch's cutoff is the best score left unmerged when the
    top r x images merge, raised to 0 if below; the threshold is the mean over batches (float64)."""
    from hybrid_vlm.hf_compat.clip import vision_parts

    reference = copy.deepcopy(model).double()
    parts = vision_parts(reference)  # only to find the stock modules; the maths is all here
    cutoffs = []
    for pixel_values in batches:
        best = []
        for image in pixel_values.double():
            x = parts.pre_layernorm(parts.embeddings(image[None]))[0]
            _, metric = _official_block_attention(parts.layers[0], x, None)
            normed = metric / metric.norm(dim=-1, keepdim=True)
            scores = normed[0::2] @ normed[1::2].T
            best += scores.max(dim=-1).values[1:].tolist()  # CLS, A's first token, never merges
        ranked = sorted(best, reverse=True)
        cutoffs.append(max(ranked[r * pixel_values.shape[0]], 0.0))
    return sum(cutoffs) / len(cutoffs)


@torch.no_grad()
def official_dymu_partitions(model, pixel_values, thresholds) -> list[list[set[frozenset[int]]]]:
    """For each image of pixel_values [B, 3, H, W], run alone, the partition of the original tokens
    (CLS = 0, patches 1..P) after every CLIP layer LLaVA reads, as DyMU's official code merges them
    (in float64; +inf thresholds never merge). Returns [image][layer] -> set of frozensets."""
    from hybrid_vlm.hf_compat.clip import vision_parts

    reference = copy.deepcopy(model).double()
    parts = vision_parts(reference)  # only to find the stock modules; the maths is all here
    results = []
    for image in pixel_values.double():
        x = parts.pre_layernorm(parts.embeddings(image[None]))[0]
        size, members, partitions = None, [[t] for t in range(x.shape[0])], []
        for layer, threshold in zip(parts.layers, thresholds.tolist()):
            x, metric = _official_block_attention(layer, x, size)
            size = torch.ones(x.shape[0], dtype=x.dtype) if size is None else size
            if math.isfinite(threshold):
                x, size, members = _official_merge(x, size, members, metric, threshold)
            x = x + layer.mlp(layer.layer_norm2(x))
            partitions.append({frozenset(m) for m in members})
        results.append(partitions)
    return results


def official_get_rs(num_layers: int, r_total: int, r_schedule: str = "constant") -> list[int] | None:
    """DyMU's `ToMEOpenAITransformer._get_rs` (open_clip transformer.py), transcribed; None where
    the official loop would never end (it appends non-positive values forever for some linear
    cases), detected by a bound on its length."""
    if r_total == 0:
        return [0] * num_layers
    if r_schedule == "constant":
        base, remainder = divmod(r_total, num_layers)
        return [base + (1 if i < remainder else 0) for i in range(num_layers)]
    r0 = (2 * r_total) // num_layers
    step = r0 / num_layers
    s: list[int] = []
    while sum(s) + int(r0 - len(s) * step) < r_total:
        s.append(int(r0 - len(s) * step))
        if len(s) > 4 * num_layers + r_total:
            return None
    if sum(s) < r_total:
        s.append(r_total - sum(s))
    while len(s) < num_layers:
        s.append(0)
    if len(s) != num_layers or sum(s) != r_total:  # the official asserts
        return None
    return s if r_schedule == "linear" else s[::-1]
