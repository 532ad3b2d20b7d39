"""Generated scenes for the testbed: objects, backgrounds, questions and captions, all from a seed.

A scene is 1 to 4 objects (each with a shape, colour and size unique in its scene) on a plain,
gradient, textured or striped background, drawn at 336 x 336 px. Objects are small (14 to 22 px across,
one to two 14 px patch widths, touching up to 3 x 3 patches where they straddle patch borders; 40% of them), medium (26 to 36 px) or large (40 to 56 px), so a method that drops the wrong visual tokens
loses the answer. Questions (what colour is the triangle, what shape is the red object, how many
objects, where is one object relative to another, is there a blue square) and captions (objects,
sizes and where they are) are computed from the scene description, not from the pixels.

Every random draw comes from `numpy.random.default_rng((stream, index))`: training, the held-out
MCQ set, the held-out caption set and DyMU calibration use disjoint streams, so no held-out scene
is ever drawn during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (14, 22), "medium": (26, 36), "large": (40, 56)}
SIZE_WEIGHTS = (0.4, 0.35, 0.25)
BACKGROUNDS = ("plain", "gradient", "textured", "striped")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = ("to the left", "to the right", "above", "below")
ANSWERS = (*COLOURS, *SHAPES, *NUMBER_WORDS[1:], *RELATIONS, "yes", "no")  # every option a question can show

# Streams of `default_rng((stream, index))`; disjoint by construction.
TRAIN_STREAM = 1
MCQ_STREAM = 2
CAPTION_STREAM = 3
CALIBRATION_STREAM = 4

QUESTION_KINDS = ("colour", "shape", "count", "relation", "existence")
CATEGORIES = {  # kind -> (MMBench category, l2-category)
    "colour": ("object_colour", "attribute"),
    "shape": ("object_shape", "attribute"),
    "count": ("object_count", "counting"),
    "relation": ("spatial_relation", "spatial"),
    "existence": ("object_existence", "existence"),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    center: tuple[float, float]  # (x, y) in pixels
    extent: float  # side or diameter in pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def place(self) -> str:
        """Where the object's centre lies on a 3 x 3 grid: 'top left', 'center', 'bottom', ..."""
        column = ("left", "", "right")[min(2, int(3 * self.center[0] / IMAGE_SIZE))]
        row = ("top", "", "bottom")[min(2, int(3 * self.center[1] / IMAGE_SIZE))]
        return " ".join(part for part in (row, column) if part) or "center"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    background_seed: int


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    options: tuple[str, ...]
    answer: int  # index into options
    about: tuple[int, ...] = ()  # indices into scene.objects of what the question names (what the answer looks up)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A grey with a faint tint: never mistaken for one of the object colours."""
    return rng.uniform(70, 200) + rng.uniform(-18, 18, 3)


def draw_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(1, 5))
    shapes = rng.permutation(SHAPES)[:count]
    colours = rng.permutation(list(COLOURS))[:count]
    objects: list[SceneObject] = []
    for shape, colour in zip(shapes, colours):
        size = str(rng.choice(list(SIZES), p=SIZE_WEIGHTS))
        extent = float(rng.uniform(*SIZES[size]))
        for _attempt in range(200):
            margin = extent / 2 + 6
            center = tuple(rng.uniform(margin, IMAGE_SIZE - margin, 2).tolist())
            if all(max(abs(center[0] - o.center[0]), abs(center[1] - o.center[1])) > (extent + o.extent) / 2 + 8 for o in objects):
                objects.append(SceneObject(str(shape), str(colour), size, center, extent))
                break
    return Scene(tuple(objects), str(rng.choice(BACKGROUNDS)), int(rng.integers(2**31)))


def _background_pixels(scene: Scene) -> np.ndarray:
    rng = np.random.default_rng(scene.background_seed)
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) / IMAGE_SIZE
    first = _muted_colour(rng)
    if scene.background == "plain":
        pixels = np.broadcast_to(first, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    elif scene.background == "gradient":
        second = _muted_colour(rng)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) / 1.42 + 0.5
        pixels = first + t[..., None] * (second - first)
    elif scene.background == "textured":
        pixels = first + rng.normal(0, rng.uniform(10, 25), (IMAGE_SIZE, IMAGE_SIZE, 1))
    else:  # striped
        second = _muted_colour(rng)
        width = rng.uniform(8, 30) / IMAGE_SIZE
        direction = (x, y, (x + y) / 1.42)[int(rng.integers(3))]
        stripe = (np.floor(direction / width) % 2)[..., None]
        pixels = first + stripe * (second - first)
    return pixels


OUTLINE = (20, 20, 20)
OUTLINE_WIDTH = 2


def _draw_object(draw: ImageDraw.ImageDraw, item: SceneObject, colour, outline=OUTLINE) -> None:
    """One filled object with a dark outline: the outline is the same whatever the fill colour, so
    a patch's edge pattern (straight, slanted, curved, a concave corner) says the shape on its own."""
    cx, cy = item.center
    half = item.extent / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    style = dict(fill=colour, outline=outline, width=OUTLINE_WIDTH)
    if item.shape == "circle":
        draw.ellipse(box, **style)
    elif item.shape == "square":
        draw.rectangle(box, **style)
    elif item.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], **style)
    else:  # cross: two bars 0.4 of the extent wide, as one outlined polygon
        bar = item.extent / 5
        points = [(bar, -half), (bar, -bar), (half, -bar), (half, bar), (bar, bar), (bar, half),
                  (-bar, half), (-bar, bar), (-half, bar), (-half, -bar), (-bar, -bar), (-bar, -half)]
        draw.polygon([(cx + x, cy + y) for x, y in points], **style)


