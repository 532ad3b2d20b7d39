"""Model adapters: what differs between LLaVA-1.5 and LLaVA-NeXT before LLM layer 0.

An adapter turns a forward's pixels into `ImageSlots` (one feature per image placeholder, in prompt
order). Everything after that (placement, the position rule, the decoder loop, FastV) is shared and
lives in `hybrid_vlm.placement` and `hybrid_vlm.model`; the methods that act in the ViT (DyMU) or
before layer 0 (pooling) run here, because their output is laid out the model's way.

- LLaVA-1.5: 576 placeholders per image, features straight from the tower (or merged, or pooled).
- LLaVA-NeXT: a base image plus anyres crops, unpadded and packed with a newline per row
  (`hf_compat.llava_next`); the placeholder count differs per image. With DyMU every crop merges on
  its own, and tokens are re-placed on the unpadded grid (`dymu.place_on_cropped_grid`) so every
  patch that reaches the LLM is covered by exactly one token, at a patch it covers. Newline tokens
  are never merged. Random selection draws per packed token from a hash of the base crop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .baselines import image_keys, pool_grid, pooled_token_count, random_slot_scores, slot_hash
from .dymu import place_on_cropped_grid
from .flops import AnyresImage
from .hf_compat import dymu_image_features, stock_image_features
from .hf_compat.clip import project_features, vision_parts, vision_reads
from .hf_compat.llava import rope_reads_positions_on_host
from .hf_compat.llava_next import (
    NEWLINE,
    AnyresLayout,
    LlavaNextForConditionalGeneration,
    anyres_layouts,
    crop_features,
    crop_pixels,
    image_newline,
)
from .methods import Method, Read, Selection, VisualReads, check_budget, get_method, group_count
from .methods.selection import place_selection
from .placement import ImageSlots
from .runtime import host_to_device


def grid_patches(model) -> int:
    """Patches of the CLIP grid of one image (576 for LLaVA-1.5 at 336 px)."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


# The batching rule every adapter shares, as refusals state it
EVEN_IMAGES = "the images are split evenly over the prompts: every prompt of a batch must hold the same number of images"
BATCH_ALIKE = "batch only prompts with as many images (not text-only and image prompts together)"


def images_per_sample(num_images: int, batch: int) -> int:
    if num_images % batch:
        raise ValueError(f"{num_images} images for {batch} prompts: every prompt needs the same number of images")
    return num_images // batch


def llava_image_layout(input_ids: torch.Tensor, images: dict) -> tuple[int, list[int]]:
    """(images per prompt, pixel_values rows per image) of LLaVA-1.5's and LLaVA-NeXT's inputs: one
    row per image, split evenly over the prompts, in order."""
    num_images = images["pixel_values"].shape[0]
    return images_per_sample(num_images, input_ids.shape[0]), [1] * num_images


def thresholds_on(model, device: torch.device) -> torch.Tensor:
    """The DyMU thresholds [merging layers] on `device`, copied there once and kept: a model moved
    after `apply_hybrid` would otherwise copy them from host memory, and wait for it, every prompt."""
    if model.hybrid_thresholds.device != device:
        model.hybrid_thresholds = model.hybrid_thresholds.to(device)
    return model.hybrid_thresholds


