"""Floors: what a dataset's metric gives a model that never looks at the image, read from
`hybrid_tools.blind_baselines` and `hybrid_tools.caption_baseline` files, and which configurations
score at or below them."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .markdown import Linker, fmt


@dataclass(frozen=True)
class Floor:
    what: str
    value: float  # in the dataset's main metric's unit (MCQ %, CIDEr x100)
    source: Path


def read_floors(paths: list[Path]) -> dict[str, list[Floor]]:
    """{dataset: its floors}; ValueError naming a file that is neither kind."""
    floors: dict[str, list[Floor]] = defaultdict(list)
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"--floors {path}: cannot be read ({error})") from None
        try:
            found = [] if not isinstance(data, dict) else (
                caption_baseline_floors(data, path) if "cider_shuffled" in data else blind_baseline_floors(data, path))
        except (KeyError, TypeError) as error:  # a file of the right kind with a field missing or mistyped
            raise ValueError(f"--floors {path}: a field is missing or malformed ({type(error).__name__}: {error})") from None
        if not found:
            raise ValueError(f"--floors {path}: neither a hybrid_tools.blind_baselines nor a hybrid_tools.caption_baseline file")
        for dataset, floor in found:
            floors[dataset].append(floor)
    return dict(floors)


def caption_baseline_floors(data: dict, path: Path) -> list[tuple[str, Floor]]:
    what = f"`{data['model']}`'s own captions scored against the wrong images' references ({data['shuffle']})"
    return [(data["dataset"], Floor(what, data["cider_shuffled"], path))]


def blind_baseline_floors(data: dict, path: Path) -> list[tuple[str, Floor]]:
    found = []
    prior = data.get("TinyMMBench")
    if prior:
        found.append(("TinyMMBench", Floor(f"text prior: {prior['rule']} ({prior['training_scenes']:,} training scenes)",
                                           prior["circular_accuracy"], path)))
        if "random_letter_circular_accuracy" in prior:
            found.append(("TinyMMBench", Floor("a random letter on every circular copy (expected)", prior["random_letter_circular_accuracy"], path)))
    constant = data.get("TinyCOCO")
    if constant:
        found.append(("TinyCOCO", Floor(f"one constant caption: {constant['rule']}", constant["cider"], path)))
    return found


def floor_lines(floors: list[Floor], entries: list, linker: Linker) -> list[str]:
    """The dataset's floors, each with the configurations whose main metric does not rise above it."""
    if not floors:
        return []
    scored = [e for e in entries if e.main_value is not None]
    lines = ["Floors, what needs no image, and the configurations at or below each:", ""]
    for floor in sorted(floors, key=lambda floor: floor.value):
        below = [f"`{e.config.label}` ({fmt(e.main_value)})" for e in scored if e.main_value <= floor.value]
        at_or_below = "every configuration" if scored and len(below) == len(scored) else ", ".join(below) or "none"
        lines.append(f"- {floor.what}: **{fmt(floor.value)}** ({linker.link(floor.source.name, floor.source)}); "
                     f"at or below it: {at_or_below}")
    return lines + [""]
