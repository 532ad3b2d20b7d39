"""transformers internals used by the vision side: the CLIP tower LLaVA reads, driven layer by layer
with DyMU merging (`hybrid_vlm.dymu` holds the maths; this file knows the module names).

`dymu_image_features(model, pixel_values, thresholds, split=...)` replaces
`model.model.get_image_features`: it runs the CLIP layers up to the one LLaVA reads (never the
unused last layer) and, in each, merges tokens after attention and before the MLP. Static shapes
and no host syncs unless `compact=True`. `split` is the bipartite split order (`dymu.SPLITS`:
"official", DyMU's, by default; "slot" as an ablation).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionModel

from ..dymu import (
    MergeState,
    attention_bias,
    bipartite_scores,
    check_split,
    merge_tokens,
    place_tokens,
    threshold_merge_mask,
)
from ..dymu import (
    compact as compact_slots,
)

__all__ = [
    "DymuImageFeatures",
    "VisionParts",
    "clip_layer_attention",
    "clip_layer_attention_qk",
    "clip_layer_mlp",
    "dymu_image_features",
    "merging_vision_forward",
    "plain_read_layers",
    "ReadLayerStates",
    "signatures_match",
    "vision_fingerprint",
    "vision_signature",
    "vision_parts",
    "vision_reads",
    "window_image_features",
    "VisionReads",
    "project_features",
    "cls_attention_row",
]

# select(layer_index, node_max [B, N], state) -> merge mask [B, N] bool
MergeSelector = Callable[[int, torch.Tensor, MergeState], torch.Tensor]


@dataclass(frozen=True)
class VisionParts:
    """The modules of a llava-hf LLaVA's CLIP tower that the merging loop drives."""

    embeddings: nn.Module  # CLIPVisionEmbeddings: pixel_values -> [B, 1 + P, C] (CLS first)
    pre_layernorm: nn.LayerNorm
    layers: list[CLIPEncoderLayer]  # only the layers LLaVA reads, in order
    tower_layers: int  # all layers of the tower (DyMU's schedules spread r_total over every one)
    projector: nn.Module  # LlavaMultiModalProjector, per token
    grid_width: int  # patches per row (24 for 336 px / 14 px)
    num_patches: int
    prefix: int  # tokens before the patches (CLS): 1


def read_blocks(vision_feature_layer: int, blocks: int) -> int:
    """How many of the tower's `blocks` CLIP layers LLaVA reads: hidden_states[k] is the input of
    layer k (k = 0: the embeddings after pre_layrnorm), so hidden_states[layer] is the output of
    the first `read_blocks` layers."""
    return vision_feature_layer if vision_feature_layer >= 0 else blocks + 1 + vision_feature_layer


def vision_parts(model: LlavaForConditionalGeneration, user: str = "DyMU merging") -> VisionParts:
    """The CLIP tower's parts; refuses, naming `user` (what needs them), a layout it cannot read."""
    tower = model.model.vision_tower
    if not isinstance(tower, CLIPVisionModel):
        raise TypeError(f"{user} supports a CLIPVisionModel vision tower, found {type(tower).__name__}")
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError(f"{user} needs a single vision_feature_layer, found {layer!r}")
    if model.config.vision_feature_select_strategy != "default":
        raise NotImplementedError(
            f"{user} supports vision_feature_select_strategy='default' (CLS dropped), "
            f"found {model.config.vision_feature_select_strategy!r}"
        )
    all_layers = list(tower.encoder.layers)
    used = read_blocks(layer, len(all_layers))
    if not 1 <= used <= len(all_layers):
        raise ValueError(f"vision_feature_layer={layer} selects no CLIP layer output ({len(all_layers)} layers)")
    config = tower.config
    grid_width = config.image_size // config.patch_size
    return VisionParts(
        embeddings=tower.embeddings,
        pre_layernorm=tower.pre_layrnorm,
        layers=all_layers[:used],
        tower_layers=len(all_layers),
        projector=model.model.multi_modal_projector,
        grid_width=grid_width,
        num_patches=grid_width * grid_width,
        prefix=1,
    )


