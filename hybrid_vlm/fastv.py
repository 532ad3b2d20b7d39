"""FastV as small pure tensor functions: score visual tokens, choose the kept ones, gather.

All functions are free of host syncs: no `.item()`, no boolean-mask indexing (which sizes its
output from tensor values), no Python branch on tensor values. Output shapes depend only on
input shapes and Python ints.
"""

from __future__ import annotations

import torch


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the True entries of `mask` [B, L], in order, as [B, count].

    Each row must hold exactly `count` True entries (callers assert that separately). A stable sort
    of position keys replaces `nonzero`, which would need the count from the device.
    """
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    keys = torch.where(mask, positions, positions + length)
    return keys.sort(dim=1).values[:, :count]


def last_query_attention(
    query_states: torch.Tensor,  # [B, H, Q, D] rotated queries of the scoring layer
    key_states: torch.Tensor,  # [B, H, K, D] rotated keys (KV heads already repeated)
    attention_mask: torch.Tensor | None,  # [B, 1, Q, K] bool, True = may attend; None = causal, every key real
    query_index: torch.Tensor,  # [B] long, which query row scores (the last prompt token)
    scale: float,
) -> torch.Tensor:
    """Head-averaged attention probabilities of one query per sample: [B, K] in float32.

    This is the single row of the scoring layer's attention matrix that FastV needs; computing it
    beside SDPA avoids running that layer in eager mode.
    """
    batch, heads, queries, dim = query_states.shape
    query_row = query_states.gather(2, query_index.view(batch, 1, 1, 1).expand(batch, heads, 1, dim))
    mask_row = mask_rows(attention_mask, query_index[:, None], queries, key_states.shape[2])
    logits = torch.matmul(query_row.float(), key_states.float().transpose(-1, -2)) * scale  # [B, H, 1, K]
    logits = logits.masked_fill(~mask_row, float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def mask_rows(
    attention_mask: torch.Tensor | None,  # [B, 1, Q, K] bool, True = may attend; None = causal, every key real
    rows: torch.Tensor,  # [B, R] long, query rows
    queries: int,
    keys: int,
) -> torch.Tensor:
    """[B, 1, R, K] bool: those query rows of the mask (built from causality when there is none:
    the queries are then the last Q of K keys)."""
    if attention_mask is None:
        key_at = torch.arange(keys, device=rows.device)
        return (key_at[None, None, :] <= (rows + keys - queries)[:, :, None])[:, None]
    return attention_mask.gather(2, rows[:, None, :, None].expand(rows.shape[0], 1, rows.shape[1], keys))


def surviving_positions(visual_positions: torch.Tensor, top_visual: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L - V + keep]: every non-visual position and the `top_visual` [B, keep] ones, in order."""
    batch = visual_positions.shape[0]
    survives = torch.ones(batch, length, dtype=torch.bool, device=visual_positions.device)
    survives = survives.scatter(1, visual_positions, False).scatter(1, top_visual, True)
    return true_positions(survives, length - visual_positions.shape[1] + top_visual.shape[1])


def select_kept_positions(
    scores: torch.Tensor,  # [B, L] score of every prompt position (only visual ones are read)
    visual_positions: torch.Tensor,  # [B, V] positions of the visual tokens in the prompt
    keep: int,  # visual tokens kept per sample (static: sizes the output)
    keep_per_sample: torch.Tensor | None = None,  # [B] <= keep: how many of them stay real
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt positions that survive pruning, in original order, [B, L - V + keep], and which of
    them stay real tokens ([B, L - V + keep] bool, or None when every sample keeps `keep`).

    Every non-visual position survives; of the visual ones, the `keep` highest-scoring do. With
    `keep_per_sample`, sample b's visual tokens ranked `keep_per_sample[b]` or lower still occupy a
    slot (shapes stay static, no host sync) but are marked not real, so attention masks them out.
    """
    batch, length = scores.shape
    visual_scores = scores.gather(1, visual_positions)
    top_visual = visual_positions.gather(1, visual_scores.topk(keep, dim=1).indices)  # best first
    kept = surviving_positions(visual_positions, top_visual, length)
    if keep_per_sample is None:
        return kept, None
    beyond_quota = torch.arange(keep, device=scores.device)[None, :] >= keep_per_sample[:, None]  # [B, keep]
    padding = torch.zeros(batch, length, dtype=torch.bool, device=scores.device).scatter(1, top_visual, beyond_quota)
    return kept, ~padding.gather(1, kept)


def visual_keep_counts(num_visual: torch.Tensor, fastv_k: int | float | None) -> torch.Tensor:
    """Per-sample `config.visual_keep_count` for a [B] tensor of visual-token counts, on device.

    The product is formed in float64 exactly as Python forms V * (1 - R), and `torch.round` rounds
    half to even like Python's `round`, so both paths keep the same count without a host read."""
    if fastv_k is None:
        return num_visual
    if isinstance(fastv_k, int):
        return num_visual.clamp(max=fastv_k)
    rounded = torch.round(num_visual.double() * (1.0 - fastv_k)).long()
    return torch.minimum(rounded, num_visual)


def gather_tokens(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Select positions [B, N] along dim 1 of a [B, L, ...] tensor."""
    index = positions.view(*positions.shape, *([1] * (tensor.dim() - 2)))
    return tensor.gather(1, index.expand(*positions.shape, *tensor.shape[2:]))
