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

from .adapters import images_per_sample, left_padded
from .hf_compat.qwen2_5_vl import host_grid, qwen_image_features
from .mrope import batch_tables, mrope_positions
from .placement import ImageSlots
from .runtime import host_to_device, require


def sample_grids(image_grid_thw, batch: int) -> list[list[tuple[int, int, int]]]:
    """Per sample, its images' (t, h, w) patch grids (images are split evenly over the prompts, in order)."""
    grids = host_grid(image_grid_thw)
    per_sample = images_per_sample(len(grids), batch)
    return [grids[b * per_sample : (b + 1) * per_sample] for b in range(batch)]


def merge_size(model) -> int:
    return model.config.vision_config.spatial_merge_size


def qwen_image_slots(model, pixel_values: torch.Tensor, image_grid_thw, batch: int) -> ImageSlots:
    """One merged 2x2-unit feature per image placeholder, per sample; counts from the host grid."""
    if image_grid_thw is None:
        raise ValueError("Qwen2.5-VL needs image_grid_thw with pixel_values (the processor returns both)")
    grids = sample_grids(image_grid_thw, batch)
    unit = merge_size(model) ** 2
    counts = [sum(t * h * w for t, h, w in sample) // unit for sample in grids]
    features = qwen_image_features(model, pixel_values, [grid for sample in grids for grid in sample])  # [sum counts, hidden]
    samples = torch.split(features, counts)
    return ImageSlots(features=left_padded(list(samples)), placeholders=counts)


def qwen_prompt_positions(model, input_ids: torch.Tensor, new_valid: torch.Tensor, image_grid_thw) -> torch.Tensor:
    """[B, L, 3] M-RoPE ids of a prompt with images, equal to stock's for every real token."""
    grids = sample_grids(image_grid_thw, input_ids.shape[0])
    offsets, steps, counts = batch_tables(grids, merge_size(model))
    is_image = input_ids == model.config.image_token_id
    expected = host_to_device(torch.tensor(counts), is_image.device)
    require((is_image.sum(dim=1) == expected).all(), lambda: (
        f"each prompt must hold the image placeholders of its images (t*h*w/4 per image from image_grid_thw: {counts}); "
        f"found {is_image.sum(dim=1).tolist()}. Build prompts with the model's processor and one image entry per image."))
    device = input_ids.device
    return mrope_positions(is_image, new_valid, host_to_device(offsets, device), host_to_device(steps, device))


NEEDS_CLS = ("visionzip", "vispruner")  # methods that read the CLIP [CLS] row


def check_qwen_supported(model, config) -> None:
    """Refuse settings the engine does not implement for Qwen2.5-VL, before any forward."""
    check_qwen_settings(config)


def check_qwen_settings(config) -> None:
    """What `check_qwen_supported` refuses, from the settings alone (the plugin asks before loading)."""
    if config.dymu is not None:
        raise ValueError("DYMU_THRESHOLDS is not implemented for Qwen2.5-VL: DyMU merges CLIP patches, and Qwen's windowed "
                         "ViT needs whole 2x2 merge units (see ../shared/notes/qwen_video.md A3)")
    if config.visual_method in NEEDS_CLS:
        raise ValueError(f"VISUAL_METHOD={config.visual_method} is not available for Qwen2.5-VL: it ranks patches by the "
                         "[CLS] token's attention, and Qwen2.5-VL's ViT has no [CLS] token")
    if config.visual_pool is not None or config.visual_method is not None:
        what = "VISUAL_POOL" if config.visual_pool is not None else f"VISUAL_METHOD={config.visual_method}"
        raise NotImplementedError(f"{what} is not implemented for Qwen2.5-VL yet: FastV (FASTV_K, FASTV_LAYER) is")
    if config.position_mode != "logical":
        raise ValueError(f"POSITION_MODE={config.position_mode} is not implemented for Qwen2.5-VL: its kept tokens keep their "
                         "original (t, h, w) ids (POSITION_MODE=logical)")
    if config.fastv_select != "attention":
        raise NotImplementedError(f"FASTV_SELECT={config.fastv_select} is not implemented for Qwen2.5-VL yet: use attention")