def llava_image_slots(model, pixel_values: torch.Tensor, image_sizes, batch: int) -> ImageSlots:
    """LLaVA-1.5: [images, 576] features per image, merged (DyMU) or pooled when asked."""
    config = model.hybrid_config
    pixels = pixel_values.to(model.dtype)
    per_sample = images_per_sample(pixel_values.shape[0], batch)
    valid, valid_count = None, None
    if config.dymu is not None:
        merged = dymu_image_features(model, pixels, thresholds_on(model, pixels.device), split=config.dymu_split)
        features, valid = merged.features, merged.valid
    elif config.pre_llm_method is not None:
        method = get_method(config.pre_llm_method)
        budget = check_budget(method, config.visual_budget, grid_patches(model))
        features, valid = reduce_before_llm(model, pixels, method, budget)
        valid_count = budget * per_sample
    else:
        features = stock_image_features(model, pixels)
        if config.visual_pool is not None:
            valid_count = pooled_token_count(features.shape[1], config.visual_pool) * per_sample
            features, valid = pool_grid(features, config.visual_pool)
    tokens = features.shape[1]
    image_tokens = None if config.dymu is not None else [[tokens if valid_count is None else valid_count // per_sample] * per_sample] * batch
    # the random draw hashes the pixels as given (before the cast), as documented in `baselines`
    scores = random_slot_scores(pixel_values, per_sample, tokens, config.select_seed) if reads_pixel_hash(config) else None
    return ImageSlots(
        features=features.reshape(batch, per_sample * tokens, -1),
        valid=None if valid is None else valid.reshape(batch, per_sample * tokens),
        compact=valid is not None,
        valid_counts=None if valid_count is None else [valid_count] * batch,
        scores=scores,
        images_per_sample=per_sample,
        image_tokens=image_tokens,
    )


VIT_READS = (Read.VIT_FEATURES, Read.VIT_CLS_ATTENTION, Read.VIT_KEYS)


def reads_pixel_hash(config) -> bool:
    """The method pruning inside the LLM scores slots from the pixels (random selection), which the
    adapter computes, rather than from an attention row, which the decoder loop does."""
    return config.llm_method is not None and Read.PIXELS in get_method(config.llm_method).reads


def method_reads(model, pixels: torch.Tensor, method: Method, projected: Callable[[], torch.Tensor]) -> VisualReads:
    """Compute only what `method` declares: the CLIP read layer (with its CLS row and keys only
    when asked) and/or the projected features (`projected()`, the model's own), per image or crop
    in patch order."""
    reads = VisualReads()
    if any(read in method.reads for read in VIT_READS):
        vision = vision_reads(model, pixels, attention=Read.VIT_CLS_ATTENTION in method.reads or Read.VIT_KEYS in method.reads)
        reads.vit_features, reads.cls_attention, reads.vit_keys = vision.features, vision.cls_attention, vision.keys
    if Read.PROJECTED_FEATURES in method.reads:
        reads.projected = projected()
    return reads


def select_and_place(model, reads: VisualReads, method: Method, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, P, hidden] with the kept tokens at their slots, valid [N, P]) from `reads` over P
    slots. Tokens chosen in CLIP space are projected after the selection, so the projector runs
    only on them."""
    selection = method.select(reads, budget)
    patches = (reads.projected if reads.projected is not None else reads.vit_features).shape[1]
    if not method.selects_projected:
        tokens = selection.features
        if tokens is None:
            tokens = reads.vit_features.gather(1, selection.kept[..., None].expand(-1, -1, reads.vit_features.shape[-1]))
        selection = Selection(selection.kept, project_features(model, tokens), selection.sizes)
    return place_selection(selection, patches, budget, reads.projected)


def reduce_before_llm(model, pixels: torch.Tensor, method: Method, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A method acting before the LLM on LLaVA-1.5's patch grid: (features [N, P, hidden], valid [N, P])."""
    reads = method_reads(model, pixels, method, lambda: stock_image_features(model, pixels))
    return select_and_place(model, reads, method, budget)


def packed_reads(reads: VisualReads, at: torch.Tensor) -> VisualReads:
    """Per-crop reads [crops, P, ...] -> one image's reads at its packed patch tokens [1, V_patches, ...]."""
    def gather(tensor):
        return None if tensor is None else tensor.flatten(0, 1).index_select(0, at)[None]

    return VisualReads(gather(reads.vit_features), gather(reads.cls_attention), gather(reads.vit_keys), gather(reads.projected))


def selection_groups(layout: AnyresLayout, patches: int, per_crop: bool) -> list[torch.Tensor]:
    """The packed positions (host) each selection of one image runs over: its patch tokens (no
    newline: they carry no CLIP signal), all together or one group per crop with any left after
    unpadding (an image of about 50:1 unpads a crop to nothing)."""
    is_patch = layout.source != NEWLINE
    if not per_crop:
        return [torch.nonzero(is_patch).flatten()]
    crop_of = torch.where(is_patch, layout.source // patches, -1)
    groups = [torch.nonzero(crop_of == crop).flatten() for crop in range(layout.num_crops)]
    return [group for group in groups if len(group)]


def anyres_image(layout: AnyresLayout, patches: int) -> AnyresImage:
    """What the MACs model (`flops.next_method_prefill_macs`) needs of one LLaVA-NeXT image: the patch
    tokens unpadding leaves in each crop (the groups `selection_groups` forms) and its packed count."""
    crop_of = layout.source[layout.source != NEWLINE] // patches
    return AnyresImage(tuple(torch.bincount(crop_of, minlength=layout.num_crops).tolist()), layout.num_tokens)


def anyres_images(model, image_sizes) -> list[AnyresImage]:
    """`anyres_image` of each image, from the host's image sizes."""
    patches = grid_patches(model)
    return [anyres_image(layout, patches) for layout in anyres_layouts(model, image_sizes)]


def next_reduce_before_llm(model, crops: torch.Tensor, layouts: list[AnyresLayout], method: Method, budget: int):
    """A method before the LLM on LLaVA-NeXT: per image, the crops' reads mapped to its packed
    patch tokens (the base image, then the unpadded grid; newlines carry no CLIP signal and are
    dropped), one selection of `budget` tokens over them (a count, or a fraction of its patch tokens;
    with VISUAL_BUDGET_SCOPE=crop, one per crop over that crop's tokens), placed back on the packed
    layout. Returns ([V_i, hidden] features, [V_i] valid, tokens kept) per image."""
    reads = method_reads(model, crops, method, lambda: crop_features(model, crops))
    patches = (reads.projected if reads.projected is not None else reads.vit_features).shape[1]
    per_crop = model.hybrid_config.budget_scope == "crop"
    packed, valid, counts, start = [], [], [], 0
    for index, layout in enumerate(layouts):
        groups = selection_groups(layout, patches, per_crop)
        group_counts = [group_count(budget, len(group), per_crop, method, index) for group in groups]
        tokens, kept = [], []
        for group, count in zip(groups, group_counts):
            at = host_to_device(layout.source[group] + start * patches, crops.device)
            group_tokens, group_kept = select_and_place(model, packed_reads(reads, at), method, count)  # [1, len(group), hidden], [1, len(group)]
            tokens.append(group_tokens[0])
            kept.append(group_kept[0])
        tokens, positions = torch.cat(tokens), host_to_device(torch.cat(groups), crops.device)
        packed.append(tokens.new_zeros(layout.num_tokens, tokens.shape[-1]).index_copy(0, positions, tokens))
        valid.append(torch.zeros(layout.num_tokens, dtype=torch.bool, device=crops.device).index_copy(0, positions, torch.cat(kept)))
        counts.append(sum(group_counts))
        start += layout.num_crops
    return packed, valid, counts


def pack_image(
    layout: AnyresLayout,
    features: torch.Tensor,  # [crops, P, hidden] this image's crop features
    newline: torch.Tensor,  # [hidden]
    merged_valid: torch.Tensor | None,  # [crops, P] DyMU: slot holds a token
    coverage: torch.Tensor | None,  # [crops, P] DyMU: the patch whose slot holds each patch's token
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed features [V, hidden], valid [V]) in the prompt's order for one image. The index maps
    are built on the host (the layout lives there) and copied without a sync."""
    patches, device = features.shape[1], features.device
    is_newline = layout.source == NEWLINE  # host
    slot = host_to_device(layout.source.clamp_min(0), device)
    valid = torch.ones(layout.num_tokens, dtype=torch.bool, device=device)
    if merged_valid is not None:
        grid_at = patches + torch.nonzero(~is_newline[patches:]).flatten()  # host: grid patches in raster order
        if len(grid_at):  # an image of about 50:1 or more unpads its crop grid to no patch at all
            grid_at, grid_source = host_to_device(grid_at, device), host_to_device(layout.source[grid_at], device)
            grid_slot, grid_valid = place_on_cropped_grid(coverage, grid_source, layout.grid_width)
            slot = slot.scatter(0, grid_at, grid_slot)
            valid = valid.scatter(0, grid_at, grid_valid)
        valid = valid.scatter(0, torch.arange(patches, device=device), merged_valid[0])
    packed = features.reshape(-1, features.shape[-1]).index_select(0, slot)
    packed = torch.where(host_to_device(is_newline, device)[:, None], newline.to(packed.dtype), packed)
    return packed, valid


def next_crop_features(model, crops: torch.Tensor):
    """(features [crops, P, hidden], merged valid [crops, P] or None, coverage [crops, P] or None):
    every crop through the tower, merging with DyMU's thresholds when they are set."""
    config = model.hybrid_config
    if config.dymu is None:
        return crop_features(model, crops), None, None
    merged = dymu_image_features(model, crops, thresholds_on(model, crops.device), split=config.dymu_split)
    return merged.features, merged.valid, merged.coverage


def left_padded(rows: list[torch.Tensor], value=0) -> torch.Tensor:
    """[B, max length, ...] with each row's entries last: a sample's fillers come first."""
    most = max(len(row) for row in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, 0) * (r.dim() - 1) + (most - len(r), 0), value=value) for r in rows])


