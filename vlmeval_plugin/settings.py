"""Model names, what each one patches, where its results go, and where its checkpoint is.

Nothing here imports vlmeval or loads weights, so `run.py` can reject a bad name, a malformed
FASTV_K or a missing checkpoint in a second, before anything heavy happens.

Names and their fixed meaning:
    llava_v1.5_7b          the stock llava-hf model, nothing patched (FASTV_K / DYMU_THRESHOLDS ignored)
    llava_v1.5_7b_fastv    FastV only: FASTV_K (default 0.5 = prune half), FASTV_LAYER (default 2),
                           FASTV_SELECT (attention, or random: the random-selection baseline), SELECT_SEED
    llava_v1.5_7b_dymu     DyMU only: DYMU_THRESHOLDS required, DYMU_SPLIT (default official), FastV off
    llava_v1.5_7b_hybrid   DyMU + FastV: DYMU_THRESHOLDS required, DYMU_SPLIT, FASTV_K (default 0.5), FASTV_LAYER
    llava_v1.5_7b_pool     spatial pooling before layer 0: VISUAL_POOL (2, 3, 4 ...; default 2) or VISUAL_BUDGET, optional FASTV_K
    llava_v1.5_7b_random   random selection at FastV's layer: VISUAL_BUDGET or FASTV_K (default 0.5), SELECT_SEED
    llava_v1.5_7b_{visionzip,vispruner,divprune}
                           the method before the LLM: VISUAL_BUDGET (default 64, 64, 56), HYBRID_POSITIONS
    llava_v1.5_7b_{pdrop,sparsevlm,dart}
                           the method inside the LLM: VISUAL_BUDGET (pdrop: layer-averaged, default 64;
                           sparsevlm: one of its schedules 192 / 128 / 64, default 64;
                           dart: kept after FASTV_LAYER, default 128, DART_QUOTA, DART_PIVOTS), HYBRID_POSITIONS
    llava_testbed{,_fastv,_dymu,_hybrid,_pool,_random,_visionzip,_vispruner,_divprune,_pdrop,_sparsevlm,_dart}
                           the same on the testbed checkpoint (hybrid_vlm.testbed, shipped);
                           DYMU_THRESHOLDS may also be low / mid / high (its calibrated files; default mid)
    llava_next_vicuna_7b{,_fastv,_dymu,_hybrid,_random,_visionzip,_vispruner,_divprune,_pdrop,_dart}
    llava_next_mistral_7b{...}
                           the same (no _pool, no _sparsevlm) on llava-hf LLaVA-NeXT (v1.6, anyres) checkpoints;
                           pdrop's default VISUAL_BUDGET 0.11 of each packed span, dart's 320 (its official NeXT one);
                           _visionzip and _vispruner also read VISUAL_BUDGET_SCOPE (image, default; crop: the
                           budget in each anyres crop, as their official NeXT code counts it)
    Qwen2.5-VL-7B-Instruct{,_fastv,_random,_divprune,_pool,_pdrop,_dart}
                           Qwen/Qwen2.5-VL-7B-Instruct (VLMEvalKit's name): stock; FastV or random selection
                           (FASTV_K as a count per prompt or a fraction, FASTV_LAYER); DivPrune or pooling on
                           the merged 2x2 units (VISUAL_BUDGET, a count per image or a fraction; default 0.098
                           and 0.25); PyramidDrop (VISUAL_BUDGET layer-averaged, a count or a fraction; default
                           0.11) and DART (a count, or a fraction as its official Qwen code; default 0.222) on
                           each sample's span; kept tokens keep their original (t, h, w) ids
    llava_tiny_{fastv,dymu,pool,random,visionzip,vispruner,divprune,pdrop,sparsevlm,dart}
                           the methods on the tiny random LLaVA (the CPU methods sweep)
    llava_tiny             the bundled tiny random LLaVA, nothing patched (the exactness tests)
    llava_tiny_hybrid      the tiny LLaVA with a fixed hybrid setting (see tiny_hybrid_config)
    llava_tiny_dymu        the tiny LLaVA with DyMU alone (its mid thresholds unless DYMU_THRESHOLDS)

VLMEvalKit writes results to <work-dir>/<model name>/ and silently reuses whatever it finds there,
so every patched name runs under an effective name that carries its setting:
`llava_v1.5_7b_fastv__fastv-k72-l2`, `llava_v1.5_7b_hybrid__dymu-mid_fastv-r0.5-l2`, ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hybrid_vlm.config import PER_CROP_METHODS, HybridConfig, parse_fastv_layer, parse_fastv_select, parse_select_seed
from hybrid_vlm.hf_compat.loading import looks_like_hub_id
from hybrid_vlm.methods import check_budget, get_method, list_methods, methods_with_defaults
from hybrid_vlm.provenance import portable_path

CHECKPOINT_ID = "llava-hf/llava-1.5-7b-hf"
# family -> the llava-hf checkpoint its names load by default (VLMEvalKit's model paths)
FAMILY_CHECKPOINTS = {
    "llava_v1.5_7b": CHECKPOINT_ID,
    "llava_next_vicuna_7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava_next_mistral_7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    "Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-7B-Instruct",
}
NEXT_FAMILIES = ("llava_next_vicuna_7b", "llava_next_mistral_7b")
QWEN_FAMILIES = ("Qwen2.5-VL-7B-Instruct",)
MODEL_PATH_ENV = "HYBRID_VLM_MODEL_PATH"
DEFAULT_FASTV_K = 0.5  # FastV's published operating point: K=2, R=50%
DEFAULT_MAX_NEW_TOKENS = 2048  # VLMEvalKit's LLaVA wrapper; generation stops at </s> long before
TINY_MAX_NEW_TOKENS = 8  # the random tiny model rarely emits </s>: keep its runs fast
TESTBED_MAX_NEW_TOKENS = 64  # the testbed's longest reference caption is ~45 tokens
NAME_SEPARATOR = "__"  # between a registered name and its setting tag in the effective name
LLAVA_15_PATCHES = 576
# A method's plugin names and their default VISUAL_BUDGET come from its registration
# (`Method.default_budgets`, per model_type). On LLaVA-NeXT and Qwen2.5-VL, whose image token counts
# follow the image, most defaults are shares; the methods before the LLM take theirs of each image's
# patch tokens (on NeXT they drop the newlines, about 2% of a span, so they keep about 2% fewer).
CALIBRATE_HINT = "python -m hybrid_vlm.calibrate --model PATH --images DIR --target 192out --out FILE.json"


class PluginError(Exception):
    """A problem with the user's request (name, setting, checkpoint): printed, exit status 2."""


