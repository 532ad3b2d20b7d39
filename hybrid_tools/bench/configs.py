"""The bench's rows as settings: which configurations a command line asks for, and switching the
model between them (stock, the engine with nothing cut, FastV, the methods, DyMU, the hybrid)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from hybrid_vlm import HybridConfig, apply_hybrid, parse_fastv_k, remove_hybrid
from hybrid_vlm.config import fastv_k_for_budget
from hybrid_vlm.methods import get_method, list_methods, methods_at_a_layer


@dataclass
class BenchConfig:
    name: str
    method: str  # stock | vanilla | fastv | dymu | hybrid | a registered method (--methods)
    hybrid: object | None = None  # HybridConfig; None for the stock forward
    status: str = "ok"
    note: str = ""
    runs: list = field(default_factory=list)  # dicts of stage times (ms)
    counts: dict = field(default_factory=dict)
    kv_bytes_prompt: int | None = None  # what the cache holds after the prompt, measured
    row: dict = field(default_factory=dict)


BENCH_METHODS = tuple(name for name in list_methods() if get_method(name).budget_rule != "thresholds")  # DyMU: --dymu


LAYER_METHODS = methods_at_a_layer()  # the --methods that prune inside the LLM at FASTV_LAYER


def build_configs(args) -> list[BenchConfig]:
    """[stock], vanilla, FastV (k x layer x scoring x position mode), DyMU per threshold file, and
    hybrid = each DyMU file x each FastV setting; vanilla, FastV and --methods once per --mask-read."""

    fastv = [
        dict(fastv_k=parse_fastv_k(k), fastv_layer=layer, scoring=scoring, position_mode=mode)
        for k, layer, scoring, mode in product(args.fastv_k, args.fastv_layer, args.scoring, args.position_mode)
    ]
    settings = []
    for mask_read in args.mask_read:  # not DyMU's rows: a DyMU batch is never read (its merged slots may pad it)
        settings += [("vanilla", dict(mask_read=mask_read))] + [("fastv", dict(f, mask_read=mask_read)) for f in fastv]
        for method, budget, mode in product(args.methods, args.budgets, args.position_mode):
            for reads in method_read_settings(method, args):
                settings.append((method, dict(method_settings(method, budget, mode), **reads, mask_read=mask_read)))
    for dymu in args.dymu:
        settings += [("dymu", dict(dymu=dymu, position_mode=mode)) for mode in args.position_mode]
        settings += [("hybrid", dict(f, dymu=dymu)) for f in fastv]
    configs = [BenchConfig("stock", "stock")]
    seen = {c.name for c in configs}
    for method, kwargs in settings:
        hybrid = HybridConfig(**kwargs)
        if hybrid.describe() not in seen:
            seen.add(hybrid.describe())
            configs.append(BenchConfig(hybrid.describe(), method, hybrid))
    return configs


def method_read_settings(method: str, args) -> list[dict]:
    """One dict per row of a --methods entry: --fastv-layer for the methods that prune inside the
    LLM at a layer (fastv, random, dart), times --scoring for fastv; one empty dict otherwise."""
    layers = [dict(fastv_layer=layer) for layer in args.fastv_layer] if method in LAYER_METHODS else [{}]
    scorers = [dict(scoring=scoring) for scoring in args.scoring] if method == "fastv" else [{}]
    return [dict(**layer, **scorer) for layer, scorer in product(layers, scorers)]


def method_settings(method: str, budget: int | float, position_mode: str) -> dict:
    """A registered method at a budget, by its own rule: fastv and random keep `budget` after
    FASTV_LAYER (B; a kept share f is FASTV_K = 1 - f, as the plugin converts it); the methods before
    the LLM let `budget` in (A)."""
    if method in ("fastv", "random"):
        return dict(fastv_k=fastv_k_for_budget(budget), fastv_select="attention" if method == "fastv" else "random",
                    position_mode=position_mode)
    return dict(visual_method=method, visual_budget=budget, position_mode=position_mode)


def activate(model, config: BenchConfig):
    """Switch the (shared) model to this configuration's forward."""
    if config.hybrid is None:
        return remove_hybrid(model)
    return apply_hybrid(model, config.hybrid)


def prunes_nothing(config: BenchConfig) -> str | None:
    """A count FASTV_K above every sample's visual tokens would time the scoring with nothing pruned
    (run.py and the sweep refuse it on LLaVA-1.5 before loading; here the count is known once the
    input ran). Not with DyMU, whose merged count follows the image: a K above it is a setting too."""
    k, visual = getattr(config.hybrid, "fastv_k", None), max(config.counts["visual"])
    if getattr(config.hybrid, "dymu", None) is None and isinstance(k, int) and not isinstance(k, bool) and k > visual:
        return (f"K={k} (--fastv-k, or --budgets with --methods) is more than the {visual} visual tokens of this input, so nothing "
                f"is pruned: use 0 to {visual}, or a fraction pruned in [0, 1)")
    return None