def llava_next_image_slots(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None, batch: int) -> ImageSlots:
    """LLaVA-NeXT: packed anyres features per image (base, unpadded crop grid, newlines)."""
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values (the processor returns both)")
    layouts = anyres_layouts(model, image_sizes)
    per_sample = images_per_sample(len(layouts), batch)
    crops = crop_pixels(pixel_values, layouts)  # as given: the random draw hashes them before the cast
    config = model.hybrid_config
    if config.pre_llm_method is not None:
        packed, valid, kept = next_reduce_before_llm(model, crops.to(model.dtype), layouts, get_method(config.pre_llm_method), config.visual_budget)
        compact, valid_counts = True, [sum(kept[b * per_sample : (b + 1) * per_sample]) for b in range(batch)]
    else:
        packed, valid, compact = next_packed_images(model, crops.to(model.dtype), layouts)
        valid_counts = None
        kept = None if config.dymu is not None else [layout.num_tokens for layout in layouts]
    device = packed[0].device
    sample_images = [slice(b * per_sample, (b + 1) * per_sample) for b in range(batch)]
    samples = [torch.cat(packed[images]) for images in sample_images]
    keep_newlines = model.hybrid_config.fastv_newlines == "keep"
    newlines = [torch.cat([layout.source == NEWLINE for layout in layouts[images]]) for images in sample_images]  # host
    return ImageSlots(
        features=left_padded(samples),
        valid=left_padded([torch.cat(valid[images]) for images in sample_images], value=False),
        placeholders=[len(sample) for sample in samples],
        compact=compact,
        valid_counts=valid_counts,
        protected=host_to_device(left_padded(newlines, value=False), device) if keep_newlines else None,
        protected_counts=[int(rows.sum()) for rows in newlines] if keep_newlines else None,
        scores=left_padded(next_random_scores(model, crops, layouts, sample_images)) if reads_pixel_hash(model.hybrid_config) else None,
        images_per_sample=per_sample,
        image_tokens=None if kept is None else [kept[images] for images in sample_images],
    )


