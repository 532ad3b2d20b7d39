"""DyMU's dynamic token merging (DToMe) as pure tensor maths: no transformers imports here.

DyMU (Wang et al., 2025, github.com/MikeWangWZHL/dymu) merges visual tokens inside the CLIP tower,
in every layer, after attention and before the MLP:

1. the layer's keys, averaged over heads, are the merge metric (cosine similarity);
2. the current tokens alternate into two sets A and B (ToMe's bipartite split); every A token finds
   its most similar B token; the CLS token (first in A) is never merged;
3. every A token whose best score exceeds the layer's threshold is merged into its B partner, as a
   size-weighted average (several A tokens may land on one B token). Only A tokens disappear, so
   at most half of the tokens (CLS excluded) go per layer;
4. later layers use proportional attention: log(size) is added to every key's attention logit.

Thresholds come from a calibration pass (`hybrid_vlm.calibrate`), so the token count varies per
image.

Static shapes, zero host syncs
------------------------------
The inference path never changes a tensor's shape: every image keeps all N = 1 + 576 slots. A
token merged away marks its slot invalid (size 0; -inf in the additive attention bias, so SDPA
still runs with a plain float mask); a merged token lives in the slot of the B token that absorbed
it; the weighted average is a `scatter_add`. Nothing here reads a tensor value on the host.

Order of the bipartite split
----------------------------
DyMU alternates tokens by their position in its compacted sequence, whose order after a merge is
[CLS, unmerged A tokens, B tokens] (or an unstable argsort of the padding mask). We alternate by
the rank of each valid slot in slot order (raster order of the slot's original patch), with CLS at
rank 0. Layer 0 is identical to DyMU (A = CLS + odd patches, B = even patches); later layers keep
A and B spatially interleaved instead of pairing leftovers of A among themselves. Calibration uses
the same split, so thresholds and inference agree. Dropping invalid slots while keeping the order
(the optional compacting path) gives the same split, hence the same merges.

Representative position
-----------------------
Each surviving token is placed, for the LLM, at one original patch it covers: the covered patch
nearest (2-D, on the patch grid) to the centroid of the covered patches, ties to the lowest patch
index. Since every original patch has size 1, that centroid is exactly the size-weighted centroid
of the tokens merged into it. Why this rule: the position must be a patch the token covers (so
positions stay unique: coverage sets are disjoint) and should sit where the token's mass is. The
B slot that absorbed the others is arbitrary (decided by bipartite parity, often at the region's
edge); the lowest covered index biases every merged token towards the top-left and compresses
RoPE distances unevenly; the rounded centroid itself can fall outside a non-convex region and
collide with another token's position. Distances are compared exactly in integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")

# DyMU's released ViT-L/14-336 settings: "72out", "192out", "384out" (constant schedule) remove
# 21 / 16 / 8 tokens in each of the 24 CLIP blocks. LLaVA reads the output of block 23, so the
# nominal patch count there is 576 - 23 * r = 93 / 208 / 392; DyMU reports 89±27 / 195±47 /
# 394±57 tokens achieved with the calibrated thresholds. A preset is the nominal count at the
# layer LLaVA reads (CLS excluded), which reproduces DyMU's r per layer exactly on ViT-L/14-336.
PRESETS = {"low": 93, "mid": 208, "high": 392}
PRESET_REFERENCE_PATCHES = 576
SCHEDULES = ("constant", "linear", "reverse_linear")


# ---------------------------------------------------------------------------------------------
# Per-layer merge state
# ---------------------------------------------------------------------------------------------


@dataclass
class MergeState:
    """What the merging loop tracks besides the hidden states; all [B, N] with N = current slots.

    size: float32, original tokens covered by the token in each slot (0 where merged away).
    valid: bool, slot holds a token.
    owner: long [B, N_orig], for each original token (CLS first) the slot that now holds it.
    """

    size: torch.Tensor
    valid: torch.Tensor
    owner: torch.Tensor

    @classmethod
    def initial(cls, batch: int, tokens: int, device: torch.device | str) -> MergeState:
        return cls(
            size=torch.ones(batch, tokens, dtype=torch.float32, device=device),
            valid=torch.ones(batch, tokens, dtype=torch.bool, device=device),
            owner=torch.arange(tokens, device=device).expand(batch, tokens).contiguous(),
        )

    def counts(self) -> torch.Tensor:
        """[B] long: tokens per image, CLS included."""
        return self.valid.sum(dim=1)


def attention_bias(state: MergeState, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention as an additive SDPA mask [B, 1, 1, N]: log(size) for every key slot,
    -inf for slots merged away (every query keeps CLS, so no row is fully masked)."""
    bias = torch.where(state.valid, state.size.clamp_min(1.0).log(), torch.full_like(state.size, NEG_INF))
    return bias.to(dtype)[:, None, None, :]


