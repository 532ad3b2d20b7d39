"""PyramidDrop's schedule as pure functions: where its stages start, how many tokens each keeps,
and the one ratio lambda that meets a layer-averaged budget (rule C).

The official code keeps `int(V * lambda**s)` visual tokens from stage layer s on (truncation, not
rounding), at `layer_list = [2, 8, 16]` for the 32-layer LLaVA-1.5 when the budget is below its
default schedule's floor (maintainer, Cooperx521/PyramidDrop issue #29). The score at each stage
is the last instruction token's attention computed with that stage layer's own q and k on the
states before the drop (`hf_compat.layer_attention_row`); the engine applies it.
"""

from __future__ import annotations

from .depth import scale_layers

OFFICIAL_LAYERS = (2, 8, 16)  # stage starts for a 32-layer LLM
LAMBDA_STEP = 1000  # lambda is searched on a 0.001 grid, the precision the maintainer quotes


def stage_layers(num_layers: int) -> tuple[int, ...]:
    """The official stage layers scaled to `num_layers`; 32 layers give the official (2, 8, 16)."""
    return scale_layers(OFFICIAL_LAYERS, num_layers, "PyramidDrop")


def keep_counts(num_visual: int, ratio: float, num_stages: int) -> tuple[int, ...]:
    """Visual tokens kept from each stage layer on: int(V * ratio**s), s = 1..num_stages."""
    return tuple(int(num_visual * ratio**stage) for stage in range(1, num_stages + 1))


def layer_mean(num_visual: int, counts: tuple[int, ...], layers: tuple[int, ...], num_layers: int) -> float:
    """Visual tokens averaged over the LLM's layers (rule C) for a schedule."""
    starts, held = (0, *layers), (num_visual, *counts)
    ends = (*layers, num_layers)
    return sum((end - start) * tokens for start, end, tokens in zip(starts, ends, held)) / num_layers


def floor_budget(num_visual: int, layers: tuple[int, ...], num_layers: int) -> float:
    """The smallest layer-average any ratio reaches: every token before the first stage."""
    return layers[0] * num_visual / num_layers


def solve_ratio(budget: int | float, num_visual: int, num_layers: int, given: str | None = None) -> float:
    """The ratio on the 0.001 grid whose schedule's layer-average is nearest `budget` (the larger
    ratio on a tie). A budget outside what the schedule reaches is an error naming the range and
    the setting as the user gave it (`given`, e.g. a fraction)."""
    layers = stage_layers(num_layers)
    low, high = floor_budget(num_visual, layers, num_layers), float(num_visual)
    if not low < budget < high:
        setting = f"{budget:g}" if given is None else f"{given} ({budget:g} of {num_visual})"
        raise ValueError(f"VISUAL_BUDGET={setting} is not reachable by pdrop on this {num_layers}-layer LLM with "
                         f"{num_visual} visual tokens: its layer-average lies in ({low:g}, {high:g}) "
                         f"(stages at layers {list(layers)})")
    best = min(
        range(1, LAMBDA_STEP),
        key=lambda step: (abs(layer_mean(num_visual, keep_counts(num_visual, step / LAMBDA_STEP, len(layers)), layers, num_layers) - budget), -step),
    )
    return best / LAMBDA_STEP


def schedule(budget: int | float, num_visual: int, num_layers: int, given: str | None = None) -> dict[int, int]:
    """{stage layer: visual tokens kept from it on} for a layer-averaged budget: a count, or a
    fraction of the image's `num_visual` tokens (Qwen2.5-VL's count follows the resolution).
    given: the setting as the user wrote it, where it is not `budget` (a fraction is named as given)."""
    layers = stage_layers(num_layers)
    target = budget * num_visual if isinstance(budget, float) else budget
    given = str(budget) if isinstance(budget, float) else given
    return dict(zip(layers, keep_counts(num_visual, solve_ratio(target, num_visual, num_layers, given), len(layers))))


def check_fraction(budget: float, num_layers: int) -> None:
    """A fraction at or below the first stage's share (every token is held before it) is reachable
    on no image: refused before any forward."""
    floor = stage_layers(num_layers)[0] / num_layers
    if budget <= floor:
        raise ValueError(f"VISUAL_BUDGET={budget} is not reachable by pdrop on this {num_layers}-layer LLM: every visual token "
                         f"is held up to its first stage, so the layer-average share exceeds {floor:.4g}")
