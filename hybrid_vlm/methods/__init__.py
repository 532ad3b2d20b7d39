"""The registry of visual-token reduction methods: what each one is, where it acts, what it reads.

A method is a small policy registered by name. It declares, as data, its `Stage` (inside the CLIP
tower, before LLM layer 0, or inside the LLM at FASTV_LAYER), the `Read`s it needs, and its budget
rule (A: tokens entering the LLM; B: tokens kept after its layer). The engine computes only the
declared reads (an attention row from q.K^T, never an eager layer) and applies what a method
returns through one step:

- methods before the LLM return a typed `Selection` (kept slots per image, optional merged tokens
  and sizes); `selection.place_selection` lays it on the placeholder slots and
  `placement.place_images` drops the empty ones with the gather FastV's pruning uses;
- methods inside the LLM score the visual slots (`fastv`: the attention row; `random`: a hash) and
  the decoder loop's `prune` keeps the top of the budget;
- `dymu` merges inside the tower under calibrated thresholds (its own budget rule).

Methods never import a model: a model's adapter (`hybrid_vlm.adapters`) maps pixels to the reads
and lays the selection on its own slots. `list_methods()` names them; `get_method(name)` refuses an
unknown one with the list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch

from . import pdrop, sparsevlm
from .divprune import divprune_select
from .selection import Selection
from .visionzip import contextual_targets, visionzip_select, visionzip_split
from .vispruner import vispruner_select, vispruner_split


class Stage(str, Enum):
    VIT = "CLIP tower, read layer"
    PRE_LLM = "after the projector, before LLM layer 0"
    LLM = "inside the LLM, at FASTV_LAYER"
    LLM_STAGES = "inside the LLM, at several stage layers"
    VIT_LAYERS = "every CLIP layer LLaVA reads"


class Read(str, Enum):
    VIT_FEATURES = "CLIP features of the read layer"
    VIT_CLS_ATTENTION = "[CLS] attention row of the read CLIP layer"
    VIT_KEYS = "head-averaged keys of the read CLIP layer"
    PROJECTED_FEATURES = "projected visual features"
    LLM_ATTENTION_ROW = "last prompt token's attention row at layer FASTV_LAYER - 1"
    LLM_OWN_ATTENTION_ROW = "last prompt token's attention row from the stage layer's own q and k, before it runs"
    LLM_KEYS = "rotated keys of layer FASTV_LAYER - 1"
    LLM_NORMED_OUTPUTS = "outputs of layer FASTV_LAYER - 1 through the final norm"
    LLM_EMBEDDINGS = "the embeddings entering LLM layer 0"
    LLM_RATER_ROWS = "text raters' attention rows of the layer before each stage (full softmax, head mean)"
    LLM_OUTPUTS = "outputs of the layer before each stage (the states merged into recycled tokens)"
    PIXELS = "pixel values (a hash)"
    VIT_MERGE_KEYS = "keys of every CLIP layer (bipartite merging)"


@dataclass
class VisualReads:
    """The declared reads, per image, in patch order (P = the read layer's patches)."""

    vit_features: torch.Tensor | None = None  # [N, P, C_vit]
    cls_attention: torch.Tensor | None = None  # [N, P] float32
    vit_keys: torch.Tensor | None = None  # [N, P, head_dim]
    projected: torch.Tensor | None = None  # [N, P, hidden]
    grid: tuple[int, int] | None = None  # (rows, cols) of the P patches in raster order; None: a square grid


@dataclass(frozen=True)
class VitDims:
    """What the scoring-cost formulas need: patches P, CLIP width and heads, LLM width."""

    patches: int
    vit_hidden: int
    vit_heads: int
    text_hidden: int


@dataclass(frozen=True)
class Method:
    name: str
    stage: Stage
    reads: tuple[Read, ...]
    budget_rule: str  # "A" tokens entering the LLM, "B" kept after the layer, "C" layer-averaged, "thresholds" (DyMU)
    signal: str
    positions: str
    deviations: str
    select: Callable[[VisualReads, int], Selection] | None = None  # methods before the LLM
    scoring_macs: Callable[[int, VitDims], int] = lambda budget, dims: 0  # per selection, of dims.patches candidates (reads: read_macs)
    selects_projected: bool = False  # its Selection's tokens are in the LLM's space (else CLIP's)
    budget_setting: str = "VISUAL_BUDGET"  # what sets its budget: VISUAL_BUDGET, FASTV_K or DYMU_THRESHOLDS
    stage_layers: Callable[[int], tuple[int, ...]] | None = None  # a multi-stage method: its stage layers for an LLM depth
    # model_type (a checkpoint's config.json) -> the VISUAL_BUDGET its plugin name runs when none is
    # set: the method's published operating point on that model. A model type it has none for gives
    # the method no plugin name of its own on that model.
    default_budgets: Mapping[str, int | float] = field(default_factory=dict, hash=False)

    @property
    def before_llm(self) -> bool:
        return self.select is not None

    @property
    def inside_llm(self) -> bool:
        return self.stage in (Stage.LLM, Stage.LLM_STAGES)

    @property
    def prunes_at_layer(self) -> bool:
        """It prunes once, at FASTV_LAYER, which its setting therefore names (fastv, random, dart)."""
        return self.stage == Stage.LLM


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def list_methods() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def methods_with_defaults(model_type: str) -> tuple[str, ...]:
    """The methods with a default VISUAL_BUDGET on checkpoints of `model_type` ("llava", "llava_next",
    "qwen2_5_vl"): those a model's plugin names run by name."""
    return tuple(name for name, method in _REGISTRY.items() if model_type in method.default_budgets)


def methods_at_a_layer() -> tuple[str, ...]:
    """The methods that prune at FASTV_LAYER: their tags, folders and settings name the layer."""
    return tuple(name for name, method in _REGISTRY.items() if method.prunes_at_layer)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"VISUAL_METHOD={name!r} is not valid: use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def is_budget(value) -> bool:
    """A count >= 1 or a fraction in (0, 1): what VISUAL_BUDGET accepts."""
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0.0 < value < 1.0)