def bipartite_scores(metric: torch.Tensor, valid: torch.Tensor, protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe/DyMU bipartite matching scores on static slots.

    metric: [B, N, D] (head-averaged keys); valid: [B, N] bool. Valid slots alternate A, B, A, ...
    by rank in slot order (rank 0 = CLS = A). Returns (node_max, node_idx), both [B, N]: for every
    mergeable A slot its best cosine similarity to a B slot and that B slot; -inf (and an arbitrary
    index) for B slots, invalid slots and the first `protected` ranks (CLS).

    A and B are gathered into fixed-size lists first (ceil(N/2) and floor(N/2) entries, padded), so
    the similarity matrix is a quarter of N x N and shapes stay static.
    """
    batch, slots, dim = metric.shape
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rank = valid.long().cumsum(dim=1) - 1
    in_a = valid & (rank % 2 == 0) & (rank >= protected)
    in_b = valid & (rank % 2 == 1)
    a_slots = torch.sort((~in_a).to(torch.uint8), dim=1, stable=True).indices[:, : (slots + 1) // 2]
    b_slots = torch.sort((~in_b).to(torch.uint8), dim=1, stable=True).indices[:, : slots // 2]
    a_metric = m.gather(1, a_slots[..., None].expand(-1, -1, dim))
    b_metric = m.gather(1, b_slots[..., None].expand(-1, -1, dim))
    similarity = torch.matmul(a_metric, b_metric.transpose(1, 2))  # [B, ceil(N/2), floor(N/2)]
    similarity.masked_fill_(~in_b.gather(1, b_slots)[:, None, :], NEG_INF)
    best, best_j = similarity.max(dim=-1)
    best.masked_fill_(~in_a.gather(1, a_slots), NEG_INF)
    node_max = torch.full((batch, slots), NEG_INF, dtype=best.dtype, device=metric.device).scatter(1, a_slots, best)
    node_idx = torch.zeros(batch, slots, dtype=torch.long, device=metric.device).scatter(1, a_slots, b_slots.gather(1, best_j))
    return node_max, node_idx


def threshold_merge_mask(node_max: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Inference: merge every A token whose best score exceeds the layer threshold (+inf: none)."""
    return node_max > threshold


def top_r_merge_mask(node_max: torch.Tensor, r: int, counts: torch.Tensor, protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration (DyMU's batch-level DToMe; syncs): rank the A-token scores of the whole batch
    together and merge the top r·B, with r capped at half the tokens of the batch's longest image
    (CLS excluded), as DyMU caps it by its padded length.

    node_max: [B, N] from `bipartite_scores`; counts: [B] tokens per image, CLS included. Returns
    (merge mask [B, N], cutoff): the cutoff is the score of the best edge left unmerged, clamped
    at 0 (DyMU's batch threshold for the layer; 0 when every edge was merged).
    """
    batch, slots = node_max.shape
    r = min(r, (int(counts.max()) - protected) // 2)
    rb = max(r, 0) * batch
    flat = node_max.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    merge = (rank < rb).reshape(batch, slots) & torch.isfinite(node_max)
    cutoff = flat[order[min(rb, flat.numel() - 1)]]
    cutoff = cutoff.clamp_min(0.0) if torch.isfinite(cutoff) else torch.zeros_like(cutoff)
    return merge, cutoff


def merge_tokens(
    x: torch.Tensor, state: MergeState, merge: torch.Tensor, node_idx: torch.Tensor
) -> tuple[torch.Tensor, MergeState]:
    """Merge every slot flagged in `merge` into slot `node_idx` (size-weighted average), statically.

    x: [B, N, C]; merge: [B, N] bool (only A slots, never CLS); node_idx: [B, N] destination slots.
    Slots that absorb nothing keep their values bit for bit; merged-away slots keep stale values
    with size 0 and valid False (masked out of attention, never output); `owner` follows every
    original token to its new slot.
    """
    batch, slots, channels = x.shape
    here = torch.arange(slots, device=x.device)
    dest = torch.where(merge, node_idx, here)  # [B, N]
    size = state.size
    accumulate = torch.promote_types(x.dtype, torch.float32)  # half-precision models average in float32
    weighted = (x.to(accumulate) * size[..., None]).reshape(batch * slots, channels)
    flat_dest = (dest + (torch.arange(batch, device=x.device) * slots)[:, None]).reshape(-1)
    summed = torch.zeros_like(weighted).index_add_(0, flat_dest, weighted).view(batch, slots, channels)
    new_size = torch.zeros_like(size).scatter_add_(1, dest, size)
    absorbed = torch.zeros_like(size).scatter_add_(1, dest, merge.to(size.dtype)) > 0
    averaged = summed.div_(new_size.clamp_min(1.0).to(accumulate)[..., None])
    x = torch.where(absorbed[..., None], averaged.to(x.dtype), x)
    owner = dest.gather(1, state.owner)
    return x, MergeState(size=new_size, valid=state.valid & ~merge, owner=owner)


def compact(x: torch.Tensor, state: MergeState) -> tuple[torch.Tensor, MergeState]:
    """Optional compacting path (host sync): drop invalid slots, keeping slot order (so the
    bipartite split is unchanged), down to the batch's longest image."""
    longest = int(state.valid.sum(dim=1).max())
    order = torch.sort((~state.valid).to(torch.uint8), dim=1, stable=True).indices  # valid first, in order
    keep = order[:, :longest]
    new_position = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    state = MergeState(
        size=state.size.gather(1, keep),
        valid=state.valid.gather(1, keep),
        owner=new_position.gather(1, state.owner),
    )
    return x, state


def representative_slots(owner: torch.Tensor, slots: int, grid_width: int, prefix: int = 1) -> torch.Tensor:
    """For every slot, the original token that represents it: [B, slots] long (garbage where empty).

    owner: [B, N_orig], the slot holding each original token (the first `prefix` are CLS-like and
    sit alone in their slots). The representative of a slot is its covered patch nearest to the
    centroid of the covered patches on the grid_width-wide grid, ties to the lowest index. Exact:
    with n covered patches and coordinate sums S, n·p - S is compared in integers.
    """
    batch, tokens = owner.shape
    device = owner.device
    index = torch.arange(tokens, device=device)
    patch = (index - prefix).clamp_min(0)
    row = torch.where(index >= prefix, patch // grid_width, 0).expand(batch, tokens)
    col = torch.where(index >= prefix, patch % grid_width, 0).expand(batch, tokens)
    zeros = torch.zeros(batch, slots, dtype=torch.long, device=device)
    count = zeros.scatter_add(1, owner, torch.ones_like(owner))
    sum_row = zeros.scatter_add(1, owner, row.contiguous())
    sum_col = zeros.scatter_add(1, owner, col.contiguous())
    n = count.gather(1, owner)
    distance = (n * row - sum_row.gather(1, owner)) ** 2 + (n * col - sum_col.gather(1, owner)) ** 2
    key = distance * tokens + index  # index < tokens: ties go to the lowest index
    best = torch.full((batch, slots), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
    best = best.scatter_reduce(1, owner, key, reduce="amin", include_self=True)
    return best % tokens


@dataclass
class PlacedTokens:
    """Surviving tokens laid out on the patch grid (prefix tokens dropped): all [B, P]."""

    slot: torch.Tensor  # long: slot whose token sits at this patch position (garbage where invalid)
    valid: torch.Tensor  # bool: a surviving token is represented by this patch
    sizes: torch.Tensor  # long: patches covered by that token, 0 where invalid
    coverage: torch.Tensor  # long: for every patch, the position of the token that covers it


def place_tokens(state: MergeState, grid_width: int, prefix: int = 1) -> PlacedTokens:
    """Place every surviving non-prefix token at its representative patch (see the module doc)."""
    batch, slots = state.valid.shape
    tokens = state.owner.shape[1]
    patches = tokens - prefix
    device = state.valid.device
    rep = representative_slots(state.owner, slots, grid_width, prefix)  # [B, slots] original index
    slot_index = torch.arange(slots, device=device).expand(batch, slots)
    keep = state.valid & (slot_index >= prefix)
    target = torch.where(keep, rep - prefix, patches)  # invalid slots go to a dummy column
    size_long = state.size.round().long()
    placed_slot = torch.zeros(batch, patches + 1, dtype=torch.long, device=device).scatter(1, target, slot_index)
    placed_valid = torch.zeros(batch, patches + 1, dtype=torch.bool, device=device).scatter(1, target, keep)
    placed_size = torch.zeros(batch, patches + 1, dtype=torch.long, device=device).scatter(
        1, target, torch.where(keep, size_long, 0)
    )
    coverage = (rep - prefix).gather(1, state.owner[:, prefix:])
    return PlacedTokens(
        slot=placed_slot[:, :patches],
        valid=placed_valid[:, :patches],
        sizes=placed_size[:, :patches],
        coverage=coverage,
    )


# ---------------------------------------------------------------------------------------------
# Targets, r schedules, threshold files
# ---------------------------------------------------------------------------------------------


def resolve_target(target: str | int, num_patches: int) -> tuple[int, str | None]:
    """(nominal patch count at the layer the VLM reads, CLS excluded; preset name or None)."""
    if isinstance(target, str) and target.strip().lower() in PRESETS:
        name = target.strip().lower()
        count = PRESETS[name]
        if num_patches != PRESET_REFERENCE_PATCHES:
            count = max(1, round(count * num_patches / PRESET_REFERENCE_PATCHES))
        return count, name
    try:
        count = int(target)
    except (TypeError, ValueError):
        raise ValueError(f"--target {target!r} is not valid: use an integer token count or one of {sorted(PRESETS)}") from None
    if not 1 <= count <= num_patches:
        raise ValueError(f"--target {count} is not valid: use 1..{num_patches} (patch tokens, CLS excluded)")
    return count, None


def r_schedule(num_layers: int, r_total: int, schedule: str = "constant") -> list[int]:
    """Tokens to remove per merging layer, summing to r_total (DyMU's `_get_rs` semantics).

    constant: r_total // L everywhere, the remainder on the first layers. linear: decreasing from
    about 2·r_total/L, ending with zeros; reverse_linear: the same reversed.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not valid: use one of {SCHEDULES}")
    if num_layers <= 0 or r_total <= 0:
        return [0] * max(num_layers, 0)
    if schedule == "constant":
        base, extra = divmod(r_total, num_layers)
        return [base + (1 if i < extra else 0) for i in range(num_layers)]
    start = (2 * r_total) // num_layers
    step = start / num_layers
    values: list[int] = []
    while len(values) < num_layers and sum(values) + int(start - len(values) * step) < r_total:
        values.append(int(start - len(values) * step))
    if sum(values) < r_total:
        if len(values) < num_layers:
            values.append(r_total - sum(values))
        else:
            values[-1] += r_total - sum(values)
    values += [0] * (num_layers - len(values))
    return values if schedule == "linear" else values[::-1]


def nominal_counts(tokens: int, rs: list[int], protected: int = 1) -> list[int]:
    """Token count (prefix included) after each merging layer if r_l merges happen, capped at half."""
    counts = []
    for r in rs:
        tokens -= min(r, (tokens - protected) // 2)
        counts.append(tokens)
    return counts
