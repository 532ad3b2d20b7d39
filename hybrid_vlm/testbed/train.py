"""Train the testbed from scratch on generated scenes: seeded, CPU-sized; a rerun repeats its weights
on the same CPU, thread count and torch build (the kernels, bf16 autocast among them, round
differently on another machine).

Each training image carries several questions and one caption in a single packed sequence: the
shared prefix (system prompt, "USER: ", the 576 image tokens) comes once, then every question and
the caption follow as segments that attend to the prefix and to themselves only, each with the
positions it would have alone. One ViT pass and one prefix then serve ~9 supervised answers;
tests/test_testbed.py checks a packed segment's logits against the stock forward of that prompt alone.

Segments per image: one multiple-choice question of each kind plus `EXTRA_QUESTIONS` more (the
plugin's MCQ prompt, answered with the letter), `DIRECT_QUESTIONS` questions answered in words
(VLMEvalKit's "Answer the question directly." prompt) and one caption (the COCO prompt).

Loss: cross-entropy on the answer tokens (the option letter and </s>; the words and </s>; the
caption and </s>), averaged within a segment, then over segments (a caption counts
`CAPTION_WEIGHT` questions); plus `PROBE_WEIGHT` times an auxiliary loss that only training uses:
linear heads on the projected image tokens (`ObjectProbe`: each patch's object colour and shape,
each object's mean token its colour, shape and size, the object count, each token's grid place;
`scenes.patch_objects` says which object covers a patch). The probe makes the ViT's features useful within a
CPU budget; it is not part of the saved model. Optional, off by default: attention losses on one head
(to the object a question names; to the right option's line) and a linear answer probe reading each
MCQ's right option in words from the input of a middle LLM layer (`TrainSettings`).

Three phases, from scratch and in the one command:
1. windows: `window_steps` steps of the probe's patch and object heads on 8 x 8-patch windows cut
   around each object (`hf_compat.clip.window_image_features`: 65 tokens instead of 577, every
   patch with its full-grid position embedding). Shape is learned here: reports/testbed-attempts
   has the runs where 300 whole-image steps left it near chance and 800 window steps did not;
2. vision: `vision_steps` steps of the whole probe on whole images (ViT and projector; no LLM);
3. language: `steps` steps of everything.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..hf_compat.clip import window_image_features
from ..hf_compat.llava import llava_parts, packed_decoder_states, packed_head_attention, stock_image_features, vision_tower
from . import scenes
from .prompts import CAPTION_PROMPT, LETTERS, conversation, mcq_text

CAPTION_WEIGHT = 2.0
EXTRA_QUESTIONS = 5  # beyond one of each kind
DIRECT_QUESTIONS = 5
DIRECT_INSTRUCTION = "Answer the question directly."
PROBE_WEIGHT = 0.5
BACKGROUND_WEIGHT = 0.25  # the probe's background patches (~95% of them) count this much of the object patches
VISION_SCENE_OFFSET = 10_000_000  # the vision phase draws training scenes from here on
WINDOW_SCENE_OFFSET = 20_000_000  # the window phase, from here on
WINDOW = 8  # patches per side of a window-phase crop (the largest object spans 5)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1800
    batch_images: int = 8
    learning_rate: float = 2e-3
    language_learning_rate: float | None = None  # the language phase's peak; None: learning_rate
    warmup_steps: int = 100
    window_steps: int = 1200
    window_batch_scenes: int = 32  # each gives one window per object
    vision_steps: int = 150
    vision_batch_images: int = 32
    vision_warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    bf16: bool = True
    freeze_vision: bool = False  # in the language phase (cheaper; the ViT then learns from the probe phase only)
    attention_weight: float = 0.0  # of the named-object attention loss in the language phase; 0: none
    attention_layer: int = 4  # whose head `attention_head` that loss teaches
    attention_head: int = 0
    option_attention_weight: float = 0.0  # of the right-option attention loss (MCQ); 0: none
    option_attention_layer: int = 6
    option_attention_head: int = 0
    option_tokens: bool = False  # the tokenizer has one token per option line ("B. red"; testbed.build_tokenizer)
    answer_probe_weight: float = 0.0  # of the mid-depth answer probe (MCQ); 0: none
    answer_probe_layer: int = 6  # whose input the answer probe reads at each MCQ's last prompt token

    def __post_init__(self):
        if self.steps < 1 or self.batch_images < 1:
            raise ValueError(f"steps (--steps) and batch_images (--batch-images) must be at least 1, not {self.steps} and {self.batch_images}")
        if self.window_steps < 0 or self.vision_steps < 0:
            raise ValueError(f"window_steps (--window-steps) and vision_steps (--vision-steps) must be 0 (no such phase) or more, "
                             f"not {self.window_steps} and {self.vision_steps}")
        if self.language_learning_rate is not None and not self.language_learning_rate > 0:
            raise ValueError(f"language_learning_rate (--language-lr) must be a positive rate or unset, not {self.language_learning_rate}")
        if not self.attention_weight >= 0:
            raise ValueError(f"attention_weight (--attention-weight) must be 0 (no attention loss) or a positive weight, not {self.attention_weight}")
        if not self.option_attention_weight >= 0:
            raise ValueError(
                f"option_attention_weight (--option-attention-weight) must be 0 (no option attention loss) or a positive weight, not {self.option_attention_weight}"
            )
        if not self.answer_probe_weight >= 0:
            raise ValueError(f"answer_probe_weight (--answer-probe-weight) must be 0 (no answer probe) or a positive weight, not {self.answer_probe_weight}")

    def watches(self) -> dict[str, tuple[int, int]]:
        """The heads the attention losses teach: name -> (layer, head)."""
        heads = {"looking": (self.attention_layer, self.attention_head), "choosing": (self.option_attention_layer, self.option_attention_head)}
        weights = {"looking": self.attention_weight, "choosing": self.option_attention_weight}
        return {name: head for name, head in heads.items() if weights[name]}

    @property
    def language_peak(self) -> float:
        return self.learning_rate if self.language_learning_rate is None else self.language_learning_rate


class Segment(NamedTuple):
    text: str  # the prompt text after the image
    target: str
    weight: float
    about: tuple[int, ...] = ()  # object indices the question names (the attention loss's target)
    answer: str = ""  # an MCQ's right option in words (the answer probe's target)


@dataclass
class PackedImage:
    input_ids: list[int]  # prefix (image token expanded) then segments
    positions: list[int]
    segment_ids: list[int]  # 0 = shared prefix, 1.. = segment
    target_positions: list[int]  # index of the logit that predicts each target token
    target_ids: list[int]
    target_weights: list[float]
    letter_positions: list[int]  # logits that predict an option letter (for the running accuracy)
    image_start: int = 0  # index of the first image token
    looking_positions: list[int] = field(default_factory=list)  # the queries the attention loss reads: a question's last prompt token
    looking_objects: list[tuple[int, ...]] = field(default_factory=list)  # ... and the object indices each must attend to
    choosing_positions: list[int] = field(default_factory=list)  # an MCQ's last prompt token ...
    choosing_spans: list[tuple[int, int]] = field(default_factory=list)  # ... and [start, end) of its right option's line
    answers: list[int] = field(default_factory=list)  # ... and its right option's index in scenes.ANSWERS (-100: not given)


def training_segments(index: int) -> tuple[Image.Image, list[Segment], ProbeTargets]:
    """The image of training scene `index`, its segments, and the probe's targets."""
    scene, segments = training_texts(index)
    return scenes.render(scene), segments, probe_targets(scene)