@dataclass(frozen=True)
class Variant:
    name: str
    fastv: bool  # reads FASTV_K / FASTV_LAYER / FASTV_SELECT
    dymu: bool  # needs DYMU_THRESHOLDS
    family: str = "llava_v1.5_7b"  # which checkpoint: LLaVA-1.5-7B, the bundled testbed, the tiny random model
    fixed_setting: bool = False  # patched with a setting of its own, not read from the environment
    pool: bool = False  # reads VISUAL_POOL (and FASTV_K, without a default)
    description: str = ""
    method: str | None = None  # a registered method before the LLM, or random: reads VISUAL_BUDGET

    @property
    def patched(self) -> bool:
        return self.fastv or self.dymu or self.pool or self.fixed_setting or self.method is not None

    @property
    def methods(self) -> tuple[str, ...]:
        """The VISUAL_METHOD values this name accepts (the name decides the method)."""
        if self.method is not None:
            return (self.method,)
        return tuple(name for name, on in (("fastv", self.fastv and not self.dymu), ("dymu", self.dymu and not self.fastv), ("pool", self.pool)) if on)

    @property
    def tiny(self) -> bool:
        return self.family == "tiny"

    @property
    def next(self) -> bool:
        """A LLaVA-NeXT (anyres) checkpoint: loaded as LlavaNextForConditionalGeneration."""
        return self.family in NEXT_FAMILIES

    @property
    def qwen(self) -> bool:
        """A Qwen2.5-VL checkpoint: loaded as Qwen2_5_VLForConditionalGeneration."""
        return self.family in QWEN_FAMILIES

    @property
    def model_type(self) -> str:
        """The `model_type` its checkpoint's config.json must declare."""
        return model_type_of(self.family)


