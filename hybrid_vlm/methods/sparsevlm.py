"""SparseVLM v1.5 (Gumpest/SparseVLMs, branch v1.5 at 734d900, the ICML'25 paper) as pure functions:
its schedule, its text raters, their attention read, and the DPC-kNN merge that recycles pruned
tokens. The engine (`hybrid_vlm.stages`) applies them; ../shared/notes/methods.md section 7 is the
reading of the official code this follows.

- Raters, chosen once from the embeddings entering layer 0: each visual token's softmax over the
  text after the image of its dot products with them, averaged over the visual tokens; the text
  tokens above the mean of that average are the raters (`modelling_sparse_llama.py` L199-204).
- At layers 2, 6 and 15 (of 32) the layer's own attention probabilities (full softmax, every head)
  score the visual tokens: the head mean of the rater rows, averaged over the raters. The layer's
  output keeps the top `min(schedule[stage], V - 1)` visual tokens, every text token, and `c`
  recycled tokens: the top `int(0.3 * pruned) + 1` pruned tokens by the same score, merged into
  `c = int(that / 10) + 1` clusters by DPC-kNN on the layer's output, placed right after the kept
  visual tokens (`score.py::attn_postprocess_topk`, `utils.py::cluster_and_merge`).

Deviations, all deliberate: the density's tie-breaking noise (`torch.rand * 1e-6`) is replaced by
a fixed order, so runs are deterministic: of two tokens of exactly equal density the lower index is
the denser (one outcome of the noise; leaving the noise out instead would make both of a tied pair
density peaks), and the higher score or, on a tie, the lower index wins; the scores are taken in
fp32; samples are batched (the official code asserts batch 1). The noise is more than a tie-breaker
where densities fall to about 1e-6 (tokens far apart after normalisation): the official centres are
then random, ours still follow the density (a side-by-side run with the official functions; not
measured on LLaVA-1.5's own states).
"""

from __future__ import annotations

import torch

from ..fastv import mask_rows
from .depth import scale_layers

SCORING_LAYERS = (2, 6, 15)  # official `pruning_loc` on 32 layers: these layers score, their outputs are pruned
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}  # score.py's sparse_token_list_*
RECYCLED_SHARE = 0.3
TOKENS_PER_CLUSTER = 10


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def stage_layers(num_layers: int) -> tuple[int, ...]:
    """The first layer of each stage (the one after a scoring layer), scaled to `num_layers`:
    (3, 7, 16) on 32 layers."""
    return scale_layers(tuple(layer + 1 for layer in SCORING_LAYERS), num_layers, "SparseVLM")


def recycled_counts(pruned: int) -> tuple[int, int]:
    """(pruned tokens merged, clusters they become) when a stage prunes `pruned` visual tokens."""
    candidates = int(pruned * RECYCLED_SHARE) + 1
    return candidates, int(candidates / TOKENS_PER_CLUSTER) + 1


def stage_counts(budget: int, num_visual: int) -> tuple[tuple[int, int], ...]:
    """Per stage, (visual tokens kept by score, recycled clusters added after them)."""
    if budget not in SCHEDULES:
        raise ValueError(f"VISUAL_BUDGET={budget} is not one of SparseVLM's schedules: use {', '.join(map(str, SCHEDULES))}")
    counts, visual = [], num_visual
    for target in SCHEDULES[budget]:
        kept = min(target, visual - 1)
        _, clusters = recycled_counts(visual - kept)
        counts.append((kept, clusters))
        visual = kept + clusters
    return tuple(counts)


def rater_mask(
    embeds: torch.Tensor,  # [B, L, D] what enters layer 0
    visual_positions: torch.Tensor,  # [B, V]
    text_positions: torch.Tensor,  # [B, T] a static superset of the text slots (e.g. every non-visual one)
    is_text: torch.Tensor,  # [B, L] bool: the prompt's text after the image
) -> torch.Tensor:
    """[B, L] bool: the raters, the text tokens whose visual-averaged softmax weight exceeds the mean."""
    batch, _, dim = embeds.shape
    embeds = embeds.to(at_least_fp32(embeds.dtype))
    visual = embeds.gather(1, visual_positions[..., None].expand(-1, -1, dim))  # [B, V, D]
    text = embeds.gather(1, text_positions[..., None].expand(-1, -1, dim))  # [B, T, D]
    column_is_text = is_text.gather(1, text_positions)  # [B, T]
    logits = (visual @ text.transpose(1, 2)).masked_fill(~column_is_text[:, None, :], float("-inf"))
    weight = logits.softmax(dim=-1).mean(dim=1)  # [B, T]
    mean = (weight * column_is_text).sum(dim=1, keepdim=True) / column_is_text.sum(dim=1, keepdim=True).clamp_min(1)
    raters = column_is_text & (weight > mean)
    return torch.zeros_like(is_text).scatter(1, text_positions, raters)


