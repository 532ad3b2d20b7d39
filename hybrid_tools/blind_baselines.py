"""What the testbed's held-out sets give a model that never looks at the image: the floors its scores
are read against.

    python -m hybrid_tools.blind_baselines [--scenes 14400] [--out FILE.json]

- TinyMMBench, text prior: each question is answered with the option most often right for that
  exact question text on training-stream scenes (`scenes.ask` of every kind on each), ties to the
  earlier option in `scenes.ANSWERS`. It reads the question and the options' words, never the
  image; a circular rotation moves the letters, not the words, so its circular accuracy is its
  plain accuracy. (A constant letter scores 0 circularly: each rotation moves the right answer.)
  That is the floor of these 100 questions, one draw; beside it, the rule's expected accuracy:
  its accuracy on --fresh questions of the same kinds, taken in turn as the set takes them, from
  scenes of the held-out stream far past the set's own. And what a random letter scores: each of a question's n circular copies answered
  uniformly at random is right on all of them with probability (1/n)^n; the expected circular
  accuracy is the mean of that over the questions.
- TinyCOCO, one constant caption: among the reference captions of the first --candidates training
  scenes, the one with the best CIDEr when given to every image of the next --selection training
  scenes, then given to every TinyCOCO image. Chosen on training scenes only.

Both read nothing but the scene generator (`hybrid_vlm.testbed.scenes`) and the sets' own builders.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict

from hybrid_vlm.testbed import scenes
from vlmeval_plugin import tiny_data

from .caption_baseline import cider, show_and_write


def answer_counts(num_scenes: int) -> dict[str, Counter]:
    """{question text: Counter of its right answers} over training-stream scenes 0..num_scenes-1."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for index in range(num_scenes):
        scene, rng = scenes.scene_for(scenes.TRAIN_STREAM, index)
        for kind in scenes.QUESTION_KINDS:
            question = scenes.ask(scene, kind, rng)
            if question is not None:
                counts[question.question][question.options[question.answer]] += 1
    return counts


def prior_choice(options: tuple[str, ...], seen: Counter) -> str:
    """The option most often right for this question text; ties (and unseen texts) by ANSWERS order."""
    return max(options, key=lambda option: (seen[option], -scenes.ANSWERS.index(option)))


FRESH_OFFSET = 10_000_000  # held-out stream indices far past TinyMMBench's (base * attempts + attempt)


def fresh_accuracy(counts: dict[str, Counter], num_questions: int) -> dict:
    """The text prior's accuracy on `num_questions` new questions, kinds in turn, per kind and overall (%)."""
    right: dict[str, list[bool]] = defaultdict(list)
    asked, index = 0, 0
    while asked < num_questions:
        kind = scenes.QUESTION_KINDS[asked % len(scenes.QUESTION_KINDS)]
        scene, rng = scenes.scene_for(scenes.MCQ_STREAM, FRESH_OFFSET + index)
        index += 1
        question = scenes.ask(scene, kind, rng)
        if question is not None:
            right[kind].append(prior_choice(question.options, counts[question.question]) == question.options[question.answer])
            asked += 1
    every = [hit for hits in right.values() for hit in hits]
    return {"questions": len(every), "accuracy": round(100 * sum(every) / len(every), 1),
            "by_kind": {kind: round(100 * sum(hits) / len(hits), 1) for kind, hits in right.items()}}


def text_prior_accuracy(num_scenes: int, num_questions: int = tiny_data.MCQ_QUESTIONS, fresh: int = 0) -> dict:
    counts = answer_counts(num_scenes)
    right: dict[str, list[bool]] = defaultdict(list)
    guessed = []  # per question, the chance that random letters are right on all its circular copies
    for base_index in range(num_questions):
        _, question = tiny_data.held_out_scene_question(base_index)
        chosen = prior_choice(question.options, counts[question.question])
        right[question.kind].append(chosen == question.options[question.answer])
        guessed.append((1 / len(question.options)) ** len(question.options))
    every = [hit for hits in right.values() for hit in hits]
    return {
        "rule": "the option most often right for the same question text on training-stream scenes",
        "training_scenes": num_scenes,
        "questions": len(every),
        "circular_accuracy": round(100 * sum(every) / len(every), 1),
        "by_kind": {kind: round(100 * sum(hits) / len(hits), 1) for kind, hits in right.items()},
        "random_letter_circular_accuracy": round(100 * sum(guessed) / len(guessed), 1),  # expected
        **({"fresh_questions": fresh_accuracy(counts, fresh)} if fresh else {}),
    }


def constant_caption(num_candidates: int, num_selection: int, num_images: int = tiny_data.CAPTION_IMAGES) -> dict:
    candidates = list(dict.fromkeys(text for index in range(num_candidates)
                                    for text in scenes.captions(scenes.scene_for(scenes.TRAIN_STREAM, index)[0])))
    selection = [scenes.captions(scenes.scene_for(scenes.TRAIN_STREAM, num_candidates + index)[0]) for index in range(num_selection)]
    scored = [(cider([text] * len(selection), selection), text) for text in candidates]
    best_score, best = max(scored, key=lambda pair: pair[0])  # the first of equal scores, in candidate order
    held_out = [scenes.captions(scenes.scene_for(scenes.CAPTION_STREAM, index)[0]) for index in range(num_images)]
    return {
        "rule": "the training caption with the best CIDEr given to every selection scene, then to every TinyCOCO image",
        "candidate_scenes": num_candidates, "candidates": len(candidates), "selection_scenes": num_selection,
        "caption": best, "selection_cider": round(best_score, 2),
        "images": num_images, "cider": round(cider([best] * num_images, held_out), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_tools.blind_baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=14400, help="training scenes the text prior counts (the language phase's)")
    parser.add_argument("--candidates", type=int, default=100, help="training scenes whose captions are the constant's candidates")
    parser.add_argument("--selection", type=int, default=200, help="further training scenes the constant is chosen on")
    parser.add_argument("--fresh", type=int, default=20000, help="new questions the text prior's expected accuracy is measured on (0: none)")
    parser.add_argument("--out", default=None, help="write the result as JSON here too")
    args = parser.parse_args(argv)
    if args.fresh < 0:
        parser.error(f"--fresh {args.fresh}: use 0 or more")
    for flag in ("scenes", "candidates", "selection"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: use 1 or more")
    result = {"TinyMMBench": text_prior_accuracy(args.scenes, fresh=args.fresh), "TinyCOCO": constant_caption(args.candidates, args.selection)}
    show_and_write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