def model_type_of(family: str) -> str:
    """The `model_type` of a family's checkpoints (the testbed and the tiny model are LLaVA-1.5s)."""
    return "qwen2_5_vl" if family in QWEN_FAMILIES else "llava_next" if family in NEXT_FAMILIES else "llava"


def qwen_variants(family: str) -> tuple[Variant, ...]:
    """Stock, FastV, random selection, and the methods with a Qwen2.5-VL default (those before the
    LLM on the merged 2x2 units, those inside it on each sample's span)."""
    def where(method: str) -> str:
        return "on the merged units" if get_method(method).before_llm else "inside the LLM on each sample's span"

    return (
        Variant(family, fastv=False, dymu=False, family=family, description=f"stock {family}, nothing patched"),
        Variant(f"{family}_fastv", fastv=True, dymu=False, family=family, description=f"{family}: FastV (FASTV_K, FASTV_LAYER, FASTV_SELECT)"),
        Variant(f"{family}_random", fastv=False, dymu=False, family=family, method="random",
                description=f"{family}: random selection at FastV's layer (VISUAL_BUDGET or FASTV_K, SELECT_SEED)"),
        *(Variant(f"{family}_{method}", fastv=False, dymu=False, family=family, method=method,
                  description=f"{family}: {method} {where(method)} (VISUAL_BUDGET, a count or a fraction)")
          for method in methods_with_defaults(model_type_of(family))),
    )


def _family_variants(prefix: str, family: str, what: str, pool: bool = True) -> tuple[Variant, ...]:
    variants = (
        Variant(prefix, fastv=False, dymu=False, family=family, description=f"{what}, nothing patched"),
        Variant(f"{prefix}_fastv", fastv=True, dymu=False, family=family, description=f"{what}: FastV (FASTV_K, FASTV_LAYER, FASTV_SELECT)"),
        Variant(f"{prefix}_dymu", fastv=False, dymu=True, family=family, description=f"{what}: DyMU (DYMU_THRESHOLDS)"),
        Variant(f"{prefix}_hybrid", fastv=True, dymu=True, family=family, description=f"{what}: DyMU + FastV"),
    )
    random = Variant(f"{prefix}_random", fastv=False, dymu=False, family=family, method="random",
                     description=f"{what}: random selection at FastV's layer (VISUAL_BUDGET or FASTV_K, SELECT_SEED)")
    if not pool:  # LLaVA-NeXT: pooling is not implemented for its unpadded crop grid
        return (*variants, random, *method_variants(prefix, family, what))
    return (
        *variants,
        Variant(f"{prefix}_pool", fastv=False, dymu=False, family=family, pool=True, description=f"{what}: spatial pooling (VISUAL_POOL or VISUAL_BUDGET)"),
        random,
        *method_variants(prefix, family, what),
    )


def method_variants(prefix: str, family: str, what: str) -> tuple[Variant, ...]:
    """A name per method with a default budget on the family's model type (`Method.default_budgets`)."""
    return tuple(
        Variant(f"{prefix}_{method}", fastv=False, dymu=False, family=family, method=method, description=f"{what}: {method} (VISUAL_BUDGET)")
        for method in methods_with_defaults(model_type_of(family))
    )