def rater_attention(
    query_states: torch.Tensor,  # [B, H, Q, D] rotated queries of the scoring layer
    key_states: torch.Tensor,  # [B, H, K, D] rotated keys (KV heads repeated)
    attention_mask: torch.Tensor | None,  # [B, 1, Q, K] bool, True = may attend; None = causal, every key real
    rows: torch.Tensor,  # [B, R] query rows read (a static superset of the raters)
    weights: torch.Tensor,  # [B, R] each row's share of the mean (1 / raters on raters, 0 elsewhere)
    scale: float,
) -> torch.Tensor:
    """[B, K] in float32 (float64 for a float64 model): the rater rows of the layer's attention probabilities (denominators over
    every key), head-averaged, then weighted over the rows. Only the R rows are computed."""
    batch, heads, queries, dim = query_states.shape
    picked = query_states.gather(2, rows[:, None, :, None].expand(batch, heads, rows.shape[1], dim))
    mask = mask_rows(attention_mask, rows, queries, key_states.shape[2])
    mask = mask | ~mask.any(dim=-1, keepdim=True)  # a padding row with no key: finite, and weighted 0
    dtype = at_least_fp32(query_states.dtype)
    logits = (picked.to(dtype) @ key_states.to(dtype).transpose(-1, -2)) * scale  # [B, H, R, K]
    probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1).mean(dim=1)  # [B, R, K]
    return (weights.to(dtype)[..., None] * probs).sum(dim=1)


def dpc_knn_merge(tokens: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, N, C] -> (merged [B, clusters, C], centers [B, clusters] indices into N).

    Density peaks with k = `clusters` nearest neighbours (self included): density exp(-mean d²),
    an exact tie won by the lower index; each token's distance to the nearest denser one (the
    farthest pair's for the densest); centers
    the top of distance * density; every token joins its nearest center, each center itself; a
    cluster is the plain mean of its members."""
    batch, count, channels = tokens.shape
    distance = torch.cdist(tokens, tokens, compute_mode="donot_use_mm_for_euclid_dist") / channels**0.5  # [B, N, N]
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()  # [B, N]
    # the official density noise (`torch.rand * 1e-6`) makes one token of an exact tie the denser;
    # here the lower index is. Not a mere order: with k = 2 the two tokens of every mutually nearest
    # pair tie, and a strict ">" makes both of the closest pair centers (each "denser than none").
    index = torch.arange(count, device=tokens.device)
    lower = index[None, :] < index[:, None]  # [i, j]: j comes before i
    denser = (density[:, None, :] > density[:, :, None]) | ((density[:, None, :] == density[:, :, None]) & lower)  # [B, i, j]: j denser than i
    farthest = distance.flatten(1).amax(dim=1)[:, None, None]
    parent_distance = torch.where(denser, distance, farthest).amin(dim=-1)  # [B, N]
    centers = (parent_distance * density).sort(dim=1, descending=True, stable=True).indices[:, :clusters]
    to_centers = distance.gather(1, centers[..., None].expand(batch, clusters, count))  # [B, c, N]
    own = torch.arange(clusters, device=tokens.device).expand(batch, clusters)
    assignment = to_centers.argmin(dim=1).scatter(1, centers, own)  # [B, N]
    sums = tokens.new_zeros(batch, clusters, channels).scatter_add(1, assignment[..., None].expand(-1, -1, channels), tokens)
    sizes = tokens.new_zeros(batch, clusters).scatter_add(1, assignment, tokens.new_ones(batch, count))
    return sums / (sizes[..., None] + 1e-6), centers