def clip_layer_attention(
    layer: CLIPEncoderLayer, hidden_states: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention half of a CLIPEncoderLayer under an additive SDPA mask (proportional attention).

    hidden_states: [B, N, C]; bias: [B, 1, 1 or N, N] added to the scaled logits, or None. Returns
    (hidden states after the residual add, merge metric [B, N, head_dim] = keys averaged over heads).
    """
    hidden_states, _, keys = clip_layer_attention_qk(layer, hidden_states, bias)
    return hidden_states, keys.mean(dim=1)


def clip_layer_attention_qk(
    layer: CLIPEncoderLayer, hidden_states: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`clip_layer_attention`, returning (hidden states after the residual add, queries [B, H, N, d],
    keys [B, H, N, d]) so that a caller can score from the same projections."""
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    head_shape = (batch, length, attention.num_heads, attention.head_dim)
    normed = layer.layer_norm1(hidden_states)
    queries = attention.q_proj(normed).view(head_shape).transpose(1, 2)
    keys = attention.k_proj(normed).view(head_shape).transpose(1, 2)
    values = attention.v_proj(normed).view(head_shape).transpose(1, 2)
    output = torch.nn.functional.scaled_dot_product_attention(
        queries, keys, values, attn_mask=bias, scale=attention.scale, dropout_p=attention.dropout if layer.training else 0.0
    )
    output = attention.out_proj(output.transpose(1, 2).reshape(batch, length, -1))
    return hidden_states + output, queries, keys


def clip_layer_mlp(layer: CLIPEncoderLayer, hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))


def merging_vision_forward(
    model: LlavaForConditionalGeneration,
    pixel_values: torch.Tensor,
    select: MergeSelector | None,
    compact: bool = False,
    split: str = "official",
) -> tuple[torch.Tensor, MergeState, VisionParts]:
    """Run the CLIP layers LLaVA reads, merging after each attention with `select`'s mask.

    select None: a plain loop (no scores, no bias, no merging; a timing baseline). compact: after
    each merge, drop invalid slots down to the batch's longest image (one host read per layer).
    split: the bipartite split order (`dymu.SPLITS`). Returns (hidden states of the read layer
    [B, N, C], merge state, parts).
    """
    check_split(split)
    parts = vision_parts(model)
    dtype = parts.embeddings.patch_embedding.weight.dtype
    hidden_states = parts.pre_layernorm(parts.embeddings(pixel_values.to(dtype)))
    batch, tokens, _ = hidden_states.shape
    state = MergeState.initial(batch, tokens, hidden_states.device)
    if select is None:
        return plain_read_layers(parts, hidden_states).hidden_states, state, parts
    for index, layer in enumerate(parts.layers):
        bias = attention_bias(state, hidden_states.dtype) if index > 0 else None
        hidden_states, metric = clip_layer_attention(layer, hidden_states, bias)
        node_max, node_idx = bipartite_scores(metric, state.valid, state.order, protected=parts.prefix)
        merge = select(index, node_max, state)
        hidden_states, state = merge_tokens(hidden_states, state, merge, node_idx, split)
        if compact:
            hidden_states, state = compact_slots(hidden_states, state)
        hidden_states = clip_layer_mlp(layer, hidden_states)
    return hidden_states, state, parts


@dataclass
class ReadLayerStates:
    """The plain (unmerged) CLIP loop's output: hidden_states [B, N, C] of the layer LLaVA reads
    (CLS included), and that layer's queries and keys [B, H, N, d], for the methods that score with them."""

    hidden_states: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor


def plain_read_layers(parts: VisionParts, hidden_states: torch.Tensor) -> ReadLayerStates:
    """The CLIP layers LLaVA reads, unmasked SDPA, from the embedded tokens [B, N, C] (after
    pre_layrnorm); the one loop shared by merging's baseline, the CLS-reading methods and windows."""
    for layer in parts.layers:
        hidden_states, queries, keys = clip_layer_attention_qk(layer, hidden_states, None)
        hidden_states = clip_layer_mlp(layer, hidden_states)
    return ReadLayerStates(hidden_states, queries, keys)