VARIANTS = {
    variant.name: variant
    for variant in (
        *_family_variants("llava_v1.5_7b", "llava_v1.5_7b", "stock llava-hf LLaVA-1.5-7B"),
        *_family_variants("llava_testbed", "testbed", "testbed checkpoint (hybrid_vlm/testbed)"),
        *_family_variants("llava_next_vicuna_7b", "llava_next_vicuna_7b", "stock llava-hf LLaVA-NeXT-Vicuna-7B", pool=False),
        *_family_variants("llava_next_mistral_7b", "llava_next_mistral_7b", "stock llava-hf LLaVA-NeXT-Mistral-7B", pool=False),
        *(variant for family in QWEN_FAMILIES for variant in qwen_variants(family)),
        Variant("llava_tiny", fastv=False, dymu=False, family="tiny", description="bundled tiny random LLaVA, nothing patched"),
        Variant("llava_tiny_hybrid", fastv=False, dymu=False, family="tiny", fixed_setting=True, description="bundled tiny random LLaVA, fixed hybrid"),
        Variant("llava_tiny_fastv", fastv=True, dymu=False, family="tiny", description="bundled tiny random LLaVA: FastV"),
        Variant("llava_tiny_dymu", fastv=False, dymu=True, family="tiny", description="bundled tiny random LLaVA: DyMU (its mid thresholds unless DYMU_THRESHOLDS)"),
        Variant("llava_tiny_pool", fastv=False, dymu=False, family="tiny", pool=True, description="bundled tiny random LLaVA: spatial pooling"),
        Variant("llava_tiny_random", fastv=False, dymu=False, family="tiny", method="random", description="bundled tiny random LLaVA: random selection"),
        *method_variants("llava_tiny", "tiny", "bundled tiny random LLaVA"),
    )
}
VANILLA_NAMES = tuple(name for name, variant in VARIANTS.items() if not variant.patched)
VANILLA = "llava_v1.5_7b"
TESTBED = "llava_testbed"
FAMILY_VANILLA = {"llava_v1.5_7b": VANILLA, "testbed": TESTBED, "tiny": "llava_tiny", **{family: family for family in NEXT_FAMILIES + QWEN_FAMILIES}}
DEFAULT_POOL = 2


def short_names(family: str = "llava_v1.5_7b") -> dict[str, str]:
    """The sweep's short forms of a family's names: vanilla, fastv, dymu, hybrid, pool."""
    vanilla = FAMILY_VANILLA[family]
    return {
        (name.removeprefix(vanilla + "_") if name != vanilla else "vanilla"): name
        for name, variant in VARIANTS.items()
        if variant.family == family
    }


def max_new_tokens_for(variant: Variant) -> int:
    return {"tiny": TINY_MAX_NEW_TOKENS, "testbed": TESTBED_MAX_NEW_TOKENS}.get(variant.family, DEFAULT_MAX_NEW_TOKENS)


def base_name(name: str) -> str:
    """The registered name inside an effective name (`llava_v1.5_7b_fastv__fastv-k72-l2` -> `llava_v1.5_7b_fastv`)."""
    return name.split(NAME_SEPARATOR)[0]


def setting_tag(name: str) -> str | None:
    """The setting part of an effective name, None for a bare registered name."""
    return name.split(NAME_SEPARATOR, 1)[1] if NAME_SEPARATOR in name else None


def tiny_hybrid_config() -> HybridConfig:
    """What "hybrid" means for the bundled tiny model: DyMU (its "mid" thresholds, calibrated once
    on synthetic images) and FastV pruning half of the merged tokens at layer 2."""
    from hybrid_vlm.tiny import ensure_tiny_thresholds

    return HybridConfig(fastv_k=0.5, fastv_layer=2, dymu=str(ensure_tiny_thresholds()))


TESTBED_LEVELS = ("low", "mid", "high")


def testbed_thresholds(level: str) -> Path:
    from hybrid_vlm.testbed import THRESHOLDS_DIR

    return THRESHOLDS_DIR / f"testbed-{level}.json"


def dymu_file(name: str, variant: Variant, env) -> str:
    """DYMU_THRESHOLDS as a file path; for the testbed also low / mid / high (default mid)."""
    dymu = env.get("DYMU_THRESHOLDS") or None
    if variant.family == "testbed" and (dymu is None or dymu in TESTBED_LEVELS):
        return str(testbed_thresholds(dymu or "mid"))
    if variant.tiny and dymu is None:
        from hybrid_vlm.tiny import ensure_tiny_thresholds

        return str(ensure_tiny_thresholds())
    if dymu is None:
        raise PluginError(f"{name} needs DYMU_THRESHOLDS=<threshold file>. Make one with:\n    {CALIBRATE_HINT}")
    if not Path(dymu).is_file():
        raise PluginError(f"DYMU_THRESHOLDS={dymu!r} is not a file. Make one with:\n    {CALIBRATE_HINT}")
    from hybrid_vlm.calibrate import read_threshold_payload

    try:
        read_threshold_payload(dymu)  # its shape, before any model loads (its model is checked at load)
    except ValueError as error:
        raise PluginError(f"DYMU_THRESHOLDS={dymu!r}: {error}") from None
    return dymu


