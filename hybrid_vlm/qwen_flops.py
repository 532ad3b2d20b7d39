"""Theoretical MACs of Qwen2.5-VL's prefill: the windowed ViT, the PatchMerger and the LLM, per image.

The same conventions as `hybrid_vlm.flops` (multiply-accumulates of the matrix products; norms,
activations, RoPE and biases left out; causal attention counts the pairs a causal mask allows).
The ViT differs from CLIP in three ways that matter for the count:
- its tokens are patches of 2 frames x 14 x 14 pixels, h*w per image (no CLS);
- most blocks attend within 112 px windows (8 x 8 patches, smaller at the right and bottom
  edges), only `fullatt_block_indexes` over the whole image;
- its MLP is gated (three matrices), and the PatchMerger maps each 2 x 2 unit's 4 concatenated
  patches through two matrices to the LLM width.

Qwen/Qwen2.5-VL-7B-Instruct's shape below is written from its public config.json, which is not
readable offline here: ViT 1280 x 32 blocks, 16 heads, MLP 3420, full attention at 7/15/23/31;
LLM 3584 x 28 layers, 28 query and 4 KV heads, MLP 18944, vocabulary 152064.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .flops import LlamaShape, PrefillMacs, llm_prefill_macs, lm_head_macs


@dataclass(frozen=True)
class QwenVitShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    full_layers: tuple[int, ...]
    out_hidden: int
    window: int = 112  # pixels
    patch_size: int = 14
    merge: int = 2
    temporal_patch: int = 2
    channels: int = 3


@dataclass(frozen=True)
class QwenShape:
    llm: LlamaShape
    vit: QwenVitShape


QWEN25_VL_7B = QwenShape(
    llm=LlamaShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064),
    vit=QwenVitShape(hidden=1280, intermediate=3420, layers=32, heads=16, full_layers=(7, 15, 23, 31), out_hidden=3584),
)


def qwen_shape_from_config(config) -> QwenShape:
    text, vision = config.text_config, config.vision_config
    heads = text.num_attention_heads
    return QwenShape(
        llm=LlamaShape(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers, heads=heads,
                       kv_heads=text.num_key_value_heads, vocab=text.vocab_size),
        vit=QwenVitShape(hidden=vision.hidden_size, intermediate=vision.intermediate_size, layers=vision.depth, heads=vision.num_heads,
                         full_layers=tuple(vision.fullatt_block_indexes), out_hidden=vision.out_hidden_size, window=vision.window_size,
                         patch_size=vision.patch_size, merge=vision.spatial_merge_size, temporal_patch=vision.temporal_patch_size,
                         channels=vision.in_channels),
    )


def window_lengths(grid: tuple[int, int, int], shape: QwenVitShape) -> list[int]:
    """Patches in each attention window of an image of `grid` (t, h, w) patches: windows of
    `window // merge // patch_size` merge units a side (as transformers sizes them: 4 units, 8
    patches, at 112 px), cut at the right and bottom edges, one set per frame."""
    t, h, w = grid
    side = shape.merge * (shape.window // shape.merge // shape.patch_size)
    rows = [min(side, h - start) for start in range(0, h, side)]
    columns = [min(side, w - start) for start in range(0, w, side)]
    return [r * c for _ in range(t) for r in rows for c in columns]


def qwen_vit_macs(grid: tuple[int, int, int], shape: QwenVitShape) -> int:
    """The windowed ViT for one image, patch embedding included (the merger is `merger_macs`)."""
    t, h, w = grid
    n, d = t * h * w, shape.hidden
    embed = n * shape.channels * shape.temporal_patch * shape.patch_size**2 * d
    windowed = sum(length * length for length in window_lengths(grid, shape))
    full = t * (h * w) ** 2  # each frame attends within itself
    total = embed
    for layer in range(shape.layers):
        pairs = full if layer in shape.full_layers else windowed
        total += 4 * n * d * d + 2 * pairs * d + 3 * n * d * shape.intermediate
    return total


def merger_macs(grid: tuple[int, int, int], shape: QwenVitShape) -> int:
    units, width = math.prod(grid) // shape.merge**2, shape.hidden * shape.merge**2
    return units * (width * width + width * shape.out_hidden)


def qwen_prefill_macs(
    shape: QwenShape,
    grids: list[tuple[int, int, int]],  # this sample's images
    text_tokens: int,
    visual_kept: int | None = None,  # None: nothing pruned
    fastv_layer: int = 2,
    scoring: str | None = "row",
    lm_head_tokens: int = 1,
) -> PrefillMacs:
    """Prefill of one sample: vanilla, or FastV keeping `visual_kept` of its t*h*w/4 tokens per image, summed."""
    visual = sum(math.prod(grid) // shape.vit.merge**2 for grid in grids)
    kept = None if visual_kept is None else text_tokens + visual_kept
    return PrefillMacs(
        vision=sum(qwen_vit_macs(grid, shape.vit) for grid in grids),
        projector=sum(merger_macs(grid, shape.vit) for grid in grids),
        llm=llm_prefill_macs(shape.llm, text_tokens + visual, kept, fastv_layer=fastv_layer, scoring=scoring, lm_head_tokens=0),
        lm_head=lm_head_macs(shape.llm, lm_head_tokens),
    )


def qwen_method_prefill_macs(
    shape: QwenShape,
    config,  # HybridConfig
    grids: list[tuple[int, int, int]],  # this sample's images
    text_tokens: int,
    visual_entered: int | None = None,  # recorded: visual tokens entering LLM layer 0 (default: what the config implies)
    visual_kept: int | None = None,  # recorded: kept after FASTV_LAYER
    attention: str = "causal",
    lm_head_tokens: int = 1,
) -> PrefillMacs:
    """Prefill of one sample under a HybridConfig: nothing cut, FastV or random selection, a method
    before the LLM on each image's merged units (its scoring counted per image: DivPrune's cosine
    matrix over the units at the LLM width), or FastV after one. The tower and the merger always run
    whole. PyramidDrop's and DART's per-layer counts are refused (count them from their stages)."""
    from .config import visual_keep_count
    from .methods import VitDims, get_method
    from .qwen import unit_budget

    if config.staged_method is not None:
        raise ValueError(f"VISUAL_METHOD={config.staged_method}: its per-layer counts follow each image; not counted here")
    units = [math.prod(grid) // shape.vit.merge**2 for grid in grids]
    entered, selection = sum(units), 0
    if config.pre_llm_method is not None:
        method = get_method(config.pre_llm_method)
        counts = [unit_budget(config.visual_budget, n) for n in units]
        dims = [VitDims(n, shape.vit.hidden, shape.vit.heads, shape.llm.hidden) for n in units]
        selection = sum(method.scoring_macs(count, dim) for count, dim in zip(counts, dims))
        entered = sum(counts)  # pooling may keep fewer: pass what the run recorded
    entered = entered if visual_entered is None else visual_entered
    kept = None
    if config.fastv_k is not None:
        kept = text_tokens + (visual_keep_count(entered, config.fastv_k) if visual_kept is None else visual_kept)
    scoring = config.scoring if config.fastv_k is not None and config.fastv_select == "attention" else None
    return PrefillMacs(
        vision=sum(qwen_vit_macs(grid, shape.vit) for grid in grids),
        projector=sum(merger_macs(grid, shape.vit) for grid in grids),
        llm=llm_prefill_macs(shape.llm, text_tokens + entered, kept, fastv_layer=config.fastv_layer, attention=attention,
                             scoring=scoring, lm_head_tokens=0),
        lm_head=lm_head_macs(shape.llm, lm_head_tokens),
        selection=selection,
    )