@dataclass
class DymuImageFeatures:
    """Merged image features on the patch grid (CLS excluded), P = 576 for LLaVA-1.5.

    features: [num_images, P, text_hidden], the projected feature of each surviving token at the
        slot of its representative patch, zeros elsewhere.
    valid: [num_images, P] bool, the slot holds a surviving token.
    sizes: [num_images, P] long, patches covered by the token at that slot (0 where invalid); each
        row sums to P.
    coverage: [num_images, P] long, for every patch the slot of the token that covers it (for
        virtual unmerging or visualisation).
    num_tokens: [num_images] long, surviving tokens per image (valid.sum(1)).
    """

    features: torch.Tensor
    valid: torch.Tensor
    sizes: torch.Tensor
    coverage: torch.Tensor
    num_tokens: torch.Tensor


def dymu_image_features(
    model: LlavaForConditionalGeneration,
    pixel_values: torch.Tensor,
    thresholds: torch.Tensor,
    compact: bool = False,
    split: str = "official",
) -> DymuImageFeatures:
    """DyMU's merged visual tokens for LLaVA: thresholds [num_merging_layers] float (+inf = never merge).

    With every threshold +inf this equals `model.model.get_image_features` (all slots valid, sizes 1).
    No host syncs unless `compact` (which physically drops merged tokens after each layer). split:
    the bipartite split order (`dymu.SPLITS`), which should be the one the thresholds were
    calibrated with.
    """
    parts = vision_parts(model)
    if thresholds.dim() != 1 or thresholds.shape[0] != len(parts.layers):
        raise ValueError(
            f"thresholds must be a 1-D tensor of {len(parts.layers)} values (one per CLIP layer up to the one "
            f"LLaVA reads), got shape {tuple(thresholds.shape)}"
        )
    hidden_device = parts.embeddings.patch_embedding.weight.device
    thresholds = thresholds.to(device=hidden_device, dtype=torch.float32)

    def select(index: int, node_max: torch.Tensor, state: MergeState) -> torch.Tensor:
        return threshold_merge_mask(node_max, thresholds[index])

    hidden_states, state, parts = merging_vision_forward(model, pixel_values, select, compact=compact, split=split)
    placed = place_tokens(state, parts.grid_width, parts.prefix)
    projected = parts.projector(hidden_states[:, parts.prefix:])  # [B, slots - prefix, text_hidden]
    gather_at = (placed.slot - parts.prefix).clamp_min(0)
    features = projected.gather(1, gather_at[..., None].expand(-1, -1, projected.shape[-1]))
    features = features.masked_fill(~placed.valid[..., None], 0.0)
    return DymuImageFeatures(
        features=features,
        valid=placed.valid,
        sizes=placed.sizes,
        coverage=placed.coverage,
        num_tokens=placed.valid.sum(dim=1),
    )


@dataclass
class VisionReads:
    """What the methods acting on the CLIP tower read, from the layer LLaVA reads (CLS dropped).

    features: [N, P, C] that layer's output at the patches (what stock LLaVA projects).
    cls_attention: [N, P] float32 (float64 for a float64 model), the CLS query's attention probabilities over the patch keys in
        that layer, averaged over heads (softmax over all 1 + P keys), or None when not asked.
    keys: [N, P, head_dim] that layer's keys at the patches, averaged over heads, or None.
    """

    features: torch.Tensor
    cls_attention: torch.Tensor | None
    keys: torch.Tensor | None


def cls_attention_row(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H, N, d] queries and keys -> [B, N] float32: the CLS (first) query's softmax row,
    averaged over heads. One row from the layer's own projections: CLIP under SDPA returns no
    attention weights, and eager attention would build all N x N rows."""
    work = torch.promote_types(queries.dtype, torch.float32)
    logits = torch.matmul(queries[:, :, :1].to(work), keys.to(work).transpose(-1, -2)) * scale  # [B, H, 1, N]
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def vision_reads(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor, attention: bool) -> VisionReads:
    """Run the CLIP layers LLaVA reads (SDPA, not the unused last layer) and return their output at
    the patches, plus, when `attention`, the CLS row and the keys of the read layer."""
    parts = vision_parts(model)
    dtype = parts.embeddings.patch_embedding.weight.dtype
    read = plain_read_layers(parts, parts.pre_layernorm(parts.embeddings(pixel_values.to(dtype))))
    cls_attention = patch_keys = None
    if attention:
        cls_attention = cls_attention_row(read.queries, read.keys, parts.layers[-1].self_attn.scale)[:, parts.prefix :]
        patch_keys = read.keys.mean(dim=1)[:, parts.prefix :]
    return VisionReads(read.hidden_states[:, parts.prefix :], cls_attention, patch_keys)


def project_features(model: LlavaForConditionalGeneration, features: torch.Tensor) -> torch.Tensor:
    """LLaVA's projector on CLIP features [..., C] -> [..., text_hidden]."""
    return model.model.multi_modal_projector(features)