def budget_tokens(budget: int | float, available: int) -> int:
    """Visual tokens an image of `available` keeps under a VISUAL_BUDGET: a count as given (the
    caller refuses or caps one above `available`), a fraction `round(available * f)`, at least 1."""
    if isinstance(budget, float):
        return max(1, round(available * budget))
    return budget


def group_count(budget: int | float, available: int, per_crop: bool, method: Method, index: int) -> int:
    """Tokens one LLaVA-NeXT selection keeps out of its `available` patch tokens. Per image, a count
    above them is refused; per crop, a crop that unpadding left with fewer patches keeps them all
    (the official code would also pick among the padding patches, which have no slot here)."""
    count = budget_tokens(budget, available)
    if per_crop:
        return min(count, available)
    if count > available:
        raise ValueError(f"VISUAL_BUDGET={budget} is not reachable by {method.name} for the batch's image {index} (0-based, prompt by prompt): it packs "
                         f"{available} patch tokens (use a budget <= {available}, a fraction, or a larger image)")
    return count


def check_budget(method: Method, budget: int | float, patches: int) -> int:
    """The tokens per image of `patches` that `budget` asks of a method before the LLM; a budget it
    cannot reach is an error, never a silent rounding."""
    if method.budget_rule == "thresholds":
        raise ValueError(f"VISUAL_BUDGET does not apply to {method.name}: its token count is set by DYMU_THRESHOLDS "
                         "(calibrate with --target N to aim at N tokens)")
    count = budget_tokens(budget, patches) if is_budget(budget) else budget
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= patches:
        raise ValueError(f"VISUAL_BUDGET={budget!r} is not reachable by {method.name}: use an integer 1..{patches} "
                         f"(visual tokens per image of {patches} patches) or a fraction in (0, 1)")
    if method.name == "pool":
        from ..baselines import pool_shape

        try:
            pool_shape(count, round(patches**0.5))  # raises naming the budgets that tile the grid
        except ValueError as error:
            if count == budget:
                raise
            raise ValueError(f"VISUAL_BUDGET={budget} asks pool for {count} of {patches} patches: {error}") from None
    return count


# ----------------------------------------------------------------------------- scoring costs


def read_macs(method: Method, dims: VitDims) -> int:
    """MACs of a method's reads beyond the layers that run, per image the tower sees (a LLaVA-NeXT
    crop, whatever unpadding leaves of it): the read layer's [CLS] row, one query against every
    key, all heads. The scoring of a selection over the reads is `Method.scoring_macs`."""
    return (dims.patches + 1) * dims.vit_hidden if Read.VIT_CLS_ATTENTION in method.reads else 0