# every environment setting some name reads; each name reads its own (`settings_read`) and ignores
# the others, so that one environment can drive a run of several names
NAME_SETTINGS = (
    "FASTV_K", "FASTV_LAYER", "FASTV_SELECT", "SELECT_SEED", "FASTV_NEWLINES", "VISUAL_POOL", "VISUAL_BUDGET",
    "DYMU_THRESHOLDS", "DYMU_SPLIT", "HYBRID_POSITIONS", "MASK_READ", "DART_QUOTA", "DART_PIVOTS", "VISUAL_BUDGET_SCOPE",
)


def settings_read(variant: Variant) -> list[str]:
    """The NAME_SETTINGS a name reads (VISUAL_METHOD aside: every name checks it against itself)."""
    if variant.fixed_setting or not variant.patched:
        return []
    reads = ["HYBRID_POSITIONS", "MASK_READ"]
    if variant.method is not None:
        reads += ["VISUAL_BUDGET"]
        if variant.method == "random":
            reads += ["FASTV_K", "FASTV_LAYER", "SELECT_SEED"] + (["FASTV_NEWLINES"] if variant.next else [])
        if variant.method != "random" and get_method(variant.method).prunes_at_layer:
            reads += ["FASTV_LAYER"]
        if variant.method == "dart":
            reads += ["DART_QUOTA", "DART_PIVOTS"]
        if variant.method in PER_CROP_METHODS and variant.next:
            reads += ["VISUAL_BUDGET_SCOPE"]
        return reads
    if variant.fastv or variant.pool:
        reads += ["FASTV_K", "FASTV_LAYER", "FASTV_SELECT", "SELECT_SEED"] + (["FASTV_NEWLINES"] if variant.next else [])
    if variant.dymu:
        reads += ["DYMU_THRESHOLDS", "DYMU_SPLIT"]
    if variant.pool:
        reads += ["VISUAL_POOL", "VISUAL_BUDGET"]
    if variant.fastv and not variant.dymu:
        reads += ["VISUAL_BUDGET"]
    return reads


# What each setting that can be read to no effect must parse as: a malformed one is refused even then
INERT_PARSERS = {"FASTV_LAYER": parse_fastv_layer, "FASTV_SELECT": parse_fastv_select, "SELECT_SEED": parse_select_seed}
POOL_WITHOUT_K = "a pooling name's FastV settings act only with FASTV_K"
SEED_WITHOUT_RANDOM = "a seed acts only with random selection (FASTV_SELECT=random)"


def inert_settings(variant: Variant, env) -> tuple[list[str], str]:
    """(the settings set in `env` that the name reads but that do nothing beside the others set,
    why): SELECT_SEED without random selection, and a pooling name's FastV settings without FASTV_K."""
    def given(key: str) -> str:
        return (env.get(key) or "").strip()

    if variant.pool and not variant.fastv and not given("FASTV_K"):
        inert, why = ["FASTV_LAYER", "FASTV_SELECT", "SELECT_SEED"], POOL_WITHOUT_K
    elif variant.method != "random" and "random" not in (given("FASTV_SELECT"), given("VISUAL_METHOD")):
        inert, why = ["SELECT_SEED"], SEED_WITHOUT_RANDOM
    else:
        inert, why = [], ""
    return [key for key in inert if key in settings_read(variant) and given(key)], why


