"""hybrid_tools.text_overlap: the held-out sets' text that training fed word for word."""

from __future__ import annotations

import json
from pathlib import Path

from hybrid_tools import text_overlap
from hybrid_vlm.testbed import scenes
from hybrid_vlm.testbed.train import training_segments
from vlmeval_plugin import tiny_data

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_counts_are_the_commands_over_the_shipped_checkpoints_training_images():
    summary = json.loads((REPO / "hybrid_vlm" / "testbed" / "checkpoint" / "train_summary.json").read_text())
    images = summary["images_seen"]
    assert text_overlap.TRAINING_IMAGES == images
    committed = json.loads((REPO / "reports" / "testbed" / "text_overlap.json").read_text())
    assert committed == text_overlap.text_overlap(images)


def test_a_question_training_asked_counts_as_seen_with_its_letter_and_an_unseen_one_does_not(monkeypatch):
    """Held-out questions planted from what the training path itself feeds (training_segments, the
    rendering included): the first training scene's first MCQ, read back from its prompt, is seen
    with its right letter; the same words with an option training never offers are not."""
    _, segments, _ = training_segments(0)
    lines = segments[0].text.split("\n")
    options = tuple(line[3:] for line in lines[1:] if line[:3] in ("A. ", "B. ", "C. ", "D. "))
    asked = scenes.Question("planted", lines[0], options, "ABCD".index(segments[0].target))
    unseen = scenes.Question("planted", lines[0], options[:-1] + ("a purple hexagon",), asked.answer)
    other_letter = scenes.Question("planted", lines[0], options, (asked.answer + 1) % len(options))
    planted = [asked, unseen, other_letter]
    monkeypatch.setattr(tiny_data, "held_out_scene_question", lambda index: (None, planted[index]))
    prompts, questions, _ = text_overlap.training_text_sets(1)
    result = text_overlap.mcq_overlap(prompts, questions, 3)
    assert result["question_line_seen"] == 3 and result["prompt_seen"] == 2
    assert result["prompt_seen_only_with_its_right_letter"] == 1  # the asked one; the same words with another answer are not
    assert result["circular_rows"] == 3 * len(options) and result["circular_rows_prompt_seen"] >= 2


def test_a_reference_caption_training_fed_is_counted_once_per_reference_and_image():
    first = scenes.captions(scenes.scene_for(scenes.CAPTION_STREAM, 0)[0])
    result = text_overlap.caption_overlap({first[1], "a caption nobody wrote"}, 3)
    assert result["images"] == 3 and result["references_seen"] == 1 and result["images_with_a_reference_seen"] == 1
    assert result["references"] == sum(len(scenes.captions(scenes.scene_for(scenes.CAPTION_STREAM, i)[0])) for i in range(3))


def test_the_readme_quotes_the_committed_counts():
    overlap = json.loads((REPO / "reports" / "testbed" / "text_overlap.json").read_text())
    mcq, coco = overlap["TinyMMBench"], overlap["TinyCOCO"]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert (f"{mcq['prompt_seen']} of TinyMMBench's {mcq['questions']} prompts occur word for word among the "
            f"{overlap['training_images']:,} training images' texts ({mcq['prompt_seen_only_with_its_right_letter']} of them") in readme
    assert f"{coco['references_seen']} of TinyCOCO's {coco['references']} reference captions were training targets" in readme