def next_packed_images(model, crops: torch.Tensor, layouts: list[AnyresLayout]):
    """([V_i, hidden] packed features, [V_i] valid) per image, merged by DyMU when asked; and
    whether empty slots need compaction (DyMU)."""
    features, merged_valid, coverage = next_crop_features(model, crops)
    packed, valid, start = [], [], 0
    for layout in layouts:
        crop_slice = slice(start, start + layout.num_crops)
        merge_rows = (None if t is None else t[crop_slice] for t in (merged_valid, coverage))
        image_features, image_valid = pack_image(layout, features[crop_slice], image_newline(model), *merge_rows)
        packed.append(image_features)
        valid.append(image_valid)
        start = crop_slice.stop
    return packed, valid, merged_valid is not None


def next_random_scores(model, crops: torch.Tensor, layouts: list[AnyresLayout], sample_images: list[slice]) -> list[torch.Tensor]:
    """FASTV_SELECT=random on LLaVA-NeXT: per image, the baselines' hash keyed on its base crop's
    pixels, one draw per packed token (newlines included, as FastV's candidates); [V_b] per sample."""
    base_index = torch.tensor([0] + [layout.num_crops for layout in layouts[:-1]]).cumsum(0)
    keys = image_keys(crops[host_to_device(base_index, crops.device)])  # [images]
    seed = model.hybrid_config.select_seed
    per_image = [slot_hash(keys[i : i + 1], layout.num_tokens, seed)[0] for i, layout in enumerate(layouts)]
    return [torch.cat(per_image[images]) for images in sample_images]


# Decoder layers the engine drives (`hf_compat.llama_layer_forward`): pre-norm, q/k/v/o attention
# with RoPE, a gated MLP. Mistral's layer is Llama's plus an optional sliding window.
SUPPORTED_TEXT_MODELS = ("llama", "mistral")