def ignored_settings(name: str, environ=None) -> list[str]:
    """The NAME_SETTINGS set in the environment that the registered name `name` does not read, or
    reads to no effect (`inert_settings`). (VISUAL_BUDGET where a name reads none is refused
    instead, by `check_method_setting`.)"""
    env = os.environ if environ is None else environ
    variant = VARIANTS[name]
    read = set(settings_read(variant)) - set(inert_settings(variant, env)[0]) | {"VISUAL_BUDGET"}
    return [key for key in NAME_SETTINGS if key not in read and (env.get(key) or "").strip()]


def ignored_note(requested: str, effective: str, environ=None) -> str | None:
    """What run.py prints when the environment sets what the name `requested` does not read, or
    reads to no effect."""
    env = os.environ if environ is None else environ
    ignored = ignored_settings(base_name(requested), env)
    if not ignored:
        return None
    inert, why = inert_settings(VARIANTS[base_name(requested)], env)
    unread = [f"{key}={env[key]}" for key in ignored if key not in inert]
    idle = [f"{key}={env[key]}" for key in ignored if key in inert]
    parts = ([f"does not read {', '.join(unread)} (each name reads its own settings)"] if unread else []) + (
        [f"ignores {', '.join(idle)} ({why})"] if idle else [])
    setting = effective.partition(NAME_SEPARATOR)[2] or "stock"
    return f"{requested} {' and '.join(parts)}: it runs {setting}"


def checked_inert_settings(name: str, variant: Variant, env) -> list[str]:
    """`inert_settings`, each value parsed all the same: one that does nothing here is no licence
    for a malformed value."""
    inert = inert_settings(variant, env)[0]
    try:
        for key in inert:
            INERT_PARSERS[key](env[key])
    except ValueError as error:
        raise PluginError(f"{name}: {error}") from None
    return inert