def render(scene: Scene) -> Image.Image:
    image = Image.fromarray(_background_pixels(scene).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(scene.background_seed + 1)
    for item in scene.objects:
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[item.colour]) + rng.integers(-15, 16, 3), 0, 255))
        _draw_object(draw, item, colour)
    return image


PATCH = 14
GRID = IMAGE_SIZE // PATCH
MIN_PATCH_COVER = 0.15  # share of a patch an object must cover to label it


def patch_objects(scene: Scene) -> np.ndarray:
    """[576] int: for each 14 px patch (row-major), 1 + the index of the object covering most of it
    (at least 15%), else 0. The training-time auxiliary target; never an input."""
    labels = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(labels)
    for number, item in enumerate(scene.objects, start=1):
        _draw_object(draw, item, number, outline=number)
    pixels = np.asarray(labels).reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, PATCH * PATCH)
    counts = np.stack([(pixels == number).sum(axis=1) for number in range(len(scene.objects) + 1)], axis=1)
    counts[:, 0] = 0
    best = counts.argmax(axis=1)
    return np.where(counts.max(axis=1) >= MIN_PATCH_COVER * PATCH * PATCH, best, 0)


# ---- questions ---------------------------------------------------------------------------------
def _options_with(answer: str, pool: list[str], rng: np.random.Generator, count: int = 4) -> tuple[tuple[str, ...], int]:
    others = [option for option in pool if option != answer]
    options = [answer] + [str(option) for option in rng.permutation(others)[: count - 1]]
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return tuple(options), options.index(answer)


def _relation(first: SceneObject, second: SceneObject) -> str | None:
    """Where `first` is relative to `second`, when one axis clearly dominates; else None."""
    dx, dy = first.center[0] - second.center[0], first.center[1] - second.center[1]
    if abs(dx) >= 1.5 * abs(dy) and abs(dx) > 30:
        return RELATIONS[0] if dx < 0 else RELATIONS[1]
    if abs(dy) >= 1.5 * abs(dx) and abs(dy) > 30:
        return RELATIONS[2] if dy < 0 else RELATIONS[3]
    return None


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    """One question of `kind` about `scene` with shuffled options, or None if the scene has none."""
    objects = scene.objects
    if kind == "colour":
        item = objects[int(rng.integers(len(objects)))]
        options, answer = _options_with(item.colour, list(COLOURS), rng)
        return Question(kind, f"What colour is the {item.shape}?", options, answer, (objects.index(item),))
    if kind == "shape":
        item = objects[int(rng.integers(len(objects)))]
        options, answer = _options_with(item.shape, list(SHAPES), rng)
        return Question(kind, f"What shape is the {item.colour} object?", options, answer, (objects.index(item),))
    if kind == "count":
        options, answer = _options_with(NUMBER_WORDS[len(objects)], list(NUMBER_WORDS[1:]), rng)
        return Question(kind, "How many objects are in the image?", options, answer)
    if kind == "relation":
        pairs = [(a, b) for a in objects for b in objects if a is not b and _relation(a, b) is not None]
        if not pairs:
            return None
        first, second = pairs[int(rng.integers(len(pairs)))]
        options, answer = _options_with(_relation(first, second), list(RELATIONS), rng)
        about = (objects.index(first), objects.index(second))
        return Question(kind, f"Where is the {first.name} relative to the {second.name}?", options, answer, about)
    if kind == "existence":
        present = {item.name for item in objects}
        if rng.random() < 0.5:
            name, truth = objects[int(rng.integers(len(objects)))].name, "yes"
        else:  # a near miss half the time: a colour or a shape that is in the scene
            item = objects[int(rng.integers(len(objects)))]
            candidates = [f"{c} {item.shape}" for c in COLOURS] + [f"{item.colour} {s}" for s in SHAPES]
            candidates = [c for c in candidates if c not in present]
            if rng.random() < 0.5:
                candidates = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
            name, truth = str(rng.choice(candidates)), "no"
        options = ("yes", "no") if rng.random() < 0.5 else ("no", "yes")
        about = tuple(number for number, item in enumerate(objects) if name.startswith(item.colour + " "))  # the object of that colour, if any
        return Question(kind, f"Is there a {name} in the image?", options, options.index(truth), about)
    raise ValueError(f"question kind {kind!r} is not valid: use one of {', '.join(QUESTION_KINDS)}")


# ---- captions ----------------------------------------------------------------------------------
def _phrase(item: SceneObject, with_place: bool = True) -> str:
    text = f"a {item.size} {item.colour} {item.shape}"
    if with_place:
        text += " in the center" if item.place == "center" else f" at the {item.place}"
    return text


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions(scene: Scene) -> list[str]:
    """Reference captions, several phrasings; training draws its targets from the same list."""
    left_to_right = sorted(scene.objects, key=lambda item: item.center[0])
    count = len(scene.objects)
    noun = "shape" if count == 1 else "shapes"
    background = f"on a {scene.background} background"
    return [
        f"{_join([_phrase(item) for item in left_to_right])} {background}",
        f"{NUMBER_WORDS[count]} {noun} {background}: {_join([_phrase(item, False) for item in left_to_right])}",
        f"a {scene.background} background with {_join([_phrase(item) for item in scene.objects])}",
        f"there {'is' if count == 1 else 'are'} {_join([_phrase(item, False) for item in scene.objects])} {background}",
    ]


def scene_for(stream: int, index: int) -> tuple[Scene, np.random.Generator]:
    rng = np.random.default_rng((stream, index))
    return draw_scene(rng), rng
