"""HybridConfig: what to cut, where, and how. Parsed from arguments or from the environment."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .baselines import SELECTIONS, pool_sides
from .dymu import SPLITS as DYMU_SPLITS
from .methods import get_method, is_budget, list_methods
from .methods.dart import PIVOT_ORDERS as DART_PIVOT_ORDERS

FASTV_K_FORMS = (
    "an integer n >= 0 (keep the n highest-scoring visual tokens per sample), "
    "a decimal in [0, 1) (prune that fraction of each sample's visual tokens, e.g. 0.7 removes 70%), "
    "or unset/empty for the default (no pruning for HybridConfig.from_env; 0.5 for run.py's FastV, random and "
    "hybrid names)"
)
POSITION_MODES = ("logical", "renumbered")
NEWLINE_RULES = ("prune", "keep")
SCORING_MODES = ("row", "eager")
DART_QUOTAS = ("official", "matched")
MASK_READS = ("never", "once")
BUDGET_SCOPES = ("image", "crop")
# the methods whose official LLaVA-NeXT code selects within each anyres crop (VisionZip@3151f6d,
# VisPruner@aefa01a: `llava_arch.py`); DivPrune's selects over the whole packed image
PER_CROP_METHODS = ("visionzip", "vispruner")


def parse_fastv_k(text: str | None) -> int | float | None:
    """Parse a FASTV_K setting. Integers keep top-n; decimals in [0, 1) prune that fraction."""
    if text is None or text.strip() == "":
        return None
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    if re.fullmatch(r"\d*\.\d+|\d+\.\d*", text):
        value = float(text)
        if 0.0 <= value < 1.0:
            return value
    raise ValueError(f"FASTV_K={text!r} is not valid: use {FASTV_K_FORMS}.")


def parse_fastv_layer(text: str | None) -> int:
    if text is None or text.strip() == "":
        return 2
    if re.fullmatch(r"\s*\d+\s*", text) and int(text) >= 1:
        return int(text)
    raise ValueError(
        f"FASTV_LAYER={text!r} is not valid: use an integer >= 1 (the first LLM layer that sees only kept tokens; "
        "scores come from the layer before it). Default 2."
    )


def parse_choice(name: str, text: str | None, choices: tuple[str, ...], usage: str) -> str:
    """One of `choices` (unset or empty: the first, the default), else a ValueError naming the
    setting, the value and `usage` (what is accepted)."""
    if text is None or text.strip() == "":
        return choices[0]
    if text.strip() in choices:
        return text.strip()
    raise ValueError(f"{name}={text!r} is not valid: use {usage}.")


def parse_dymu_split(text: str | None) -> str:
    return parse_choice(
        "DYMU_SPLIT", text, DYMU_SPLITS,
        f"one of {', '.join(DYMU_SPLITS)} (official: DyMU's split over the current token order, the default; "
        "slot: over the original patch order, an ablation)",
    )


def parse_fastv_select(text: str | None) -> str:
    return parse_choice(
        "FASTV_SELECT", text, SELECTIONS,
        "attention (FastV: the last prompt token's attention ranks the visual tokens, the default) or random "
        "(K visual tokens drawn at random per image, a baseline)",
    )


def parse_visual_pool(text: str | None) -> int | None:
    """VISUAL_POOL: unset for none, or the block side s ('2' or '2x2')."""
    if text is None or text.strip() == "":
        return None
    match = re.fullmatch(r"\s*(\d+)(?:x(\d+))?\s*", text)
    if match and (match.group(2) is None or match.group(2) == match.group(1)) and int(match.group(1)) in pool_sides():
        return int(match.group(1))
    raise ValueError(
        f"VISUAL_POOL={text!r} is not valid: use the side of square blocks that tile the 24 x 24 patch grid, "
        f"one of {', '.join(map(str, pool_sides()))} (or written 2x2, 3x3, ...), or unset for the default "
        "(no pooling for HybridConfig.from_env; 2 for run.py's _pool names)."
    )


def parse_fastv_newlines(text: str | None) -> str:
    return parse_choice(
        "FASTV_NEWLINES", text, NEWLINE_RULES,
        "prune (LLaVA-NeXT's newline tokens are FastV candidates like every visual token, the default) or keep "
        "(they are always kept and FASTV_K counts the other visual tokens)",
    )


SEED_LIMIT = 2**31  # baselines.slot_hash works modulo 2^31: seeds s and s + 2^31 draw alike, and larger ones overflow int64


def parse_select_seed(text: str | None) -> int:
    if text is None or text.strip() == "":
        return 0
    if re.fullmatch(r"\s*\d+\s*", text):
        return int(text)  # its range is checked with the other settings
    raise ValueError(f"SELECT_SEED={text!r} is not valid: use an integer in 0..{SEED_LIMIT - 1} (the seed of FASTV_SELECT=random). Default 0.")


VISUAL_BUDGET_FORMS = (
    "an integer n >= 1 (visual tokens per image, by the method's own budget rule; fastv and random: per "
    "prompt, as FASTV_K=n) or a decimal in (0, 1) (that fraction kept of each image's visual tokens, "
    "round(V * f); fastv and random: of each prompt's, as FASTV_K=1-f, FastV's round(V * (1 - R)), which "
    "can keep one token fewer or more where V * f is a half)"
)


def parse_visual_budget(text: str | None) -> int | float | None:
    if text is None or text.strip() == "":
        return None
    text = text.strip()
    if re.fullmatch(r"\d+", text) and int(text) >= 1:
        return int(text)
    if re.fullmatch(r"\d*\.\d+|\d+\.\d*", text) and 0.0 < float(text) < 1.0:
        return float(text)
    raise ValueError(f"VISUAL_BUDGET={text!r} is not valid: use {VISUAL_BUDGET_FORMS}.")


def fastv_k_for_budget(budget: int | float) -> int | float:
    """FASTV_K for a VISUAL_BUDGET of fastv or random: a count as it is, a kept share f as the pruned
    share 1 - f (FASTV_K's fraction is the share pruned)."""
    if isinstance(budget, int):
        return budget
    pruned = round(1.0 - budget, 9)
    if pruned >= 1.0:
        raise ValueError(f"VISUAL_BUDGET={budget} is too small a share for fastv and random: FASTV_K = 1 - {budget} rounds "
                         "to 1.0 at FastV's 9 decimals, pruning every visual token; use a share of at least 1e-9")
    return pruned


def method_settings(env, fastv_k: int | float | None) -> dict:
    """VISUAL_METHOD / VISUAL_BUDGET as engine settings: fastv and random set FastV's K (rule B: kept
    after FASTV_LAYER), the methods before the LLM their own budget (rule A: entering the LLM), dymu
    reads DYMU_THRESHOLDS. A conflicting FASTV_K or FASTV_SELECT is refused, not overridden."""
    name = (env.get("VISUAL_METHOD") or "").strip()
    budget = parse_visual_budget(env.get("VISUAL_BUDGET"))
    if not name:
        if budget is not None:
            raise ValueError(f"VISUAL_BUDGET={budget} needs VISUAL_METHOD (one of {', '.join(list_methods())}), or use FASTV_K for FastV.")
        return {}
    method = get_method(name)
    select = (env.get("FASTV_SELECT") or "").strip()
    if name in ("fastv", "random"):
        if select and select != ("attention" if name == "fastv" else "random"):
            raise ValueError(f"VISUAL_METHOD={name} conflicts with FASTV_SELECT={select}: unset FASTV_SELECT.")
        from_budget = None if budget is None else fastv_k_for_budget(budget)
        if from_budget is not None and fastv_k is not None and fastv_k != from_budget:
            raise ValueError(f"VISUAL_METHOD={name} VISUAL_BUDGET={budget} conflicts with FASTV_K={fastv_k}: set one of them.")
        k = from_budget if from_budget is not None else fastv_k
        if k is None:
            raise ValueError(f"VISUAL_METHOD={name} needs VISUAL_BUDGET (visual tokens kept after FASTV_LAYER) or FASTV_K.")
        return dict(fastv_k=k, fastv_select="attention" if name == "fastv" else "random")
    if method.budget_rule == "thresholds":
        if budget is not None:
            raise ValueError("VISUAL_BUDGET does not apply to VISUAL_METHOD=dymu: its token count is set by DYMU_THRESHOLDS.")
        if not env.get("DYMU_THRESHOLDS"):
            raise ValueError("VISUAL_METHOD=dymu needs DYMU_THRESHOLDS=<threshold file> (python -m hybrid_vlm.calibrate).")
        return {}
    if budget is None:
        rule = "layer-averaged visual tokens per image" if method.budget_rule == "C" else (
            "visual tokens per image kept after FASTV_LAYER" if method.inside_llm else "visual tokens per image entering the LLM")
        raise ValueError(f"VISUAL_METHOD={name} needs VISUAL_BUDGET ({rule}).")
    return dict(visual_method=name, visual_budget=budget)


def visual_keep_count(num_visual: int, fastv_k: int | float | None) -> int:
    """How many of `num_visual` visual tokens FastV keeps for one sample.

    A ratio keeps `round(V * (1 - R))` with Python's half-to-even rounding, as the official
    llava-hf FastV does (`topk(round(FASTV_image_token_length*(1-FASTV_r)))`): with DyMU's odd
    counts, V = 201 and R = 0.5 keep 100, not 101. `fastv.visual_keep_counts` is the same rule on
    device."""
    if fastv_k is None:
        return num_visual
    if isinstance(fastv_k, int):
        return min(fastv_k, num_visual)
    return min(num_visual, round(num_visual * (1.0 - fastv_k)))


def visual_keep_count_protecting(num_visual: int, protected: int, fastv_k: int | float | None) -> int:
    """`visual_keep_count` of a sample whose `protected` visual tokens (LLaVA-NeXT's newlines under
    FASTV_NEWLINES=keep) are always kept and not counted by the budget."""
    return visual_keep_count(num_visual - protected, fastv_k) + protected


@dataclass(frozen=True)
class HybridConfig:
    """Settings of the hybrid engine.

    fastv_k: None (no pruning), an int n >= 0 (keep top-n visual tokens per sample) or a float in
        [0, 1) (prune that fraction of each sample's visual tokens).
    fastv_layer: the first LLM layer that runs on kept tokens only; layer fastv_layer - 1 scores.
    position_mode: "logical" keeps every token's original position id (the design); "renumbered"
        gives kept tokens consecutive positions after pruning (an ablation only).
    scoring: "row" computes only the last prompt token's attention row beside SDPA (the design);
        "eager" materialises the scoring layer's full attention matrix (a speed ablation only).
    dymu: None, or the path of a DyMU threshold file (made by `python -m hybrid_vlm.calibrate`):
        merge visual tokens in the CLIP tower before they reach the LLM.
    dymu_split: DyMU's bipartite split order (see `hybrid_vlm.dymu`): "official" alternates A/B
        over the current token order as DyMU's code does (the default: DyMU as published);
        "slot" alternates over the original patch order (an ablation).
    fastv_select: "attention" (FastV) or "random": which K visual tokens the pruning keeps
        (`hybrid_vlm.baselines`); `select_seed` seeds the random draw.
    visual_pool: None, or s: average the 24 x 24 grid of image features in s x s blocks before
        layer 0, each pooled token at its block's central patch (a baseline; not with DyMU).
    fastv_newlines: LLaVA-NeXT's `image_newline` tokens under FastV: "prune" (candidates like every
        visual token, counted in the budget: the default) or "keep" (always kept, not counted; an
        ablation). No effect on LLaVA-1.5, which has none.
    visual_method, visual_budget: a registered method set by VISUAL_BUDGET (`hybrid_vlm.methods`):
        before the LLM (visionzip, vispruner, divprune, pool: tokens entering it, rule A) or inside
        it (dart at `fastv_layer`: tokens kept, rule B; pdrop at its stage layers: the layer-average,
        rule C). FastV and random selection are `fastv_k` / `fastv_select`; DyMU is `dymu`.
    dart_quota: "official" (4 + 8 * (budget // 8) kept, as published) or "matched" (exactly the budget).
    dart_pivots: "sorted" (pivots visited by position, no host sync) or "official" (CPython set order).
    budget_scope: what VISUAL_BUDGET counts on LLaVA-NeXT for visionzip and vispruner: "image" (one
        selection over each image's patch tokens, base image and unpadded grid together: the
        default, the rule of every other method) or "crop" (one selection per crop the tower sees,
        over that crop's patches the unpadded layout keeps, `budget` tokens each, as their
        official NeXT code counts it). Only those two methods, only on LLaVA-NeXT.
    mask_read: whether a batch of several prompts passed with an attention_mask may run SDPA without
        a mask. "never" (the default: no host sync) keeps the mask in every layer; "once" reads the
        mask on the host in a forward over an empty cache (one sync per prompt; stock transformers reads it in every forward)
        and, where it holds no padding, runs the mask-free path as for one prompt (flash on CUDA).
        Outputs are the same either way; only the SDPA kernels differ.
    """

    fastv_k: int | float | None = None
    fastv_layer: int = 2
    position_mode: str = "logical"
    scoring: str = "row"
    dymu: str | None = None
    dymu_split: str = "official"
    fastv_select: str = "attention"
    select_seed: int = 0
    visual_pool: int | None = None
    fastv_newlines: str = "prune"
    visual_method: str | None = None
    visual_budget: int | float | None = None
    dart_quota: str = "official"
    dart_pivots: str = "sorted"
    mask_read: str = "never"
    budget_scope: str = "image"

    def __post_init__(self) -> None:
        k = self.fastv_k
        valid_k = k is None or (
            not isinstance(k, bool)
            and ((isinstance(k, int) and k >= 0) or (isinstance(k, float) and 0.0 <= k < 1.0))
        )
        if not valid_k:
            raise ValueError(f"FASTV_K={k!r} is not valid: use {FASTV_K_FORMS}.")
        if isinstance(self.fastv_layer, bool) or not isinstance(self.fastv_layer, int) or self.fastv_layer < 1:
            raise ValueError(f"FASTV_LAYER={self.fastv_layer!r} is not valid: use an integer >= 1.")
        if isinstance(self.select_seed, bool) or not isinstance(self.select_seed, int) or not 0 <= self.select_seed < SEED_LIMIT:
            raise ValueError(f"SELECT_SEED={self.select_seed!r} is not valid: use an integer in 0..{SEED_LIMIT - 1}.")
        self._check_choices()
        if self.fastv_select == "random" and self.fastv_k is None:
            raise ValueError("FASTV_SELECT=random needs FASTV_K (how many visual tokens to keep at random).")
        if self.visual_pool is not None:
            if isinstance(self.visual_pool, bool) or self.visual_pool not in pool_sides():
                raise ValueError(f"VISUAL_POOL={self.visual_pool!r} is not valid: use one of {', '.join(map(str, pool_sides()))}.")
            if self.dymu is not None:
                raise ValueError("VISUAL_POOL and DYMU_THRESHOLDS cannot be combined: both decide the tokens entering layer 0.")
        if self.budget_scope == "crop" and self.visual_method not in PER_CROP_METHODS:
            raise ValueError(f"VISUAL_BUDGET_SCOPE=crop is the official LLaVA-NeXT budget rule of {' and '.join(PER_CROP_METHODS)} "
                             f"only (VISUAL_METHOD={self.visual_method or 'unset'}): unset it, or use one of them")
        budgeted = [name for name in list_methods() if get_method(name).budget_setting == "VISUAL_BUDGET"]
        if self.visual_method is not None:
            self._check_visual_method(budgeted)
        elif self.visual_budget is not None:
            raise ValueError(f"visual_budget={self.visual_budget!r} needs visual_method (one of {', '.join(budgeted)}).")

    def _check_choices(self) -> None:
        """Every setting that takes one of a few names, named as the environment spells it."""
        choices = dict(
            position_mode=("position_mode", POSITION_MODES), scoring=("scoring", SCORING_MODES),
            dymu_split=("DYMU_SPLIT", DYMU_SPLITS), fastv_select=("FASTV_SELECT", SELECTIONS),
            fastv_newlines=("FASTV_NEWLINES", NEWLINE_RULES), dart_quota=("DART_QUOTA", DART_QUOTAS),
            dart_pivots=("DART_PIVOTS", DART_PIVOT_ORDERS), mask_read=("MASK_READ", MASK_READS),
            budget_scope=("VISUAL_BUDGET_SCOPE", BUDGET_SCOPES),
        )
        for field, (setting, accepted) in choices.items():
            if getattr(self, field) not in accepted:
                raise ValueError(f"{setting}={getattr(self, field)!r} is not valid: use one of {', '.join(accepted)}.")

    def _check_visual_method(self, budgeted: list[str]) -> None:
        if self.visual_method not in budgeted:
            raise ValueError(f"visual_method={self.visual_method!r} is not valid: use one of {', '.join(budgeted)} "
                             "(fastv and random are fastv_k / fastv_select, DyMU is dymu).")
        budget = self.visual_budget
        if not is_budget(budget):
            raise ValueError(f"VISUAL_BUDGET={budget!r} is not valid for {self.visual_method}: use {VISUAL_BUDGET_FORMS}.")
        if get_method(self.visual_method).inside_llm:
            self._check_llm_method()
            return
        # Every method before the LLM scores the full patch grid (CLS attention, keys, features,
        # windows), which DyMU's merging has already changed, and its budget counts tokens out of it.
        if self.dymu is not None:
            raise ValueError(f"VISUAL_METHOD={self.visual_method} cannot follow DyMU (DYMU_THRESHOLDS): both decide the tokens "
                             "entering layer 0, and its budget and signal are defined on the unmerged patch grid.")
        if self.visual_pool is not None:
            raise ValueError(f"VISUAL_METHOD={self.visual_method} and VISUAL_POOL cannot be combined: use VISUAL_METHOD=pool VISUAL_BUDGET=N.")

    def _check_llm_method(self) -> None:
        """pdrop, sparsevlm and dart prune inside the LLM from every visual token: alone, for now."""
        others = dict(FASTV_K=self.fastv_k, DYMU_THRESHOLDS=self.dymu, VISUAL_POOL=self.visual_pool)
        given = [name for name, value in others.items() if value is not None]
        if isinstance(self.visual_budget, float) and self.visual_method == "sparsevlm":
            raise ValueError(f"VISUAL_BUDGET={self.visual_budget} is not valid for sparsevlm: it takes one of its schedules "
                             "(a count of visual tokens), not a fraction (pdrop's layer average and dart's quotas take either)")
        if given:
            raise ValueError(f"VISUAL_METHOD={self.visual_method} cannot be combined with {', '.join(given)}: it prunes "
                             "inside the LLM from every visual token on its own (unset them)")

    @property
    def pre_llm_method(self) -> str | None:
        """The registered method choosing the tokens that enter LLM layer 0, or None."""
        return self.visual_method if self.visual_method is not None and get_method(self.visual_method).before_llm else None

    @property
    def staged_method(self) -> str | None:
        """The VISUAL_BUDGET method pruning inside the LLM (pdrop, sparsevlm or dart), or None."""
        return self.visual_method if self.visual_method is not None and get_method(self.visual_method).inside_llm else None

    @property
    def prunes(self) -> bool:
        return self.llm_method is not None

    def check_depth(self, num_layers: int) -> None:
        """A ValueError where the pruning layer of a method that prunes at one (fastv, random, dart)
        is not inside an LLM of `num_layers` layers; pdrop's and sparsevlm's stage layers are checked
        by `check_stage_plan`, and they never read FASTV_LAYER."""
        if self.prunes and get_method(self.llm_method).prunes_at_layer and self.fastv_layer >= num_layers:
            raise ValueError(f"FASTV_LAYER={self.fastv_layer} is not valid: use 1..{num_layers - 1} for this {num_layers}-layer LLM")

    @property
    def llm_method(self) -> str | None:
        """The registered method pruning inside the LLM (fastv, random, dart, pdrop or sparsevlm), or None."""
        if self.staged_method is not None:
            return self.staged_method
        if self.fastv_k is None:
            return None
        return "fastv" if self.fastv_select == "attention" else "random"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> HybridConfig:
        """Read VISUAL_METHOD and VISUAL_BUDGET (`method_settings`), FASTV_K, FASTV_LAYER (default 2), FASTV_SELECT (attention | random), SELECT_SEED, FASTV_NEWLINES,
        VISUAL_POOL (a block side), DYMU_THRESHOLDS (a path), DYMU_SPLIT (official | slot, default
        official), HYBRID_POSITIONS (logical | renumbered, default logical), VISUAL_BUDGET_SCOPE (image |
        crop, default image) and MASK_READ (never | once, default never); keyword overrides win."""
        env = os.environ if environ is None else environ
        positions = (env.get("HYBRID_POSITIONS") or "logical").strip()
        if positions not in POSITION_MODES:
            raise ValueError(f"HYBRID_POSITIONS={positions!r} is not valid: use one of {', '.join(POSITION_MODES)}.")
        fastv_k = parse_fastv_k(env.get("FASTV_K"))
        values = dict(
            fastv_select=parse_fastv_select(env.get("FASTV_SELECT")),
            select_seed=parse_select_seed(env.get("SELECT_SEED")),
            visual_pool=parse_visual_pool(env.get("VISUAL_POOL")),
            fastv_k=fastv_k,
            fastv_layer=parse_fastv_layer(env.get("FASTV_LAYER")),
            fastv_newlines=parse_fastv_newlines(env.get("FASTV_NEWLINES")),
            dymu=env.get("DYMU_THRESHOLDS") or None,
            dymu_split=parse_dymu_split(env.get("DYMU_SPLIT")),
            position_mode=positions,
            dart_quota=parse_choice("DART_QUOTA", env.get("DART_QUOTA"), DART_QUOTAS,
                                    "official (4 + 8 * (budget // 8) kept, as published: the default) or matched (exactly the budget)"),
            dart_pivots=parse_choice("DART_PIVOTS", env.get("DART_PIVOTS"), DART_PIVOT_ORDERS,
                                     "sorted (pivots visited by position, no host sync: the default) or official (CPython set order, one host read)"),
            budget_scope=parse_choice("VISUAL_BUDGET_SCOPE", env.get("VISUAL_BUDGET_SCOPE"), BUDGET_SCOPES,
                                      "image (one selection over each image's patch tokens: the default) or crop (VISUAL_BUDGET "
                                      "tokens in each LLaVA-NeXT crop, visionzip and vispruner only, as their official code counts)"),
            mask_read=parse_choice("MASK_READ", env.get("MASK_READ"), MASK_READS,
                                   "never (a batch passed with an attention_mask keeps it in every layer, no host sync: the default) "
                                   "or once (the mask is read on the host once per prompt; an unpadded batch then runs SDPA without it)"),
        )
        values.update(method_settings(env, fastv_k))
        values.update(overrides)
        return cls(**values)

    def describe(self, num_layers: int | None = None) -> str:
        """A short, filesystem-safe tag naming this setting, e.g. 'fastv-k72-l2' or 'dymu-mid_fastv-r0.5-l2'
        (a non-default DyMU split adds e.g. 'dymu-mid_split-slot'). Given the LLM's depth, pdrop's tag
        names its stage layers, which scale with it: 'pdrop-b64-l2.8.16' on 32 layers, 'pdrop-b64-l1.4.8' on 16
        (sparsevlm's the same way: 'sparsevlm-b64-l3.7.16', the first layer after each scoring layer)."""
        parts = []
        if self.visual_method == "dart":
            quota = "" if self.dart_quota == "official" else f"-{self.dart_quota}"
            pivots = "" if self.dart_pivots == "sorted" else f"-pivots-{self.dart_pivots}"
            parts.append(f"dart{quota}-b{self.visual_budget}-l{self.fastv_layer}{pivots}")
        elif self.visual_method is not None and num_layers is not None and get_method(self.visual_method).stage_layers:
            layers = ".".join(map(str, get_method(self.visual_method).stage_layers(num_layers)))
            parts.append(f"{self.visual_method}-b{self.visual_budget}-l{layers}")
        elif self.visual_method is not None:
            layer = f"-l{self.fastv_layer}" if get_method(self.visual_method).prunes_at_layer else ""
            scope = "-per-crop" if self.budget_scope == "crop" else ""
            parts.append(f"{self.visual_method}-b{self.visual_budget}{layer}{scope}")
        if self.visual_pool is not None:
            parts.append(f"pool-{self.visual_pool}x{self.visual_pool}")
        if self.dymu is not None:
            parts.append("dymu-" + re.sub(r"[^A-Za-z0-9.-]+", "-", os.path.splitext(os.path.basename(self.dymu))[0]))
            if self.dymu_split != "official":
                parts.append(f"split-{self.dymu_split}")
        if self.fastv_k is not None:
            k = f"k{self.fastv_k}" if isinstance(self.fastv_k, int) else f"r{self.fastv_k}"  # every digit: no two settings share a folder
            method = "fastv" if self.fastv_select == "attention" else "random"
            seed = f"-s{self.select_seed}" if self.fastv_select == "random" and self.select_seed else ""
            parts.append(f"{method}-{k}-l{self.fastv_layer}{seed}")
            if self.fastv_newlines != "prune":
                parts.append(f"newlines-{self.fastv_newlines}")
        if self.position_mode != "logical":
            parts.append(self.position_mode)
        if self.scoring != "row":
            parts.append(f"scoring-{self.scoring}")
        tag = "_".join(parts) or "vanilla"
        return tag + (f"_mask-read-{self.mask_read}" if self.mask_read != "never" else "")