def training_texts(index: int) -> tuple[scenes.Scene, list[Segment]]:
    """Training scene `index` (unrendered) and its segments: every kind of MCQ, more drawn at random,
    direct questions, and one of its reference captions."""
    scene, rng = scenes.scene_for(scenes.TRAIN_STREAM, index)
    kinds = list(scenes.QUESTION_KINDS) + [str(k) for k in rng.choice(scenes.QUESTION_KINDS, EXTRA_QUESTIONS)]
    segments = []
    for kind in kinds:
        question = scenes.ask(scene, kind, rng)
        if question is not None:
            segments.append(Segment(mcq_text(question.question, question.options), LETTERS[question.answer], 1.0, question.about, question.options[question.answer]))
    for kind in rng.choice(scenes.QUESTION_KINDS, DIRECT_QUESTIONS):
        question = scenes.ask(scene, str(kind), rng)
        if question is not None:
            segments.append(Segment(question.question + "\n" + DIRECT_INSTRUCTION, question.options[question.answer], 1.0, question.about))
    references = scenes.captions(scene)
    segments.append(Segment(CAPTION_PROMPT, references[int(rng.integers(len(references)))], CAPTION_WEIGHT))
    return scene, segments


COLOUR_CLASSES = {name: number for number, name in enumerate(scenes.COLOURS)}
SHAPE_CLASSES = {name: number for number, name in enumerate(scenes.SHAPES)}
SIZE_CLASSES = {name: number for number, name in enumerate(scenes.SIZES)}
MAX_OBJECTS = 4


