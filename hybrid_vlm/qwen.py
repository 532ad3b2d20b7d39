"""Qwen2.5-VL's phases for the shared decoder loop: image features per placeholder and the M-RoPE
position rule. Everything after them (placement, FastV's per-sample quotas, the cache groups,
decoding) is the loop every model shares (`hybrid_vlm.model`).

- Features: the stock vision tower (windowed ViT, PatchMerger) on all images of the batch at once,
  its grid-derived inputs precomputed on the host (`hf_compat.qwen2_5_vl`). Each image gives
  t*h*w/4 tokens, so samples hold different counts; a sample's features go last in its row and
  placement gives the others filler slots (as for LLaVA-NeXT).
- Positions: (t, h, w) ids from the host-known grids (`hybrid_vlm.mrope`), the same as stock
  `get_rope_index`. Kept tokens keep them through pruning; decoding continues at each sample's
  largest id + 1. Stock's mutable `rope_deltas` is neither read nor written.
"""

from __future__ import annotations

import torch

from .adapters import BATCH_ALIKE, EVEN_IMAGES, images_per_sample, left_padded, reads_pixel_hash
from .baselines import image_keys, slot_hash
from .hf_compat.qwen2_5_vl import host_grid, qwen_image_features
from .methods import Read, VisualReads, budget_tokens, get_method
from .methods.selection import place_selection
from .mrope import batch_tables, mrope_positions
from .placement import ImageSlots
from .runtime import host_to_device, require


def sample_grids(image_grid_thw, batch: int) -> list[list[tuple[int, int, int]]]:
    """Per sample, its images' (t, h, w) patch grids (images are split evenly over the prompts, in order)."""
    grids = host_grid(image_grid_thw)
    per_sample = images_per_sample(len(grids), batch)
    return [grids[b * per_sample : (b + 1) * per_sample] for b in range(batch)]


def qwen_image_layout(input_ids: torch.Tensor, images: dict) -> tuple[int, list[int]]:
    """(images per prompt, pixel_values rows per image): images split evenly over the prompts, each
    spanning t*h*w patch rows of the batch's one pixel_values block."""
    grids = host_grid(images["image_grid_thw"])
    return images_per_sample(len(grids), input_ids.shape[0]), [t * h * w for t, h, w in grids]


def merge_size(model) -> int:
    return model.config.vision_config.spatial_merge_size