FINGERPRINT_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


# Which vision weights a threshold file's fingerprint and signature cover (its model's "weights"):
# every weight the merging reads, since a layer's keys depend on all the layers before it; files
# written before this was recorded cover only the embeddings and each layer's q/k path.
READ_LAYERS = "read_layers"
MERGING_KEYS = "merging_keys"  # the older files' coverage, still read
WEIGHT_COVERAGES = (READ_LAYERS, MERGING_KEYS)


def fingerprinted_weights(model: LlavaForConditionalGeneration, coverage: str = READ_LAYERS) -> list[tuple[str, torch.Tensor]]:
    """The vision weights a fingerprint covers: embeddings, pre-norm, and every weight of every layer
    LLaVA reads (READ_LAYERS); or, for older files, only layer_norm1 and the q/k projections of each
    (MERGING_KEYS), which a tower differing in an earlier layer's v/o projections or MLP passed."""
    parts = vision_parts(model)
    tensors: list[tuple[str, torch.Tensor]] = [
        ("class_embedding", parts.embeddings.class_embedding),
        ("patch_embedding", parts.embeddings.patch_embedding.weight),
        ("position_embedding", parts.embeddings.position_embedding.weight),
        ("pre_layernorm.weight", parts.pre_layernorm.weight),
        ("pre_layernorm.bias", parts.pre_layernorm.bias),
    ]
    for index, layer in enumerate(parts.layers):
        if coverage == READ_LAYERS:
            tensors += [(f"{index}.{name}", tensor) for name, tensor in layer.named_parameters()]
            continue
        tensors += [
            (f"{index}.layer_norm1.weight", layer.layer_norm1.weight),
            (f"{index}.layer_norm1.bias", layer.layer_norm1.bias),
            (f"{index}.k_proj.weight", layer.self_attn.k_proj.weight),
            (f"{index}.k_proj.bias", layer.self_attn.k_proj.bias),
            (f"{index}.q_proj.weight", layer.self_attn.q_proj.weight),
        ]
    return tensors


def tower_shape_tag(vision: dict, merging_layers: int) -> str:
    """The shape part of a fingerprint ('clip-h1024-l24-a16-i336-p14-read23'), from a vision config's
    fields: what a threshold file and a checkpoint's config.json can be compared by before loading."""
    shape = "clip-h{hidden_size}-l{num_hidden_layers}-a{num_attention_heads}-i{image_size}-p{patch_size}".format(**vision)
    return f"{shape}-read{merging_layers}"