@dataclass(frozen=True)
class ProbeTargets:
    owner: np.ndarray  # [576] 0 = background, 1 + object index
    objects: np.ndarray  # [MAX_OBJECTS, 3] colour, shape, size class; -1 where no object


def probe_targets(scene: scenes.Scene) -> ProbeTargets:
    objects = np.full((MAX_OBJECTS, 3), -1)
    for number, item in enumerate(scene.objects):
        objects[number] = (COLOUR_CLASSES[item.colour], SHAPE_CLASSES[item.shape], SIZE_CLASSES[item.size])
    return ProbeTargets(scenes.patch_objects(scene), objects)


def stack_targets(targets: list[ProbeTargets]) -> tuple[torch.Tensor, torch.Tensor]:
    owner = torch.from_numpy(np.stack([t.owner for t in targets]))  # [N, 576]
    return owner, torch.from_numpy(np.stack([t.objects for t in targets]))  # [N, MAX_OBJECTS, 3]


class ObjectProbe(torch.nn.Module):
    """Training-only linear heads on the projected image tokens, shaped like what one attention
    head of the LLM can read: each patch's object colour and shape; the mean token of each object
    (what attending to its patches averages) its colour, shape and size; the mean of all tokens
    the object count; each token its grid row and column. Not part of the saved model."""

    def __init__(self, hidden: int, shape_weight: float = 1.0):
        super().__init__()
        self.shape_weight = shape_weight  # of the two shape losses (reports/testbed-attempts tried 3)
        self.patch_colour = torch.nn.Linear(hidden, len(COLOUR_CLASSES) + 1)
        self.patch_shape = torch.nn.Linear(hidden, len(SHAPE_CLASSES) + 1)
        self.object_heads = torch.nn.ModuleList(
            torch.nn.Linear(hidden, classes) for classes in (len(COLOUR_CLASSES), len(SHAPE_CLASSES), len(SIZE_CLASSES))
        )
        self.count = torch.nn.Linear(hidden, MAX_OBJECTS)
        self.place = torch.nn.Linear(hidden, 2)
        grid = torch.arange(scenes.GRID, dtype=torch.float32) / (scenes.GRID - 1) * 2 - 1
        self.register_buffer("grid", torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2), persistent=False)

    def loss(self, features: torch.Tensor, owner: torch.Tensor, objects: torch.Tensor, whole: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """features [N, P, D], owner [N, P], objects [N, K, 3] -> (mean of the heads' losses, accuracies).

        P = 576 for whole images. For windows (`whole` [N, K] bool: the object lies entirely inside
        the window) the object heads read only the whole objects, and the count and place heads,
        which need the full image, are skipped.
        """
        features = features.float()
        losses, accuracy = self._patch_losses(features, owner, objects)
        membership = torch.nn.functional.one_hot(owner, MAX_OBJECTS + 1)[..., 1:].float()  # [N, P, K]
        object_means = membership.transpose(1, 2) @ features / membership.sum(1)[..., None].clamp(min=1)  # [N, K, D]
        present = (objects[..., 0] >= 0) & (membership.sum(1) > 0) & (True if whole is None else whole)
        for index, (name, head) in enumerate(zip(("object_colour", "object_shape", "object_size"), self.object_heads)):
            logits, target = head(object_means[present]), objects[..., index][present]
            losses.append(torch.nn.functional.cross_entropy(logits, target) * (self.shape_weight if name == "object_shape" else 1.0))
            accuracy[name] = _accuracy(logits, target)
        if whole is None:
            count_logits, count_target = self.count(features.mean(1)), (objects[..., 0] >= 0).sum(1) - 1
            losses.append(torch.nn.functional.cross_entropy(count_logits, count_target))
            accuracy["count"] = _accuracy(count_logits, count_target)
            losses.append(torch.nn.functional.mse_loss(self.place(features), self.grid.expand(features.shape[0], -1, -1)))
        return sum(losses) / len(losses), accuracy

    def _patch_losses(self, features: torch.Tensor, owner: torch.Tensor, objects: torch.Tensor) -> tuple[list, dict]:
        on_object = owner > 0
        weights = torch.where(on_object, 1.0, BACKGROUND_WEIGHT).flatten()
        owned = objects.gather(1, (owner - 1).clamp(min=0)[..., None].expand(-1, -1, 3))  # [N, P, 3]
        patch_class = torch.where(on_object[..., None], owned + 1, 0)
        losses, accuracy = [], {}
        for name, head, target in (("patch_colour", self.patch_colour, patch_class[..., 0]), ("patch_shape", self.patch_shape, patch_class[..., 1])):
            logits = head(features)  # [N, P, C]
            each = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            losses.append((each * weights).sum() / weights.sum() * (self.shape_weight if name == "patch_shape" else 1.0))
            accuracy[name] = _accuracy(logits[on_object], target[on_object])
        return losses, accuracy


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return round(float((logits.argmax(-1) == target).float().mean()), 4) if target.numel() else float("nan")


def jpeg_roundtrip(image: Image.Image) -> Image.Image:
    """The evaluation TSVs store JPEG at quality 95; train on the same artefacts."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def option_line_tokens(prompt: str, offsets: list[tuple[int, int]], letter: str) -> list[int]:
    """Indices of the tokens of `prompt` (their character offsets) that overlap the line "<letter>. <option>"."""
    start = prompt.index(f"\n{letter}. ") + 1
    end = prompt.index("\n", start)
    return [index for index, (first, last) in enumerate(offsets) if first < end and last > start]


def pack(tokenizer, image_token_id: int, image_tokens: int, segments: list[Segment]) -> PackedImage:
    texts = [conversation(segment.text) for segment in segments]
    encodings = [tokenizer(text, return_offsets_mapping=True) for text in texts]
    prompts = [encoding["input_ids"] for encoding in encodings]
    cut = prompts[0].index(image_token_id) + 1
    prefix = prompts[0][: cut - 1] + [image_token_id] * image_tokens
    packed = PackedImage(list(prefix), list(range(len(prefix))), [0] * len(prefix), [], [], [], [], image_start=cut - 1)
    for number, (prompt, segment, text, encoding) in enumerate(zip(prompts, segments, texts, encodings), start=1):
        target, weight = segment.target, segment.weight
        if prompt[:cut] != prompts[0][:cut]:
            raise ValueError("segments of one packed image must share the tokens up to the image")
        answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        tokens = prompt[cut:] + answer
        start = len(packed.input_ids)
        packed.input_ids += tokens
        packed.positions += list(range(len(prefix), len(prefix) + len(tokens)))
        packed.segment_ids += [number] * len(tokens)
        first_target = start + len(prompt) - cut
        packed.target_positions += list(range(first_target - 1, first_target - 1 + len(answer)))
        packed.target_ids += answer
        packed.target_weights += [weight / len(answer)] * len(answer)
        if target in tuple(LETTERS):  # one letter: "AB" or "" is in the string LETTERS, not an option
            packed.letter_positions.append(first_target - 1)
            line = option_line_tokens(text, encoding["offset_mapping"], target)
            packed.choosing_positions.append(first_target - 1)
            packed.choosing_spans.append((start + line[0] - cut, start + line[-1] + 1 - cut))
            packed.answers.append(scenes.ANSWERS.index(segment.answer) if segment.answer else -100)  # cross_entropy's ignore_index
        if segment.about:
            packed.looking_positions.append(first_target - 1)
            packed.looking_objects.append(segment.about)
    return packed


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids (-1 = padding) -> [B, 1, T, T] bool: causal, and a segment sees only the
    shared prefix (id 0) and itself. Padding rows see padding only (never an all-False row)."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    visible = (key == 0) & (query >= 0) | (key == query)
    return (causal & visible)[:, None]


def collate(packed: list[PackedImage], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(p.input_ids) for p in packed)
    batch = len(packed)
    input_ids = torch.full((batch, length), pad_id)
    positions = torch.zeros(batch, length, dtype=torch.long)
    segment_ids = torch.full((batch, length), -1)
    rows, columns, targets, weights, letter_rows, letter_columns = [], [], [], [], [], []
    looking_rows, looking_columns, looking_objects = [], [], []
    choosing_rows, choosing_columns, choosing_spans, answers = [], [], [], []
    for row, item in enumerate(packed):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        positions[row, :n] = torch.tensor(item.positions)
        segment_ids[row, :n] = torch.tensor(item.segment_ids)
        rows += [row] * len(item.target_positions)
        columns += item.target_positions
        targets += item.target_ids
        weights += item.target_weights
        letter_rows += [row] * len(item.letter_positions)
        letter_columns += item.letter_positions
        looking_rows += [row] * len(item.looking_positions)
        looking_columns += item.looking_positions
        looking_objects += [[1 + n for n in about] + [0] * (MAX_OBJECTS - len(about)) for about in item.looking_objects]
        choosing_rows += [row] * len(item.choosing_positions)
        choosing_columns += item.choosing_positions
        choosing_spans += item.choosing_spans
        answers += item.answers
    if len({item.image_start for item in packed}) != 1:
        raise ValueError("every packed image of a batch must start its image tokens at the same index")
    return dict(
        input_ids=input_ids, position_ids=positions, attention_mask=packed_attention_mask(segment_ids),
        target_rows=torch.tensor(rows), target_columns=torch.tensor(columns),
        target_ids=torch.tensor(targets), target_weights=torch.tensor(weights),
        letter_rows=torch.tensor(letter_rows, dtype=torch.long), letter_columns=torch.tensor(letter_columns, dtype=torch.long),
        looking_rows=torch.tensor(looking_rows, dtype=torch.long), looking_columns=torch.tensor(looking_columns, dtype=torch.long),
        looking_objects=torch.tensor(looking_objects, dtype=torch.long).view(-1, MAX_OBJECTS),  # 1 + object index; 0 = none
        image_start=torch.tensor(packed[0].image_start),
        choosing_rows=torch.tensor(choosing_rows, dtype=torch.long), choosing_columns=torch.tensor(choosing_columns, dtype=torch.long),
        choosing_targets=_span_mask(choosing_spans, length), answers=torch.tensor(answers, dtype=torch.long),
    )


def _span_mask(spans: list[tuple[int, int]], length: int) -> torch.Tensor:
    """[(start, end)] -> [len(spans), length] bool, True inside each span."""
    at = torch.arange(length)
    bounds = torch.tensor(spans, dtype=torch.long).view(-1, 2)
    return (at[None, :] >= bounds[:, :1]) & (at[None, :] < bounds[:, 1:])


class PackedOutput(NamedTuple):
    logits: torch.Tensor  # [N, vocab] at the requested (rows, columns)
    features: torch.Tensor  # [B, 576, D] projected image features
    looking: torch.Tensor | None  # [Q, 576] float32: the watched head's attention from each looking query to the image tokens
    choosing: torch.Tensor | None = None  # [C, T] float32: the option head's attention from each MCQ's last prompt token
    answer_states: torch.Tensor | None = None  # [C, D]: the input of the answer probe's layer at each MCQ's last prompt token


def packed_forward(
    model, pixel_values: torch.Tensor, batch: dict[str, torch.Tensor], rows: torch.Tensor, columns: torch.Tensor,
    watches: dict[str, tuple[int, int]] | None = None,  # "looking" / "choosing" -> (layer, head) whose attention to return
    answer_layer: int | None = None,  # whose input to return at the MCQs' last prompt tokens
) -> PackedOutput:
    """Stock image features placed at the image tokens, the LLM under the packed mask."""
    parts = llava_parts(model)
    embeds = parts.embed_tokens(batch["input_ids"])  # [B, T, D]
    features = stock_image_features(model, pixel_values)  # [B, 576, D]
    image_slots = (batch["input_ids"] == parts.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(image_slots, features.to(embeds.dtype))
    watches, answer_states = watches or {}, None
    if not watches and answer_layer is None:
        hidden, watched = packed_decoder_states(model, embeds, batch["attention_mask"], batch["position_ids"]), {}
    else:
        requests = [(*head, batch[f"{name}_rows"], batch[f"{name}_columns"]) for name, head in watches.items()]
        read = () if answer_layer is None else (answer_layer,)
        hidden, attentions, inputs = packed_head_attention(model, embeds, batch["attention_mask"], batch["position_ids"], requests, read)
        watched = dict(zip(watches, attentions))
        if answer_layer is not None:
            answer_states = inputs[answer_layer][batch["choosing_rows"], batch["choosing_columns"]]
    looking = watched.get("looking")
    if looking is not None:
        looking = looking[:, int(batch["image_start"]) : int(batch["image_start"]) + features.shape[1]]
    return PackedOutput(parts.lm_head(hidden[rows, columns]), features, looking, watched.get("choosing"), answer_states)  # the LLM's output is already final-normed


def named_object_attention_loss(looking: torch.Tensor, owner: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """looking [Q, 576] (a head's attention from each question to the image tokens), owner [B, 576]
    -> (mean of -log(attention mass on the patches of the objects the question names), that mass's mean).
    Teaches one head the lookup every question but counting needs: find the object by its name."""
    objects = batch["looking_objects"]  # [Q, MAX_OBJECTS], 1 + index, 0 = none
    on_named = (owner[batch["looking_rows"]][:, :, None] == objects[:, None, :]).logical_and(objects[:, None, :] > 0).any(-1)  # [Q, 576]
    has_patches = on_named.any(-1)  # an object too small to own a patch gives no target
    mass = (looking * on_named).sum(-1)[has_patches]
    if not mass.numel():
        return looking.sum() * 0.0, float("nan")
    return -mass.clamp(min=1e-6).log().mean(), float(mass.detach().mean())


def right_option_attention_loss(choosing: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """choosing [C, T] (a head's attention from each MCQ's last prompt token) -> (mean of -log(attention
    mass on the right option's line "B. circle"), that mass's mean). Teaches the second lookup an MCQ
    needs: from the answer the image gave to the line that says it, whose letter is the output."""
    if not choosing.shape[0]:
        return choosing.sum() * 0.0, float("nan")
    mass = (choosing * batch["choosing_targets"]).sum(-1)
    return -mass.clamp(min=1e-6).log().mean(), float(mass.detach().mean())


def answer_probe_loss_and_accuracy(logits: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, float]:
    """logits [C, len(scenes.ANSWERS)], answers [C] (-100: not given) -> (cross-entropy over the
    given answers, their accuracy); a zero loss and NaN accuracy when none is given."""
    given = answers >= 0
    if not bool(given.any()):
        return logits.sum() * 0.0, float("nan")
    return torch.nn.functional.cross_entropy(logits[given], answers[given]), _accuracy(logits[given], answers[given])


def packed_logits(model, pixel_values: torch.Tensor, batch: dict[str, torch.Tensor], rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return packed_forward(model, pixel_values, batch, rows, columns)[0]


def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to `peak`, then cosine to 10% of it at `total` steps. A phase shorter than its
    warm-up warms up over the whole phase, so it still reaches `peak` (the card says it does)."""
    warmup = min(warmup, total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def vision_batch(step: int, settings: TrainSettings, processor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    images, targets = [], []
    for offset in range(settings.vision_batch_images):
        scene, _ = scenes.scene_for(scenes.TRAIN_STREAM, VISION_SCENE_OFFSET + step * settings.vision_batch_images + offset)
        images.append(jpeg_roundtrip(scenes.render(scene)))
        targets.append(probe_targets(scene))
    return processor.image_processor(images, return_tensors="pt")["pixel_values"], stack_targets(targets)


def object_windows(owner: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    """owner [576] (`scenes.patch_objects`) -> one WINDOW x WINDOW window per labelled object,
    placed at random among the places that hold the whole object: [(row, column) of its corner]."""
    grid_owner = owner.reshape(scenes.GRID, scenes.GRID)
    origins = []
    for number in range(1, int(grid_owner.max()) + 1):
        rows, columns = np.nonzero(grid_owner == number)
        if rows.size:
            origins.append(tuple(
                int(rng.integers(max(0, cells.max() - WINDOW + 1), min(cells.min(), scenes.GRID - WINDOW) + 1)) for cells in (rows, columns)
            ))
    return origins


def window_batch(step: int, settings: TrainSettings, processor):
    """(pixel windows [W, 3, 112, 112], origins [W, 2], (owner [W, 64], objects [W, K, 3], whole [W, K]))."""
    images, targets, places = [], [], []
    for offset in range(settings.window_batch_scenes):
        scene, rng = scenes.scene_for(scenes.TRAIN_STREAM, WINDOW_SCENE_OFFSET + step * settings.window_batch_scenes + offset)
        images.append(jpeg_roundtrip(scenes.render(scene)))
        targets.append(probe_targets(scene))
        places.append(object_windows(targets[-1].owner, rng))
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    windows, origins, owners, objects, whole = [], [], [], [], []
    for image, target, image_places in zip(pixel_values, targets, places):
        grid_owner = target.owner.reshape(scenes.GRID, scenes.GRID)
        for row, column in image_places:
            windows.append(image[:, row * scenes.PATCH : (row + WINDOW) * scenes.PATCH, column * scenes.PATCH : (column + WINDOW) * scenes.PATCH])
            origins.append((row, column))
            window_owner = grid_owner[row : row + WINDOW, column : column + WINDOW]
            owners.append(window_owner.flatten())
            objects.append(target.objects)
            whole.append([0 < (window_owner == n).sum() == (grid_owner == n).sum() for n in range(1, MAX_OBJECTS + 1)])
    return (
        torch.stack(windows), torch.tensor(origins),
        (torch.from_numpy(np.stack(owners)), torch.from_numpy(np.stack(objects)), torch.tensor(whole)),
    )


def training_batch(step: int, settings: TrainSettings, processor, image_token_id: int, image_tokens: int):
    images, packed, targets = [], [], []
    for offset in range(settings.batch_images):
        image, segments, probe = training_segments(step * settings.batch_images + offset)
        images.append(jpeg_roundtrip(image))
        packed.append(pack(processor.tokenizer, image_token_id, image_tokens, segments))
        targets.append(probe)
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixel_values, collate(packed, processor.tokenizer.pad_token_id), stack_targets(targets)


class Trainer:
    """One AdamW over the model and the probe; the JSON-lines log; bf16 autocast on CPU (5x fp32's
    matmul throughput on CPUs with AVX-512 BF16; the weights and the optimizer stay fp32)."""

    def __init__(self, model, probe: ObjectProbe, settings: TrainSettings, log_file):
        self.model, self.probe, self.settings, self.log_file = model, probe, settings, log_file
        # training-only, like the probe: reads the answer from the answer probe's layer input
        self.answer_head = torch.nn.Linear(model.config.text_config.hidden_size, len(scenes.ANSWERS)) if settings.answer_probe_weight else None
        named = list(model.named_parameters()) + list(probe.named_parameters(prefix="probe"))
        if self.answer_head is not None:
            named += list(self.answer_head.named_parameters(prefix="answer_head"))
        self.parameters = [p for _, p in named]
        decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in named if p.ndim < 2 or "embed" in n]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.learning_rate, betas=(0.9, 0.98),
        )
        self.log, self.started = [], time.perf_counter()

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.settings.bf16)

    def optimize(self, loss: torch.Tensor, rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.parameters if p.grad is not None], 1.0)
        self.optimizer.step()

    def write(self, record: dict) -> None:
        record["seconds"] = round(time.perf_counter() - self.started, 1)
        self.log.append(record)
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def window_step(self, step: int, processor) -> None:
        windows, origins, (owner, objects, whole) = window_batch(step, self.settings, processor)
        with self.autocast():
            probe_loss, accuracy = self.probe.loss(window_image_features(self.model, windows, origins), owner, objects, whole)
        rate = learning_rate(step, self.settings.learning_rate, self.settings.vision_warmup_steps, self.settings.window_steps)
        self.optimize(probe_loss, rate)
        self.write(dict(phase="window", step=step, windows=len(windows), probe_loss=round(probe_loss.item(), 5), lr=rate, **accuracy))

    def vision_step(self, step: int, processor) -> None:
        pixel_values, (owner, objects) = vision_batch(step, self.settings, processor)
        with self.autocast():
            probe_loss, accuracy = self.probe.loss(stock_image_features(self.model, pixel_values), owner, objects)
        rate = learning_rate(step, self.settings.learning_rate, self.settings.vision_warmup_steps, self.settings.vision_steps)
        self.optimize(probe_loss, rate)
        self.write(dict(phase="vision", step=step, probe_loss=round(probe_loss.item(), 5), lr=rate, **accuracy))

    def language_step(self, step: int, processor) -> None:
        config = self.model.config
        pixel_values, batch, (owner, objects) = training_batch(step, self.settings, processor, config.image_token_id, config.image_seq_length)
        with self.autocast():
            answer_layer = self.settings.answer_probe_layer if self.answer_head is not None else None
            logits, features, looking, choosing, answer_states = packed_forward(
                self.model, pixel_values, batch, batch["target_rows"], batch["target_columns"], self.settings.watches(), answer_layer
            )
            probe_loss, accuracy = self.probe.loss(features, owner, objects)
        losses = torch.nn.functional.cross_entropy(logits.float(), batch["target_ids"], reduction="none")
        weights = batch["target_weights"]
        answer_loss = (losses * weights).sum() / weights.sum()
        loss, looked = answer_loss + PROBE_WEIGHT * probe_loss, {}
        if looking is not None:
            attention_loss, mass = named_object_attention_loss(looking.float(), owner, batch)
            loss = loss + self.settings.attention_weight * attention_loss
            looked = dict(attention_loss=round(attention_loss.item(), 5), named_attention=round(mass, 4))
        if choosing is not None:
            option_loss, mass = right_option_attention_loss(choosing.float(), batch)
            loss = loss + self.settings.option_attention_weight * option_loss
            looked |= dict(option_attention_loss=round(option_loss.item(), 5), option_attention=round(mass, 4))
        if answer_states is not None:
            answer_probe_loss, answer_probe = answer_probe_loss_and_accuracy(self.answer_head(answer_states.float()), batch["answers"])
            loss = loss + self.settings.answer_probe_weight * answer_probe_loss
            looked |= dict(answer_probe_loss=round(answer_probe_loss.item(), 5), answer_probe=answer_probe)
        rate = learning_rate(step, self.settings.language_peak, self.settings.warmup_steps, self.settings.steps)
        self.optimize(loss, rate)
        self.write(dict(phase="language", step=step, answer_loss=round(answer_loss.item(), 5), probe_loss=round(probe_loss.item(), 5),
                        lr=rate, letter_accuracy=round(_letter_accuracy(logits, batch), 4), **looked, **accuracy))


def train(model, processor, settings: TrainSettings, log_path: Path, progress: bool = True) -> list[dict]:
    """Train `model` in place: the vision phase (ViT and projector on the probe), then the language
    phase (everything on the answers plus the probe; the ViT frozen if `settings.freeze_vision`);
    one JSON line per step in `log_path`; returns the log."""
    from tqdm.auto import tqdm

    from . import option_lines

    if (option_lines()[0] in processor.tokenizer.get_vocab()) != settings.option_tokens:
        raise ValueError(f"settings.option_tokens is {settings.option_tokens}, but the tokenizer {'lacks' if settings.option_tokens else 'has'} the option-line tokens")
    torch.manual_seed(settings.seed)
    probe = ObjectProbe(model.config.text_config.hidden_size)
    model.train()
    with log_path.open("w") as log_file, torch.enable_grad():  # whatever grad mode the caller left on
        trainer = Trainer(model, probe, settings, log_file)
        for step in tqdm(range(settings.window_steps), desc="testbed train: windows", disable=not progress):
            trainer.window_step(step, processor)
        for step in tqdm(range(settings.vision_steps), desc="testbed train: vision", disable=not progress):
            trainer.vision_step(step, processor)
        if settings.freeze_vision:
            vision_tower(model).requires_grad_(False)  # autograd then records nothing before the projector
        for step in tqdm(range(settings.steps), desc="testbed train: language", disable=not progress):
            trainer.language_step(step, processor)
    model.requires_grad_(True)
    model.eval()
    return trainer.log


def continue_language_phase(model, processor, settings: TrainSettings, out: Path) -> float:
    """`settings.steps` language steps on an already trained model (a fresh probe), logged to
    out/train_log.jsonl; then the model and processor saved into `out`. Returns the seconds taken.

    Torch's random state is the caller's (`load_for_training` seeds it); the scenes start again at
    training scene 0, as the language phase does; `settings.freeze_vision` is not applied."""
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    started = time.perf_counter()
    with (out / "train_log.jsonl").open("w") as log, torch.enable_grad():
        trainer = Trainer(model, ObjectProbe(model.config.text_config.hidden_size), settings, log)
        for step in range(settings.steps):
            trainer.language_step(step, processor)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return time.perf_counter() - started


def _letter_accuracy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Share of option-letter targets whose logit argmax is the right letter (training batch)."""
    keys = batch["target_rows"] * 100_000 + batch["target_columns"]
    letter_keys = batch["letter_rows"] * 100_000 + batch["letter_columns"]
    is_letter = torch.isin(keys, letter_keys)
    if not bool(is_letter.any()):
        return float("nan")
    return float((logits[is_letter].argmax(-1) == batch["target_ids"][is_letter]).float().mean())
