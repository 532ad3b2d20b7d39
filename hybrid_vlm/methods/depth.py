"""Stage layers of a multi-stage method on an LLM shallower or deeper than the one it was tuned on."""

from __future__ import annotations

OFFICIAL_DEPTH = 32  # LLaVA-1.5's Vicuna-7B, where PyramidDrop and SparseVLM set their layers


def scale_layers(official: tuple[int, ...], num_layers: int, method: str) -> tuple[int, ...]:
    """`official` layers on an LLM of `num_layers`: as they are on one as deep as 32 layers or deeper
    (both official codes keep their layers on LLaVA-1.5-13B's 40: SparseVLM hard-codes
    `pruning_loc=[2, 6, 15]`, PyramidDrop's 13B scripts pass its 7B `layer_list`); on a shallower
    one, scaled in proportion (rounded, then pushed up to stay strictly increasing and >= 1). An LLM
    too shallow for them is an error naming `method`."""
    if num_layers >= OFFICIAL_DEPTH:
        return official
    layers: list[int] = []
    for layer in official:
        layers.append(max(round(layer * num_layers / OFFICIAL_DEPTH), 1, layers[-1] + 1 if layers else 1))
    if layers[-1] >= num_layers:
        raise ValueError(f"{method} needs an LLM of at least {len(official) + 1} layers for its "
                         f"{len(official)} stages; this one has {num_layers}")
    return tuple(layers)