def hybrid_config_for(name: str, environ=None) -> HybridConfig | None:
    """The engine setting of a registered name, read from the environment; None = nothing patched.

    Raises PluginError for an unknown name, a malformed FASTV_K/FASTV_LAYER/FASTV_SELECT/VISUAL_POOL
    or a missing DyMU file.
    """
    env = os.environ if environ is None else environ
    if name not in VARIANTS:
        raise PluginError(f"unknown model name {name!r}: the plugin registers {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    check_method_setting(name, variant, env)
    if variant.fixed_setting:
        return tiny_hybrid_config()
    if not variant.patched:
        return None
    if variant.method is not None:
        return method_config(name, variant, env)
    dymu = dymu_file(name, variant, env) if variant.dymu else None
    # Every name ignores the settings it does not read (`settings_read`) or reads to no effect
    # (`inert_settings`; run.py names both): the fastv name never turns DyMU or pooling on, the
    # dymu name never prunes. VISUAL_METHOD naming another method, or VISUAL_BUDGET on a name
    # without a budget, is refused instead (`check_method_setting`): the name decides the method.
    inert = checked_inert_settings(name, variant, env)
    read_env = {key: env[key] for key in settings_read(variant) if key in env and key != "DYMU_THRESHOLDS" and key not in inert}
    explicit = (env.get("VISUAL_METHOD") or "").strip()
    if read_env.get("VISUAL_BUDGET", "").strip() and explicit:
        read_env["VISUAL_METHOD"] = explicit  # a conflicting FASTV_SELECT is then refused
    elif read_env.get("VISUAL_BUDGET", "").strip():
        random = (read_env.get("FASTV_SELECT") or "").strip() == "random"
        read_env["VISUAL_METHOD"] = "pool" if variant.pool else "random" if random else "fastv"
        if not variant.pool:
            read_env.pop("FASTV_SELECT", None)
    defaults: dict = dict(dymu=dymu)
    if variant.fastv and not read_env.get("FASTV_K", "").strip() and "VISUAL_METHOD" not in read_env:
        defaults["fastv_k"] = DEFAULT_FASTV_K
    if variant.pool and not read_env.get("VISUAL_POOL", "").strip() and "VISUAL_METHOD" not in read_env:
        defaults["visual_pool"] = DEFAULT_POOL
    try:
        config = HybridConfig.from_env(read_env, **defaults)
        check_for_model(variant, config)
    except (ValueError, NotImplementedError) as error:
        raise PluginError(f"{name}: {error}") from None
    return config


def check_for_model(variant: Variant, config: HybridConfig) -> None:
    """What the name's model cannot run, refused before loading: Qwen2.5-VL's own limits; on
    LLaVA-1.5 a budget out of its 576 patches (LLaVA-NeXT's and Qwen's budgets are checked per image).
    The methods inside the LLM are checked once the model is loaded: a sweep over budgets then
    records the ones a method cannot reach rather than stopping at planning."""
    if variant.qwen:
        from hybrid_vlm.qwen import check_qwen_settings

        check_qwen_settings(config)
        return
    if config.pre_llm_method is not None and not variant.next:
        check_budget(get_method(config.pre_llm_method), config.visual_budget, LLAVA_15_PATCHES)
    if isinstance(config.fastv_k, int) and config.fastv_k > LLAVA_15_PATCHES and not variant.next:
        raise ValueError(f"FASTV_K={config.fastv_k} would keep more than LLaVA-1.5's {LLAVA_15_PATCHES} visual tokens, "
                         f"so nothing is pruned: use 0 to {LLAVA_15_PATCHES}, or a ratio in [0, 1)")
    budget = config.visual_budget if config.pre_llm_method is not None else None
    if isinstance(config.fastv_k, int) and isinstance(budget, int) and config.fastv_k >= budget:
        raise ValueError(f"FASTV_K={config.fastv_k} would keep all of the at most {budget} visual tokens VISUAL_BUDGET={budget} "
                         f"lets into the LLM, so nothing is pruned: use fewer than {budget}, or a ratio in [0, 1)")


def check_method_setting(name: str, variant: Variant, env) -> None:
    """The name decides the method: a VISUAL_METHOD naming another one is refused, and so is
    VISUAL_BUDGET on a name that reads FASTV_K or thresholds instead."""
    method = (env.get("VISUAL_METHOD") or "").strip()
    if method and method not in list_methods():
        raise PluginError(f"{name}: VISUAL_METHOD={method} is not a method (one of {', '.join(list_methods())}); "
                          "the name decides the method, so unset it")
    if method and method not in variant.methods:
        accepted = f"VISUAL_METHOD={variant.methods[0]} or unset" if variant.methods else "VISUAL_METHOD unset"
        raise PluginError(f"{name}: VISUAL_METHOD={method} conflicts with the name, which decides the method ({accepted}); "
                          f"use the name of that method instead, e.g. {FAMILY_VANILLA.get(variant.family, 'llava_v1.5_7b')}_{method}")
    budget = (env.get("VISUAL_BUDGET") or "").strip()
    if budget and variant.method is None and not (variant.pool or (variant.fastv and not variant.dymu)):
        raise PluginError(f"{name}: VISUAL_BUDGET does not apply to this name (it reads {'DYMU_THRESHOLDS' if variant.dymu else 'nothing'}); unset it")


def method_config(name: str, variant: Variant, env) -> HybridConfig:
    """A method name's setting: VISUAL_BUDGET (default: the method's published one), HYBRID_POSITIONS, MASK_READ;
    random also FASTV_K (instead of VISUAL_BUDGET), FASTV_LAYER and SELECT_SEED."""
    read_env = {key: env[key] for key in settings_read(variant) if key in env}
    read_env["VISUAL_METHOD"] = variant.method
    if not read_env.get("VISUAL_BUDGET", "").strip() and not read_env.get("FASTV_K", "").strip():
        if variant.method == "random":
            read_env["FASTV_K"] = str(DEFAULT_FASTV_K)
        else:
            read_env["VISUAL_BUDGET"] = str(get_method(variant.method).default_budgets[variant.model_type])
    try:
        config = HybridConfig.from_env(read_env)
        check_for_model(variant, config)
        return config
    except (ValueError, NotImplementedError) as error:
        raise PluginError(f"{name}: {error}") from None


def effective_name(name: str, config: HybridConfig | None) -> str:
    """The model name VLMEvalKit sees, and so the results folder: one per (name, setting)."""
    if config is None:
        return name
    return f"{name}{NAME_SEPARATOR}{config.describe()}"


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or (folder / "model.safetensors.index.json").is_file()
    )


