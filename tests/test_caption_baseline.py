"""hybrid_tools.caption_baseline: matched vs shuffled CIDEr from a predictions file."""

from __future__ import annotations

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
