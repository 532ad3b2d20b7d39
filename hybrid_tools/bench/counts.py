"""Token counts a configuration ran with, read off its outputs, and the theoretical MACs and KV
bytes of those very counts (`hybrid_vlm.flops`, `hybrid_vlm.qwen_flops`)."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

import torch

from hybrid_vlm import HybridConfig, flops
from hybrid_vlm.adapters import anyres_image, grid_patches
from hybrid_vlm.dymu import threshold_merge_mask
from hybrid_vlm.hf_compat import output_cache
from hybrid_vlm.hf_compat.clip import merging_vision_forward
from hybrid_vlm.hf_compat.llava_next import anyres_layouts, crop_pixels
from hybrid_vlm.qwen_flops import QwenShape, qwen_method_prefill_macs

from ..presets import bench_shape
from .configs import BenchConfig
from .output import median

if TYPE_CHECKING:
    from .session import BenchRun


def token_counts(model, inputs, output, config: BenchConfig) -> dict:
    """Per-sample tokens (lists over the batch): text, visual entering the LLM (after DyMU), visual
    kept after FastV, and with DyMU the CLIP tokens leaving each merging layer (None otherwise)."""
    image_id = model.config.image_token_id
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    text = ((ids != image_id) & mask).sum(dim=1).tolist()
    visual = ((ids == image_id) & mask).sum(dim=1).tolist()
    state = getattr(output_cache(output), "hybrid_state", None)
    if state is not None:
        visual = [e - t for e, t in zip(state.prompt_tokens.tolist(), text)]
        visual_kept = [k - t for k, t in zip(state.prompt_tokens_kept.tolist(), text)]
    else:
        visual_kept = list(visual)
    crops, crop_patches, packed = [1] * len(text), None, None
    pixel_values = inputs["pixel_values"]
    if "image_sizes" in inputs:  # LLaVA-NeXT: the tower sees every crop; one image per sample
        layouts = anyres_layouts(model, inputs["image_sizes"])
        crops = [layout.num_crops for layout in layouts]
        pixel_values = crop_pixels(pixel_values, layouts)
        images = [anyres_image(layout, grid_patches(model)) for layout in layouts]  # the layouts computed once
        crop_patches, packed = [list(image.crop_patches) for image in images], [image.tokens for image in images]
    grids = None
    if "image_grid_thw" in inputs:  # Qwen2.5-VL: each sample's image grids
        per_sample = len(inputs["image_grid_thw"]) // len(text)
        grids = [[tuple(g) for g in inputs["image_grid_thw"][b * per_sample : (b + 1) * per_sample].tolist()] for b in range(len(text))]
    vit_counts = vit_counts_error = None
    if config.hybrid is not None and config.hybrid.dymu is not None:
        try:  # a re-run that fails costs the row its merged vision MACs, not its timings: the note says why
            vit_counts = dymu_layer_counts(model, pixel_values)
        except Exception as error:  # noqa: BLE001 - named in the row's note, whatever it is
            vit_counts_error = f"{type(error).__name__}: {str(error)[:160]}"
        if vit_counts is not None and "image_sizes" in inputs:  # one per-layer list per crop, grouped per sample
            starts = [sum(crops[:i]) for i in range(len(crops))]
            vit_counts = [vit_counts[start : start + n] for start, n in zip(starts, crops)]
    return dict(text=text, visual=visual, visual_kept=visual_kept, vit_counts=vit_counts, vit_counts_error=vit_counts_error, crops=crops,
                crop_patches=crop_patches, packed=packed, grids=grids)


def dymu_layer_counts(model, pixel_values) -> list[list[int]]:
    """CLIP tokens (CLS included) leaving each merging layer, per image, from an untimed re-run of the
    engine's merging loop with the model's thresholds."""
    thresholds = model.hybrid_thresholds
    counts = []

    def select(index, node_max, state):
        if index > 0:
            counts.append(state.counts())  # after layer index - 1's merge: its MLP ran at this count
        return threshold_merge_mask(node_max, thresholds[index].to(node_max.device))

    _, state, _ = merging_vision_forward(model, pixel_values.to(model.dtype), select, split=model.hybrid_config.dymu_split)
    counts.append(state.counts())
    return torch.stack(counts, dim=1).tolist()


def theory(shape, counts: dict, config: BenchConfig, decode_tokens: int, batch: int, bytes_per_element: int) -> dict:
    """Theoretical MACs (summed over the batch) and KV-cache size for the measured token counts."""

    hybrid = config.hybrid
    fastv_layer = hybrid.fastv_layer if hybrid is not None else 2
    # random selection reads no attention: no scoring counted, as the plugin's per-row GMACs
    scoring = hybrid.scoring if hybrid is not None and hybrid.fastv_select == "attention" else None
    totals = dict(vision=0, llm=0, prefill=0, decode=0.0, kv=0, kv_prompt=0)
    # Not modelled, as the plugin leaves them: a staged method's per-layer counts on Qwen2.5-VL (they
    # follow each image)
    if hybrid is not None and isinstance(shape, QwenShape) and hybrid.staged_method is not None:
        return {key: math.nan for key in totals}
    dymu = hybrid is not None and hybrid.dymu is not None
    for i in range(len(counts["text"])):
        text, visual, kept = counts["text"][i], counts["visual"][i], counts["visual_kept"][i]
        vit_counts = counts["vit_counts"][i] if counts["vit_counts"] is not None else None
        anyres = None if counts.get("crop_patches") is None else [flops.AnyresImage(tuple(counts["crop_patches"][i]), counts["packed"][i])]
        if isinstance(shape, QwenShape):  # the counts that ran: entering the LLM, and kept after FASTV_LAYER
            macs = qwen_method_prefill_macs(shape, hybrid or HybridConfig(), counts["grids"][i], text, visual_entered=visual, visual_kept=kept)
        elif anyres is not None and not dymu:  # LLaVA-NeXT: every crop, a method's reads per crop, the packed span
            macs = flops.next_method_prefill_macs(shape, hybrid or HybridConfig(), anyres, text, visual_entered=visual, visual_kept=kept)
        elif hybrid is not None and (hybrid.visual_method is not None or hybrid.visual_pool is not None):
            # a method before the LLM: its own CLIP loop, what it projects and its scoring
            macs = flops.method_prefill_macs(shape, hybrid, text, visual_entered=visual, visual_kept=kept)
        else:
            macs = flops.prefill_macs(
                shape, text, visual, kept if kept < visual else None, fastv_layer=fastv_layer,
                vit_counts=vit_counts, scoring=scoring, vit_layers_run=shape.vit_layers_read if dymu else None,
                crops=counts["crops"][i],
            )
        totals["vision"] += macs.vision_total
        totals["llm"] += macs.llm_total
        totals["prefill"] += macs.total
        if hybrid is not None and hybrid.staged_method is not None:  # one cache length per stage
            totals["decode"] += flops.staged_decode_macs_mean(shape, hybrid, text, decode_tokens, anyres) if decode_tokens else 0.0
            totals["kv"] += flops.staged_kv_cache_bytes(shape, hybrid, text, decode_tokens, bytes_per_element, anyres)
            totals["kv_prompt"] += flops.staged_kv_cache_bytes(shape, hybrid, text, 0, bytes_per_element, anyres)
            continue
        if decode_tokens:
            totals["decode"] += flops.llm_decode_macs_mean(
                shape.llm, text + visual, text + kept, steps=decode_tokens, fastv_layer=fastv_layer
            )
        totals["kv"] += flops.kv_cache_bytes(
            shape.llm, text + visual + decode_tokens, text + kept + decode_tokens, fastv_layer, bytes_per_element
        )
        totals["kv_prompt"] += flops.kv_cache_bytes(shape.llm, text + visual, text + kept, fastv_layer, bytes_per_element)
    return totals


def generate_tokens_per_s(runs: list[dict], batch: int, decode_tokens: int) -> float:
    """Median over runs of new tokens per second: a prefill gives each sample its first token, and
    every decode step one more, so batch x (decode_tokens + 1) tokens in prefill + decode time."""
    if not decode_tokens:
        return math.nan
    rates = [batch * (decode_tokens + 1) / ((run["prefill_ms"] + run["decode_ms_per_token"] * decode_tokens) / 1e3) for run in runs]
    return median(rates)


def count_columns(counts: dict) -> dict:
    return dict(  # means over the batch's samples, as the evaluation's token counts are means over rows
        visual_in=statistics.fmean(counts["visual"]), visual_kept=statistics.fmean(counts["visual_kept"]),
        llm_tokens_in=statistics.fmean(t + v for t, v in zip(counts["text"], counts["visual"])),
        llm_tokens_kept=statistics.fmean(t + v for t, v in zip(counts["text"], counts["visual_kept"])),
        per_sample_counts=dict(counts),
    )


def theory_columns(bench: BenchRun, config: BenchConfig, row: dict) -> dict:
    shape, args = bench_shape(bench.model.config), bench.args
    macs = theory(shape, config.counts, config, args.decode_tokens, args.batch_size, torch.finfo(bench.dtype).bits // 8)
    return dict(
        vision_gmacs=macs["vision"] / 1e9, llm_prefill_gmacs=macs["llm"] / 1e9, prefill_gmacs=macs["prefill"] / 1e9,
        decode_gmacs_per_token=macs["decode"] / 1e9 if args.decode_tokens else math.nan,
        kv_cache_mb_theory=macs["kv"] / 2**20, kv_cache_mb_prompt_theory=macs["kv_prompt"] / 2**20,
        llm_prefill_gmacs_per_s=macs["llm"] / 1e9 / (row["llm_prefill_ms"] / 1e3) if row.get("llm_prefill_ms") else math.nan,
    )