def qwen_image_slots(model, pixel_values: torch.Tensor, image_grid_thw, batch: int) -> ImageSlots:
    """One merged 2x2-unit feature per image placeholder, per sample; counts from the host grid. A
    method before the LLM keeps its budget of each image's units in their slots (`reduce_units`);
    random selection gets its per-unit draw (`unit_random_scores`)."""
    if image_grid_thw is None:
        raise ValueError("Qwen2.5-VL needs image_grid_thw with pixel_values (the processor returns both)")
    config, unit = model.hybrid_config, merge_size(model) ** 2
    grids = [grid for sample in sample_grids(image_grid_thw, batch) for grid in sample]
    patches = sum(t * h * w for t, h, w in grids)
    if pixel_values.shape[0] != patches:  # shapes and the host grid: no sync
        raise ValueError(f"pixel_values holds {pixel_values.shape[0]} patch rows but image_grid_thw {grids} asks for {patches} "
                         "(t x h x w per image): pass the processor's pixel_values and image_grid_thw of the same images")
    units = [t * h * w // unit for t, h, w in grids]
    images = list(torch.split(qwen_image_features(model, pixel_values, grids), units))  # [units_i, hidden] each
    valid = kept = None
    if config.pre_llm_method is not None:
        images, valid, kept = reduce_units(images, grids, merge_size(model), get_method(config.pre_llm_method), config.visual_budget)
    per_sample = images_per_sample(len(grids), batch)

    def per_sample_rows(rows: list[torch.Tensor], value=0) -> torch.Tensor:
        return left_padded([torch.cat(rows[b * per_sample : (b + 1) * per_sample]) for b in range(batch)], value)

    def per_sample_sums(counts: list[int]) -> list[int]:
        return [sum(counts[b * per_sample : (b + 1) * per_sample]) for b in range(batch)]

    scores = unit_random_scores(pixel_values, grids, units, config.select_seed) if reads_pixel_hash(config) else None
    return ImageSlots(
        features=per_sample_rows(images),
        valid=None if valid is None else per_sample_rows(valid, value=False),
        placeholders=per_sample_sums(units),
        compact=valid is not None,
        valid_counts=None if kept is None else per_sample_sums(kept),
        scores=None if scores is None else per_sample_rows(scores),
        images_per_sample=per_sample,
        image_tokens=[(units if kept is None else kept)[b * per_sample : (b + 1) * per_sample] for b in range(batch)],
    )


def unit_grid(grid: tuple[int, int, int], merge: int) -> tuple[int, int]:
    """(rows, cols) of an image's merged units in placeholder (raster) order; frames stack as rows."""
    t, h, w = grid
    return t * h // merge, w // merge


def unit_budget(budget: int | float, units: int) -> int:
    """Tokens an image of `units` merged units keeps before the LLM: the budget's count, capped at its units."""
    return min(budget_tokens(budget, units), units)


def reduce_units(images: list[torch.Tensor], grids, merge: int, method, budget: int | float):
    """A method before the LLM on each image's merged units (the PatchMerger's output, which is what
    the LLM reads): ([units_i, hidden] with the kept tokens at their units' slots, [units_i] valid,
    tokens kept) per image. A count keeps at most that many per image (capped at its units), a
    fraction that share of them; pooling may keep fewer (`baselines.grid_pool_shape`)."""
    placed, valid, kept = [], [], []
    for features, grid in zip(images, grids):
        count = unit_budget(budget, features.shape[0])
        reads = VisualReads(projected=features[None], grid=unit_grid(grid, merge))
        selection = method.select(reads, count)
        tokens, slot_valid = place_selection(selection, features.shape[0], selection.kept.shape[1], reads.projected)
        placed.append(tokens[0])
        valid.append(slot_valid[0])
        kept.append(selection.kept.shape[1])
    return placed, valid, kept


def unit_random_scores(pixel_values: torch.Tensor, grids, units: list[int], seed: int) -> list[torch.Tensor]:
    """Random selection's draw per merged unit ([units_i] per image), keyed on each image's own
    pixel rows (`baselines.image_keys` over its t*h*w patches as given) and the unit's slot."""
    rows = torch.split(pixel_values, [t * h * w for t, h, w in grids])
    return [slot_hash(image_keys(image[None]), count, seed)[0] for image, count in zip(rows, units)]


def qwen_prompt_positions(model, input_ids: torch.Tensor, new_valid: torch.Tensor, image_grid_thw) -> torch.Tensor:
    """[B, L, 3] M-RoPE ids of a prompt with images, equal to stock's for every real token."""
    grids = sample_grids(image_grid_thw, input_ids.shape[0])
    offsets, steps, counts = batch_tables(grids, merge_size(model))
    is_image = input_ids == model.config.image_token_id
    expected = host_to_device(torch.tensor(counts), is_image.device)
    require((is_image.sum(dim=1) == expected).all(), lambda: (
        f"each prompt must hold the image placeholders of its images (t*h*w/4 per image from image_grid_thw: {counts}; "
        f"{EVEN_IMAGES}); found {is_image.sum(dim=1).tolist()}. Build prompts with the model's processor and one image "
        f"entry per image, and {BATCH_ALIKE}."))
    device = input_ids.device
    return mrope_positions(is_image, new_valid, host_to_device(offsets, device), host_to_device(steps, device))


# What the Qwen2.5-VL adapter can give a method before the LLM: the merged units (PatchMerger's
# output). Its windowed ViT has no [CLS] token and no single read layer of CLIP features or keys.
QWEN_PRE_LLM_READS = frozenset({Read.PROJECTED_FEATURES})


def check_qwen_supported(model, config) -> None:
    """Refuse settings the engine does not implement for Qwen2.5-VL, before any forward."""
    check_qwen_settings(config)


def check_qwen_settings(config) -> None:
    """What `check_qwen_supported` refuses, from the settings alone (the plugin asks before loading)."""
    if config.dymu is not None:
        raise ValueError("DYMU_THRESHOLDS is not implemented for Qwen2.5-VL: DyMU merges CLIP patches, and Qwen's windowed "
                         "ViT needs whole 2x2 merge units")
    missing = [] if config.pre_llm_method is None else [r for r in get_method(config.pre_llm_method).reads if r not in QWEN_PRE_LLM_READS]
    if missing:
        raise ValueError(f"VISUAL_METHOD={config.visual_method} is not available for Qwen2.5-VL: it reads "
                         f"{', '.join(r.value for r in missing)}, which Qwen2.5-VL's windowed ViT does not give (it has no [CLS] "
                         "token); a method before the LLM there reads the projected (merged) units only")
    if config.visual_pool is not None:
        raise ValueError("VISUAL_POOL is LLaVA-1.5's s x s blocks of its 24 x 24 grid: on Qwen2.5-VL use VISUAL_METHOD=pool "
                         "with VISUAL_BUDGET (a count or a fraction of each image's merged units)")
    if config.staged_method == "sparsevlm":
        raise NotImplementedError("VISUAL_METHOD=sparsevlm is not implemented for Qwen2.5-VL yet: its recycled clusters assume "
                                  "one visual count for every sample; fastv, random, divprune, pool, pdrop and dart run")
    if config.position_mode != "logical":
        raise ValueError(f"HYBRID_POSITIONS={config.position_mode} (position_mode) is not implemented for Qwen2.5-VL: its kept tokens keep their "
                         "original (t, h, w) ids (HYBRID_POSITIONS=logical, the default)")
