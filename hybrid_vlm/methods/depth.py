"""Stage layers of a multi-stage method on an LLM shallower or deeper than the one it was tuned on."""

from __future__ import annotations

OFFICIAL_DEPTH = 32  # LLaVA-1.5's Vicuna-7B, where PyramidDrop and SparseVLM set their layers


def scale_layers(official: tuple[int, ...], num_layers: int, method: str) -> tuple[int, ...]:
    """`official` layers scaled to `num_layers` in proportion (rounded, then pushed up to stay
    strictly increasing and >= 1); an LLM too shallow for them is an error naming `method`."""
    layers: list[int] = []
    for layer in official:
        layers.append(max(round(layer * num_layers / OFFICIAL_DEPTH), 1, layers[-1] + 1 if layers else 1))
    if layers[-1] >= num_layers:
        raise ValueError(f"{method} needs an LLM of at least {len(official) + 1} layers for its "
                         f"{len(official)} stages; this one has {num_layers}")
    return tuple(layers)