def visionzip_macs(budget: int, dims: VitDims) -> int:
    dominant, contextual = visionzip_split(budget)
    remaining = dims.patches - dominant
    head_dim = dims.vit_hidden // dims.vit_heads
    return remaining * contextual * (head_dim + dims.vit_hidden)  # similarities + member sums


def vispruner_macs(budget: int, dims: VitDims) -> int:
    total, residual, diverse = 0, dims.patches - vispruner_split(budget), budget - vispruner_split(budget)
    while diverse > 0 and (drop := min(8, residual - diverse)) > 0:
        total += ((residual + 1) // 2) * (residual // 2) * dims.vit_hidden
        residual -= min(drop, (residual + 1) // 2)
    return total


def divprune_macs(budget: int, dims: VitDims) -> int:
    return dims.patches * dims.patches * dims.text_hidden  # the cosine matrix; the greedy only compares


# --------------------------------------------------------------------------------- the methods

register(Method(
    name="fastv", stage=Stage.LLM, reads=(Read.LLM_ATTENTION_ROW,), budget_rule="B",
    signal="last prompt token's attention at layer K-1, head mean",
    positions="original ids (logical)",
    deviations="the attention row is computed from q.K^T beside SDPA, not an eager layer; batched, cache-correct",
    budget_setting="FASTV_K",
))
register(Method(
    name="random", stage=Stage.LLM, reads=(Read.PIXELS,), budget_rule="B",
    signal="a seeded hash of the image's pixels and the slot (SELECT_SEED)",
    positions="original ids (logical)",
    deviations="no official code; kept at FastV's layer so it isolates FastV's signal",
    budget_setting="FASTV_K",
))
register(Method(
    name="pool", stage=Stage.PRE_LLM, reads=(Read.PROJECTED_FEATURES,), budget_rule="A",
    signal="2-D average pooling of the projected patch grid (LLaVA's 24 x 24; Qwen2.5-VL's merged units), adaptive windows",
    positions="each window's central patch",
    deviations="no official code; windows as torch's adaptive_avg_pool2d",
    select=lambda reads, budget: _pool(reads, budget), selects_projected=True,
    # LLaVA-1.5 sets pooling by VISUAL_POOL (default 2); on Qwen2.5-VL a 2 x 2 share of the merged units
    default_budgets={"qwen2_5_vl": 0.25},
))
register(Method(
    name="visionzip", stage=Stage.VIT, reads=(Read.VIT_CLS_ATTENTION, Read.VIT_KEYS, Read.VIT_FEATURES), budget_rule="A",
    signal="[CLS] attention (dominant) + key-similarity merging (contextual) at the CLIP layer LLaVA reads",
    positions="dominant: own patch; contextual: its target patch",
    deviations="[CLS] not kept (llava-hf drops it); split round(N*10/64) contextual; fp32; lower index wins ties",
    select=lambda reads, budget: visionzip_select(reads.cls_attention, reads.vit_keys, reads.vit_features, *visionzip_split(budget)),
    scoring_macs=visionzip_macs,
    # the published 64 tokens; on LLaVA-NeXT the same share (64 of 576) of each image's patch tokens
    default_budgets={"llava": 64, "llava_next": 0.11},
))
register(Method(
    name="vispruner", stage=Stage.VIT, reads=(Read.VIT_CLS_ATTENTION, Read.VIT_FEATURES), budget_rule="A",
    signal="[CLS] attention (important) + iterative bipartite de-duplication of CLIP features (diverse)",
    positions="own patch",
    deviations="important ratio 0.75 at <= 64 tokens else 0.5; odd residuals allowed; fp32; stable sorts",
    select=lambda reads, budget: vispruner_select(reads.cls_attention, reads.vit_features, budget, vispruner_split(budget)),
    scoring_macs=vispruner_macs,
    default_budgets={"llava": 64, "llava_next": 0.11},  # as VisionZip: its published 64, as a share on NeXT
))
register(Method(
    name="divprune", stage=Stage.PRE_LLM, reads=(Read.PROJECTED_FEATURES,), budget_rule="A",
    signal="max-min diversity greedy on cosine distances of the projected features",
    positions="own patch",
    deviations="diagonal excluded explicitly and no token picked twice; fp32; lowest index wins ties; "
               "on LLaVA-NeXT the newlines are not candidates",
    select=lambda reads, budget: divprune_select(reads.projected, budget), scoring_macs=divprune_macs,
    selects_projected=True,
    # its published ratio 0.098 kept: 56 of LLaVA-1.5's 576, a share of each image elsewhere
    default_budgets={"llava": 56, "llava_next": 0.098, "qwen2_5_vl": 0.098},
))
register(Method(
    name="pdrop", stage=Stage.LLM_STAGES, reads=(Read.LLM_OWN_ATTENTION_ROW,), budget_rule="C",
    signal="last instruction token's attention from each stage layer's own q and k on the pre-drop states, head mean",
    positions="renumbered per stage (official); logical by default here, HYBRID_POSITIONS=renumbered for the official rule",
    deviations="one ratio solved on a 0.001 grid for the layer-average budget; stage layers [2, 8, 16] scaled to "
               "shallower LLMs; head mean in fp32; batched with left padding",
    stage_layers=pdrop.stage_layers,
    # the maintainers' recipe for 64 layer-averaged tokens; elsewhere that share (0.11) of each span,
    # since a LLaVA-1.5 count is out of its reach on LLaVA-NeXT's 1,200 to 2,900-token spans
    default_budgets={"llava": 64, "llava_next": 0.11, "qwen2_5_vl": 0.11},
))
register(Method(
    name="dart", stage=Stage.LLM, reads=(Read.LLM_KEYS, Read.LLM_NORMED_OUTPUTS), budget_rule="B",
    signal="4 image + 4 text pivots by the L1 norm of layer K-1's rotated keys; per pivot the least similar pool "
           "tokens (cosine of layer K-1's outputs through the final norm)",
    positions="original ids (logical, as official)",
    deviations="pivots visited in ascending position (DART_PIVOTS=official: CPython set order, a host sync); "
               "DART_QUOTA=official keeps 4 + 8 * (budget // 8), matched keeps the budget exactly; fp32; batched",
    # its README's LLaVA-1.5 setting (128, which keeps 132), its official NeXT one (retain 320) and its
    # official Qwen2.5-VL one (reduction_ratio 0.778: 0.222 kept, as int(L * 0.222 / 8) per pivot)
    default_budgets={"llava": 128, "llava_next": 320, "qwen2_5_vl": 0.222},
))
register(Method(
    name="sparsevlm", stage=Stage.LLM_STAGES, reads=(Read.LLM_EMBEDDINGS, Read.LLM_RATER_ROWS, Read.LLM_OUTPUTS), budget_rule="C",
    signal="attention of the text raters (chosen once from the layer-0 embeddings) at the layer before each stage, "
           "head mean, rater mean; the best 30% of the pruned merged into clusters by DPC-kNN (recycling)",
    positions="renumbered per stage (official); logical by default here (a cluster at its center's id), "
              "HYBRID_POSITIONS=renumbered for the official rule",
    deviations="v1.5 schedules (192/128/64 only) at layers [2, 6, 15] scaled to shallower LLMs; no density noise "
               "(deterministic: lower index wins ties); scores in fp32; only the text rows computed; batched",
    stage_layers=sparsevlm.stage_layers,
    default_budgets={"llava": 64},  # its v1.5 schedules are LLaVA-1.5's only
))
register(Method(
    name="dymu", stage=Stage.VIT_LAYERS, reads=(Read.VIT_MERGE_KEYS,), budget_rule="thresholds",
    signal="bipartite merging by key similarity above calibrated per-layer thresholds",
    positions="each merged token at its representative patch",
    deviations="see hybrid_vlm.dymu (batched with static shapes; split order as official)",
    budget_setting="DYMU_THRESHOLDS",
))


def _pool(reads: VisualReads, budget: int) -> Selection:
    from ..baselines import pool_selection

    return pool_selection(reads.projected, budget, reads.grid)


__all__ = [
    "Method", "Read", "Selection", "Stage", "VisualReads", "VitDims", "budget_tokens", "check_budget", "contextual_targets",
    "group_count",
    "is_budget",
    "get_method", "list_methods", "methods_at_a_layer", "methods_with_defaults", "read_macs", "register",
]