def check_supported(model, config) -> None:
    """Refuse models and settings the engine does not implement, before any forward."""
    text_type = getattr(model.config.text_config, "model_type", None)
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise TypeError(
            f"hybrid_vlm drives {' and '.join(SUPPORTED_TEXT_MODELS)} decoder layers; this model's LLM is {text_type!r}"
        )
    layers = getattr(model.config, "vision_feature_layer", -2)
    if not isinstance(layers, int):  # stock concatenates the listed layers; the engine and the MACs model read one
        raise NotImplementedError(f"hybrid_vlm reads one CLIP layer (vision_feature_layer=-2 in the llava-hf checkpoints); "
                                  f"this model's config lists {layers!r}")
    if rope_reads_positions_on_host(model):
        warnings.warn("this LLM's RoPE is transformers' dynamic scaling, which reads the largest position id on the host "
                      "at every rotary call: the forward is exact but not free of host syncs", stacklevel=3)
    if isinstance(model, LlavaNextForConditionalGeneration):
        check_next_settings(model, config)
    elif config.budget_scope == "crop":
        raise ValueError("VISUAL_BUDGET_SCOPE=crop counts VISUAL_BUDGET in each LLaVA-NeXT anyres crop; this model sees one grid "
                         "per image, where it is the same as the default: unset it")
    elif config.pre_llm_method is not None:
        check_budget(get_method(config.pre_llm_method), config.visual_budget, grid_patches(model))
    if config.pre_llm_method is not None and any(read in VIT_READS for read in get_method(config.pre_llm_method).reads):
        vision_parts(model, user=f"VISUAL_METHOD={config.pre_llm_method}")  # a tower layout it cannot read: refused now, not at the forward


def check_next_settings(model, config) -> None:
    """What LLaVA-NeXT cannot run: SparseVLM, pooling, kept newlines after a method that drops or
    ranks them; a per-crop count above one crop's patches."""
    # PyramidDrop and DART run on the whole packed span, newlines among the candidates, as both
    # official codes do on NeXT; SparseVLM's official code is LLaVA-1.5's only.
    if config.staged_method == "sparsevlm":
        raise NotImplementedError("VISUAL_METHOD=sparsevlm is not implemented for LLaVA-NeXT: the official code runs "
                                  "LLaVA-1.5's 576-token span only")
    if config.staged_method is not None and config.fastv_newlines == "keep":
        raise ValueError(f"FASTV_NEWLINES=keep is FastV's: VISUAL_METHOD={config.staged_method} ranks LLaVA-NeXT's "
                         "newline tokens with the image tokens, as its official code does")
    if config.visual_pool is not None:
        raise ValueError("VISUAL_POOL is not implemented for LLaVA-NeXT yet (its crop grid is not 24 x 24 after unpadding)")
    if config.visual_method == "pool":
        raise ValueError("VISUAL_METHOD=pool is not implemented for LLaVA-NeXT yet (its crop grid is not 24 x 24 after unpadding)")
    if config.pre_llm_method is not None and config.fastv_newlines == "keep":
        raise ValueError(f"FASTV_NEWLINES=keep cannot follow VISUAL_METHOD={config.visual_method}: the methods before the LLM "
                         "drop LLaVA-NeXT's newline tokens (they carry no CLIP signal), so none are left to keep")
    patches = grid_patches(model)
    if config.budget_scope == "crop" and isinstance(config.visual_budget, int) and config.visual_budget > patches:
        raise ValueError(f"VISUAL_BUDGET={config.visual_budget} with VISUAL_BUDGET_SCOPE=crop asks for more than a crop's {patches} "
                         f"patches: use 1..{patches} tokens per crop, or a fraction in (0, 1)")


def check_sliding_window(model, sequence_length: int) -> None:
    """Mistral's sliding window: the engine attends to every earlier key, which equals the window only
    while the sequence as written fits in it (a host-known length: no sync)."""
    window = getattr(model.config.text_config, "sliding_window", None)
    if window is not None and sequence_length > window:
        raise NotImplementedError(
            f"this LLM attends within a sliding window of {window} tokens and the sequence is {sequence_length} tokens: "
            "hybrid_vlm does not implement windowed attention (every sequence up to the window length is exact)"
        )
