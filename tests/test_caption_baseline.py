"""hybrid_tools.caption_baseline: matched vs shuffled CIDEr from a predictions file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_tools.caption_baseline import caption_baseline
from vlmeval_plugin.tiny_data import build_caption_table


def test_captions_of_the_right_image_beat_the_shuffled_ones(tmp_path):
    table = build_caption_table(12).drop(columns=["image"])
    table["prediction"] = [eval(answer)[0] for answer in table["answer"]]  # a caption that names the scene
    folder = tmp_path / "work" / "m"
    folder.mkdir(parents=True)
    table.to_excel(folder / "m_TinyCOCO.xlsx", index=False)
    result = caption_baseline(tmp_path / "work", "m", "TinyCOCO")
    assert result["images"] == 12
    assert result["cider_matched"] > 2 * result["cider_shuffled"] >= 0
    table.head(1).to_excel(folder / "m_TinyCOCO.xlsx", index=False)  # one image shifted onto itself: no floor at all
    with pytest.raises(ValueError, match="1 image"):
        caption_baseline(tmp_path / "work", "m", "TinyCOCO")


def test_the_matched_score_is_vlmevalkits_and_the_committed_floor_is_reproduced():
    """On the testbed report's raw predictions: the matched CIDEr is the one VLMEvalKit's scorer wrote
    in `_score.json` (the x 100 scale included), and the committed shuffled_captions.json, the
    report's caption floor, is what the command gives (its predictions path named where it ran)."""
    report = Path(__file__).resolve().parents[1] / "reports" / "testbed"
    folder = report / "raw" / "outputs" / "llava_testbed"
    result = caption_baseline(folder.parent, "llava_testbed", "TinyCOCO")
    scored = json.loads((folder / "llava_testbed_TinyCOCO_score.json").read_text())
    assert result["cider_matched"] == round(scored["CIDEr"], 2)
    committed = json.loads((report / "shuffled_captions.json").read_text())
    assert {k: v for k, v in result.items() if k != "predictions"} == {k: v for k, v in committed.items() if k != "predictions"}
