"""How much of the testbed's held-out text occurs word for word in what training fed the model.

    python -m hybrid_tools.text_overlap [--images 14400] [--out FILE.json]

The held-out sets have held-out images (their own scene streams), but their questions, options and
captions come from the templates training uses. This counts, over the first --images training
scenes (the shipped checkpoint's language phase saw 14,400: `images_seen` in its train_summary.json),
every text training put after an image (`train.training_texts`), and then:

- TinyMMBench: of its base questions, how many have their question line among training's (MCQ
  and direct questions); how many have their whole prompt (question and options in that order)
  among training's MCQ prompts, and how many of those training always gave the same right letter
  as here (other scenes ask the same words with another answer); and the same for all its circular
  rows (each rotation of the options is a prompt of its own).
- TinyCOCO: of its reference captions, how many were a training caption target, and how many of
  its images have at least one such reference.

Seen text is not a seen answer: the image decides which option or caption is right, and
`hybrid_tools.blind_baselines` measures what the text alone gives.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from hybrid_vlm.testbed import scenes
from hybrid_vlm.testbed.prompts import CAPTION_PROMPT, LETTERS, mcq_text
from hybrid_vlm.testbed.train import training_texts
from vlmeval_plugin import tiny_data

from .caption_baseline import show_and_write

TRAINING_IMAGES = 14_400  # the shipped checkpoint's language phase (train_summary.json: images_seen)


def training_text_sets(num_images: int) -> tuple[dict[str, set[str]], set[str], set[str]]:
    """({MCQ prompt: its targets}, question lines, caption targets) of training scenes 0..num_images-1."""
    prompts: dict[str, set[str]] = defaultdict(set)
    questions, captions = set(), set()
    for index in range(num_images):
        for segment in training_texts(index)[1]:
            if segment.text == CAPTION_PROMPT:
                captions.add(segment.target)
                continue
            questions.add(segment.text.split("\n", 1)[0])
            if len(segment.target) == 1 and segment.target in LETTERS:  # an MCQ (a direct question's target is words)
                prompts[segment.text].add(segment.target)
    return prompts, questions, captions


def mcq_overlap(prompts: dict[str, set[str]], questions: set[str], num_questions: int) -> dict:
    base = dict(question=0, prompt=0, prompt_and_answer=0)
    rows = dict(rows=0, prompt=0, prompt_and_answer=0)
    for base_index in range(num_questions):
        _, question = tiny_data.held_out_scene_question(base_index)
        base["question"] += question.question in questions
        for shift, (order, letter) in enumerate(tiny_data.circular_copies(question.options, question.answer)):
            targets = prompts.get(mcq_text(question.question, order))
            seen, answered = targets is not None, targets == {letter}
            rows["rows"] += 1
            rows["prompt"] += seen
            rows["prompt_and_answer"] += answered
            if shift == 0:
                base["prompt"] += seen
                base["prompt_and_answer"] += answered
    return {
        "questions": num_questions,
        "question_line_seen": base["question"],
        "prompt_seen": base["prompt"],
        "prompt_seen_only_with_its_right_letter": base["prompt_and_answer"],
        "circular_rows": rows["rows"],
        "circular_rows_prompt_seen": rows["prompt"],
        "circular_rows_seen_only_with_their_right_letter": rows["prompt_and_answer"],
    }


def caption_overlap(captions: set[str], num_images: int) -> dict:
    references = [scenes.captions(scenes.scene_for(scenes.CAPTION_STREAM, index)[0]) for index in range(num_images)]
    return {
        "images": num_images,
        "references": sum(len(refs) for refs in references),
        "references_seen": sum(text in captions for refs in references for text in refs),
        "images_with_a_reference_seen": sum(any(text in captions for text in refs) for refs in references),
    }


def text_overlap(num_images: int) -> dict:
    prompts, questions, captions = training_text_sets(num_images)
    return {
        "training_images": num_images,
        "training_texts": {"mcq_prompts": len(prompts), "question_lines": len(questions), "caption_targets": len(captions)},
        "TinyMMBench": mcq_overlap(prompts, questions, tiny_data.MCQ_QUESTIONS),
        "TinyCOCO": caption_overlap(captions, tiny_data.CAPTION_IMAGES),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_tools.text_overlap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=TRAINING_IMAGES, help="training scenes whose texts are counted (the language phase's)")
    parser.add_argument("--out", default=None, help="write the result as JSON here too")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images {args.images}: use 1 or more")
    show_and_write(text_overlap(args.images), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