def vision_fingerprint(model: LlavaForConditionalGeneration, coverage: str = READ_LAYERS) -> dict:
    """Identify the vision tower thresholds were calibrated on: config fields, the layer LLaVA reads,
    and a SHA-256 over `fingerprinted_weights` rounded to bfloat16 on the CPU. The same checkpoint
    loaded in float32 or bfloat16 gives the same digest; loaded in float16 it need not (float32 ->
    float16 -> bfloat16 rounds twice), which `vision_signature` covers. (Host syncs: not for forwards.)"""
    parts = vision_parts(model)
    config = model.model.vision_tower.config
    fields = {name: getattr(config, name, None) for name in FINGERPRINT_CONFIG_FIELDS}
    fields["vision_feature_layer"] = model.config.vision_feature_layer
    fields["vision_feature_select_strategy"] = model.config.vision_feature_select_strategy
    fields["merging_layers"] = len(parts.layers)
    digest = hashlib.sha256()
    for name, tensor in fingerprinted_weights(model, coverage):
        data = tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
        digest.update(name.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
    fingerprint = f"{tower_shape_tag(fields, fields['merging_layers'])}-sha256:{digest.hexdigest()[:20]}"
    name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "(unnamed model)"
    identity = {"name": str(name), "fingerprint": fingerprint, "config": fields}
    return identity | ({"weights": coverage} if coverage != MERGING_KEYS else {})


SIGNATURE_PROJECTIONS = 16  # a weight nudged by 5% of its spread still lands within tolerance on ~31% of them
# of a weight's RMS: bfloat16 rounding (up to 2^-8 of each value) moves a projection by about 2e-3
# of it (one standard deviation: the values' errors average out), other weights by about the RMS itself
SIGNATURE_TOLERANCE = 2e-2


def _hashed_indices(count: int) -> torch.Tensor:
    """[count] int64: a fixed 32-bit integer hash of each index. Plain integer arithmetic, so no torch
    or numpy release can change it (a random stream could, and the files record its results)."""
    x = (torch.arange(count, dtype=torch.int64) * 2654435761 + 12345) % 2**32  # count < 2^31: no int64 overflow
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B % 2**32
    return (x >> 16) ^ x


def weight_signature(tensor: torch.Tensor) -> list[float]:
    """[RMS, then projections onto SIGNATURE_PROJECTIONS fixed +-1 directions (bits of
    `_hashed_indices`), scaled like the RMS] of a tensor, in float64 on the CPU: a summary that
    survives a change of float dtype. 8 significant digits are kept, far below the tolerance."""
    values = tensor.detach().to(device="cpu", dtype=torch.float64).flatten()
    if values.numel() == 0:
        return [0.0] * (1 + SIGNATURE_PROJECTIONS)
    hashed, scale = _hashed_indices(values.numel()), values.numel() ** -0.5
    projections = [float((values * (1 - 2 * ((hashed >> bit) & 1))).sum()) * scale for bit in range(SIGNATURE_PROJECTIONS)]
    return [float(f"{value:.8g}") for value in [float(values.pow(2).mean().sqrt()), *projections]]


def vision_signature(model: LlavaForConditionalGeneration, coverage: str = READ_LAYERS) -> dict[str, list[float]]:
    """`weight_signature` of every fingerprinted weight."""
    return {name: weight_signature(tensor) for name, tensor in fingerprinted_weights(model, coverage)}


def signatures_match(recorded, loaded: dict[str, list[float]]) -> bool:
    """Whether two vision signatures come from the same weights, up to float dtype rounding: every
    entry within SIGNATURE_TOLERANCE of the weight's RMS. Anything malformed does not match."""
    if not isinstance(recorded, dict) or recorded.keys() != loaded.keys():
        return False
    for name, mine in loaded.items():
        theirs = recorded[name]
        if not isinstance(theirs, list) or len(theirs) != len(mine) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in theirs):
            return False
        allowed = SIGNATURE_TOLERANCE * max(theirs[0], mine[0])
        if any(abs(a - b) > allowed for a, b in zip(theirs, mine)):
            return False
    return True


def window_image_features(model: LlavaForConditionalGeneration, pixel_windows: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
    """Projected features of image windows, each embedded at its place in the full patch grid.

    pixel_windows: [N, 3, h * patch, w * patch], cut from processed full images on patch borders;
    origins: [N, 2] long, the (row, column) patch of each window's top-left corner. Returns
    [N, h * w, text_hidden], the read layer's patch states through the projector. CLS keeps its own
    position embedding and the patches the full grid's at their places, so what the tower learns on
    windows (the testbed's cheap first training phase: 65 tokens instead of 577) is what it sees
    in a whole image.
    """
    parts = vision_parts(model)
    embeddings = parts.embeddings
    dtype = embeddings.patch_embedding.weight.dtype
    patches = embeddings.patch_embedding(pixel_windows.to(dtype))  # [N, C, h, w]
    batch, _, rows, columns = patches.shape
    grid_rows = origins[:, :1, None] + torch.arange(rows, device=origins.device)[None, :, None]  # [N, h, 1]
    grid_columns = origins[:, 1:, None] + torch.arange(columns, device=origins.device)[None, None, :]  # [N, 1, w]
    patch_positions = (parts.prefix + grid_rows * parts.grid_width + grid_columns).flatten(1)  # [N, h * w]
    positions = torch.cat([torch.zeros_like(patch_positions[:, :1]), patch_positions], dim=1)
    tokens = torch.cat([embeddings.class_embedding.expand(batch, 1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    read = plain_read_layers(parts, parts.pre_layernorm(tokens + embeddings.position_embedding(positions)))
    return parts.projector(read.hidden_states[:, parts.prefix :])
