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
ToMe splits the current token sequence alternately into A (even positions, CLS first) and B (odd
positions). Which order that sequence has after a merge is a choice, and two are implemented
(`SPLITS`), selected by `split`:

- "official" (the default: DyMU as published). DyMU's `bipartite_soft_matching` rebuilds the
  sequence after every merge as [CLS and the unmerged A tokens, then all B tokens], each group in
  its previous order; a layer that merges nothing in an image leaves its order unchanged. Here
  every slot keeps that position as a rank (`MergeState.order`), and A/B alternate by rank;
  nothing moves physically. Ranks are per image, so batched == alone.
- "slot" (an ablation). Valid slots alternate by their rank in slot order, i.e. the raster order
  of each slot's original patch: A and B stay spatially interleaved at every layer.

Layer 0 is the same in both (A = CLS + odd patches, B = even patches); from layer 1 on the
partitions differ. Calibration uses the same split as inference, so thresholds and inference agree;
a threshold file records its split. Dropping invalid slots (the optional compacting path) keeps
every rank, hence the same merges.

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

import re
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")

# DyMU's released ViT-L/14-336 configs (open_clip `model_configs/ViT-L-14-336-tome-<name>.json`):
# "<N>out[-linear|-reverse-linear]" removes r_total = 576 - N patch tokens over all 24 CLIP blocks
# with DyMU's `_get_rs` schedule (constant by default). LLaVA reads block 23's output, so the last
# block's r never reaches the LLM: "72out" (21 per block) gives a nominal 576 - 23·21 = 93 tokens
# there, and DyMU reports 89±27 / 195±47 / 394±57 tokens achieved for 72out / 192out / 384out.
# The presets low / mid / high are those three configs.
PRESETS = {"low": "72out", "mid": "192out", "high": "384out"}
PRESET_REFERENCE_PATCHES = 576
OFFICIAL_NAME = re.compile(r"(\d+)out(-linear|-reverse-linear)?")
NAME_SCHEDULES = {None: "constant", "-linear": "linear", "-reverse-linear": "reverse_linear"}
# DyMU's mapping: r_total = P - target over every block of the tower (target = tokens after its last
# block, as in DyMU's config names), the blocks LLaVA reads take the first entries of that list.
SCHEDULES = ("constant", "linear", "reverse_linear")
# This project's former mapping, kept as an option: r_total = P - target over the blocks LLaVA reads
# (target = nominal tokens at the read layer). With the constant schedule and the presets it gives
# DyMU's r per block exactly; with linear schedules it does not (72out-linear: 93 tokens, not 72).
READ_SCHEDULES = tuple(f"read_{name}" for name in SCHEDULES)
READ_PRESETS = {"low": 93, "mid": 208, "high": 392}  # read_constant equivalents of PRESETS on ViT-L/14-336
ALL_SCHEDULES = SCHEDULES + READ_SCHEDULES
SPLITS = ("official", "slot")  # bipartite split order: see the module doc


# ---------------------------------------------------------------------------------------------
# Per-layer merge state
# ---------------------------------------------------------------------------------------------


@dataclass
class MergeState:
    """What the merging loop tracks besides the hidden states; all [B, N] with N = current slots.

    size: float32, original tokens covered by the token in each slot (0 where merged away).
    valid: bool, slot holds a token.
    owner: long [B, N_orig], for each original token (CLS first) the slot that now holds it.
    order: long, position of the slot's token in the current token sequence (0 = CLS); the valid
        slots of an image hold 0..count-1, invalid slots hold stale values that nothing reads. The
        bipartite split alternates A/B by it.
    """

    size: torch.Tensor
    valid: torch.Tensor
    owner: torch.Tensor
    order: torch.Tensor

    @classmethod
    def initial(cls, batch: int, tokens: int, device: torch.device | str) -> MergeState:
        slots = torch.arange(tokens, device=device).expand(batch, tokens)
        return cls(
            size=torch.ones(batch, tokens, dtype=torch.float32, device=device),
            valid=torch.ones(batch, tokens, dtype=torch.bool, device=device),
            owner=slots.contiguous(),
            order=slots.contiguous(),
        )

    def counts(self) -> torch.Tensor:
        """[B] long: tokens per image, CLS included."""
        return self.valid.sum(dim=1)