def check_checkpoint_family(folder: Path, variant: Variant) -> None:
    """A LLaVA-1.5 name needs a `llava` checkpoint, a LLaVA-NeXT name a `llava_next` one, a Qwen2.5-VL
    name a `qwen2_5_vl` one (read from its config.json): loading one into another gives garbage or
    a confusing error."""
    saved, wanted = saved_config(folder), variant.model_type
    if saved is None:
        return
    found = saved.get("model_type")
    if found != wanted:
        raise PluginError(
            f"{variant.name} needs a {wanted} checkpoint, but {folder} is model_type {found!r}: "
            f"pass --model-path to a {wanted} checkpoint (or unset ${MODEL_PATH_ENV})"
        )


def check_llm_depth(folder: Path, config: HybridConfig | None) -> None:
    """FASTV_LAYER within the checkpoint's LLM (read from its config.json), before the model loads."""
    saved = saved_config(folder)
    if saved is None or config is None:
        return
    layers = saved.get("text_config", {}).get("num_hidden_layers", saved.get("num_hidden_layers"))
    if isinstance(layers, int):
        try:
            config.check_depth(layers)  # the engine's own check, as apply_hybrid runs it after loading
        except ValueError as error:
            raise PluginError(f"{error} ({portable_path(folder)})") from None


def check_thresholds_shape(folder: Path, config: HybridConfig | None) -> None:
    """DYMU_THRESHOLDS made for another tower shape, refused before the model loads (the weights'
    fingerprint is compared at load, after minutes for a 7B)."""
    saved = saved_config(folder)
    if saved is None or config is None or config.dymu is None:
        return
    from hybrid_vlm.calibrate import read_threshold_payload, shape_mismatch

    problem = shape_mismatch(read_threshold_payload(config.dymu), saved)
    if problem:
        raise PluginError(f"DYMU_THRESHOLDS={portable_path(config.dymu)} does not fit {portable_path(folder)}: {problem}. "
                          f"Calibrate for this checkpoint:\n    {CALIBRATE_HINT}")


def saved_config(folder: Path) -> dict | None:
    """A checkpoint's config.json; None where it cannot be read (transformers will say why at load)."""
    import json

    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def resolve_checkpoint(model_path: str | None = None, default_id: str = CHECKPOINT_ID) -> Path:
    """A local llava-hf checkpoint directory: `model_path`, else $HYBRID_VLM_MODEL_PATH, else the
    Hugging Face cache copy of `default_id` (llava-hf/llava-1.5-7b-hf). Nothing is downloaded.

    Raises PluginError saying where it looked and how to get the checkpoint.
    """
    requested = model_path or os.environ.get(MODEL_PATH_ENV) or default_id
    source = "--model-path" if model_path else (f"${MODEL_PATH_ENV}" if os.environ.get(MODEL_PATH_ENV) else "default")
    looked = []
    if looks_like_hub_id(requested):
        from huggingface_hub import constants, snapshot_download

        try:
            folder = Path(snapshot_download(requested, local_files_only=True))
            if _has_weights(folder):
                return folder
            looked.append(f"{folder} (incomplete snapshot: no config.json or no weights)")
        except Exception:  # LocalEntryNotFoundError and friends: nothing usable in the cache
            looked.append(f"the Hugging Face cache {constants.HF_HUB_CACHE} (no snapshot of {requested})")
    else:
        folder = Path(requested).expanduser()
        if _has_weights(folder):
            return folder
        reason = "does not exist" if not folder.exists() else "has no config.json or no weights"
        looked.append(f"{folder} ({reason})")
    repo = requested if looks_like_hub_id(requested) else default_id
    raise PluginError(
        f"no LLaVA checkpoint found for {source} {requested!r}. Looked in:\n"
        + "".join(f"    {place}\n" for place in looked)
        + "Get it with\n"
        + f"    hf download {repo}        (older huggingface_hub: huggingface-cli download {repo})\n"
        + f"or point --model-path / ${MODEL_PATH_ENV} at a local llava-hf checkpoint directory."
    )