def attention_bias(state: MergeState, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention as an additive SDPA mask [B, 1, 1, N]: log(size) for every key slot,
    -inf for slots merged away (every query keeps CLS, so no row is fully masked)."""
    size = state.size.to(torch.promote_types(dtype, torch.float32))  # a float64 tower's bias as exact as its scores
    bias = torch.where(state.valid, size.clamp_min(1.0).log(), torch.full_like(size, NEG_INF))
    return bias.to(dtype)[:, None, None, :]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"DyMU split {split!r} is not valid: use one of {', '.join(SPLITS)}")
    return split


def slot_order(valid: torch.Tensor) -> torch.Tensor:
    """The "slot" split's sequence order: the rank of every valid slot in slot order."""
    return valid.long().cumsum(dim=1) - 1


def bipartite_scores(
    metric: torch.Tensor, valid: torch.Tensor, order: torch.Tensor | None = None, protected: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe/DyMU bipartite matching scores on static slots.

    metric: [B, N, D] (head-averaged keys); valid: [B, N] bool; order: [B, N] long, each valid
    slot's position in the current sequence (`MergeState.order`; None: slot order). Valid slots
    alternate A, B, A, ... by that position (0 = CLS = A). Returns (node_max, node_idx), both
    [B, N]: for every mergeable A slot its best cosine similarity to a B slot and that B slot;
    -inf (and an arbitrary index) for B slots, invalid slots and the first `protected` positions.
    Ties between B slots go to the first in sequence order, as `max` does in DyMU.

    A and B are gathered into fixed-size lists first (ceil(N/2) and floor(N/2) entries, padded, in
    sequence order), so the similarity matrix is a quarter of N x N and shapes stay static.
    """
    batch, slots, dim = metric.shape
    m = metric.to(torch.promote_types(metric.dtype, torch.float32))  # half precision scores in float32
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rank = slot_order(valid) if order is None else order
    in_a = valid & (rank % 2 == 0) & (rank >= protected)
    in_b = valid & (rank % 2 == 1)
    # members first, by sequence position; the rest after them (ties keep slot order: stable)
    a_slots = torch.sort(torch.where(in_a, rank, slots), dim=1, stable=True).indices[:, : (slots + 1) // 2]
    b_slots = torch.sort(torch.where(in_b, rank, slots), dim=1, stable=True).indices[:, : slots // 2]
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


def official_order(order: torch.Tensor, valid: torch.Tensor, merge: torch.Tensor) -> torch.Tensor:
    """DyMU's sequence order after a merge step: [CLS and unmerged A tokens, then B tokens], each
    group in its previous order (`torch.cat([unm, dst])` in DyMU's `bipartite_soft_matching`, with
    `unm_idx` sorted); an image that merges nothing keeps its order (DyMU returns `do_nothing`).

    order, valid: [B, N] before the merge; merge: [B, N] bool. Returns the new order [B, N]: the
    surviving slots of each image get 0..count-1, merged-away slots stale values.
    """
    slots = order.shape[1]
    survives = valid & ~merge
    in_b = order % 2 == 1
    key = torch.where(survives, in_b.long() * slots + order, 2 * slots)  # A before B, then by old position
    by_key = torch.sort(key, dim=1, stable=True).indices
    positions = torch.arange(slots, device=order.device).expand_as(by_key)
    reordered = torch.empty_like(by_key).scatter_(1, by_key, positions)
    return torch.where(merge.any(dim=1, keepdim=True), reordered, order)


def merge_tokens(
    x: torch.Tensor, state: MergeState, merge: torch.Tensor, node_idx: torch.Tensor, split: str = "official"
) -> tuple[torch.Tensor, MergeState]:
    """Merge every slot flagged in `merge` into slot `node_idx` (size-weighted average), statically.

    x: [B, N, C]; merge: [B, N] bool (only A slots, never CLS); node_idx: [B, N] destination slots.
    Slots that absorb nothing keep their values bit for bit; merged-away slots keep stale values
    with size 0 and valid False (masked out of attention, never output); `owner` follows every
    original token to its new slot; `order` moves on as `split` says (see the module doc).
    """
    check_split(split)
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
    valid = state.valid & ~merge
    order = official_order(state.order, state.valid, merge) if split == "official" else slot_order(valid)
    return x, MergeState(size=new_size, valid=valid, owner=owner, order=order)


def compact(x: torch.Tensor, state: MergeState) -> tuple[torch.Tensor, MergeState]:
    """Optional compacting path (host sync): drop invalid slots, keeping slot order and every
    token's sequence position (so the bipartite split is unchanged), down to the batch's longest
    image."""
    longest = int(state.valid.sum(dim=1).max())
    order = torch.sort((~state.valid).to(torch.uint8), dim=1, stable=True).indices  # valid first, in order
    keep = order[:, :longest]
    new_position = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    state = MergeState(
        size=state.size.gather(1, keep),
        valid=state.valid.gather(1, keep),
        owner=new_position.gather(1, state.owner),
        order=state.order.gather(1, keep),
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


@dataclass(frozen=True)
class MergePlan:
    """How many tokens each merging layer removes, from a target and a schedule.

    tokens: the count the target names: patch tokens (CLS excluded) after the tower's last block
        for DyMU's schedules, at the layer LLaVA reads for the read_* schedules.
    name: the preset or DyMU config name given (low / mid / high, "72out", ...), else None.
    schedule: one of ALL_SCHEDULES.
    r_per_layer: one entry per block LLaVA reads; 0 = that block never merges (as in DyMU, whose
        blocks with r = 0 skip merging whatever their threshold).
    """

    tokens: int
    name: str | None
    schedule: str
    r_per_layer: list[int]


def _target_error(target) -> ValueError:
    return ValueError(
        f"--target {target!r} is not valid: use an integer token count, a DyMU config name such as 72out, "
        f"192out-linear or 192out-reverse-linear, or one of {', '.join(PRESETS)}"
    )


def check_target_name(target: str | int) -> None:
    """Refuse a --target that is neither a count, a preset nor a DyMU config name (whatever the tower;
    whether the count fits it is `plan_merging`'s check)."""
    text = str(target).strip().lower()
    if not (text in PRESETS or OFFICIAL_NAME.fullmatch(text) or re.fullmatch(r"\d+", text)):
        raise _target_error(target)


def plan_merging(target: str | int, schedule: str | None, tower_layers: int, read_layers: int, num_patches: int) -> MergePlan:
    """The merge plan for `target` (integer, preset or DyMU config name) and `schedule` (None: the
    one the name carries, else constant). tower_layers: CLIP blocks of the tower (DyMU spreads
    r_total over all of them); read_layers: the blocks LLaVA reads, which are the merging layers."""
    if schedule is not None and schedule not in ALL_SCHEDULES:
        raise ValueError(f"--schedule {schedule!r} is not valid: use one of {', '.join(ALL_SCHEDULES)}")
    text = str(target).strip().lower()
    named = OFFICIAL_NAME.fullmatch(text)
    if named and schedule is not None and schedule != NAME_SCHEDULES[named.group(2)]:
        raise ValueError(
            f"--target {target!r} names DyMU's {NAME_SCHEDULES[named.group(2)]} schedule, but --schedule is {schedule!r}: "
            "drop one of them"
        )
    schedule = NAME_SCHEDULES[named.group(2)] if named else (schedule or "constant")
    read_mapping = schedule in READ_SCHEDULES
    name = text if (named or text in PRESETS) else None
    if text in PRESETS:
        count = READ_PRESETS[text] if read_mapping else int(OFFICIAL_NAME.fullmatch(PRESETS[text]).group(1))
        if num_patches != PRESET_REFERENCE_PATCHES:
            count = max(1, round(count * num_patches / PRESET_REFERENCE_PATCHES))
    else:
        check_target_name(target)
        count = int(named.group(1) if named else text)
    if not 1 <= count <= num_patches:
        raise ValueError(f"--target {target!r} is not valid: use 1..{num_patches} patch tokens (CLS excluded)")
    if read_mapping:
        rs = r_schedule(read_layers, num_patches - count, schedule.removeprefix("read_"))
    else:
        rs = r_schedule(tower_layers, num_patches - count, schedule)[:read_layers]
    return MergePlan(tokens=count, name=name, schedule=schedule, r_per_layer=rs)


def r_schedule(num_layers: int, r_total: int, schedule: str = "constant") -> list[int]:
    """Tokens to remove per layer, summing to r_total (DyMU's `_get_rs`, equal to it wherever that
    terminates; it loops forever for some linear cases, e.g. 24 layers and r_total = 96).

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


def place_on_cropped_grid(
    coverage: torch.Tensor,  # [crops, P] long: for every patch, the patch whose slot holds its token (per crop)
    source: torch.Tensor,  # [T] long: the grid's patches in raster order, as crop * P + patch
    grid_width: int,  # patches per row of that grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-place merged tokens on a grid assembled from parts of several crops (LLaVA-NeXT's unpadded
    crop grid), where some patches of a crop are gone: returns (slot [T], valid [T]).

    Every token keeps the patches it covers that the grid still holds; it sits at the one of them
    nearest their centroid (the module's rule, on this grid), so every grid patch is covered by
    exactly one placed token and a token whose representative was cut away moves to a patch it
    still covers; a token covering only cut patches disappears. slot[t] is the flat index
    (crop * P + patch) where that token's feature lives, valid[t] whether grid patch t places it.
    """
    patches = coverage.shape[1]
    crop = source // patches
    owner = crop * patches + coverage.reshape(-1)[source]  # [T]: the flat slot of each patch's token
    best = representative_slots(owner[None], coverage.numel(), grid_width, prefix=0)[0]  # per token: grid index
    valid = best.gather(0, owner) == torch.arange(source.shape[0], device=source.device)
    return owner, valid
