"""COCO METEOR (and PTB-tokenized scores) beside VLMEvalKit's caption scores, checked against
pycocoevalcap called directly on the same captions; without Java, the "not computed" note.

One tiny TinyCOCO run each (8 rows or 3, 2 new tokens) in the sandbox of test_vlmeval_plugin.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from hybrid_tools.report import cli as report
from tests.test_vlmeval_plugin import needs_vlmeval, run_py, sandbox  # noqa: F401 (sandbox is a fixture)

MODEL = "llava_tiny"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH (CI installs one)")


def tiny_coco_run(sandbox, work_dir: Path, extra_env=None, mode: str = "all", limit: list[str] = ()) -> dict:  # noqa: F811
    args = ["--data", "TinyCOCO", "--model", MODEL, "--max-new-tokens", "2", *limit, "--work-dir", str(work_dir), "--mode", mode]
    result = run_py(sandbox, args, extra_env=extra_env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    score_file = work_dir / MODEL / f"{MODEL}_TinyCOCO_score.json"
    return json.loads(score_file.read_text()) if mode != "infer" else {}


def report_markdown(work_dir: Path, out: Path) -> str:
    assert report.main([str(work_dir), "--name", "captions", "--out", str(out)]) == 0
    return (out / "captions" / "report.md").read_text()


@needs_vlmeval
@needs_java
def test_meteor_equals_pycocoevalcap_direct_and_reaches_the_report(sandbox, tmp_path):  # noqa: F811
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    work_dir = sandbox["root"] / "meteor"
    tiny_coco_run(sandbox, work_dir, mode="infer")  # all 8 rows: --mode eval checks the whole set
    # The tiny random model's captions score 0 on everything; to compare non-zero scores, replace
    # them by shortened references (a different one per row) and evaluate again.
    prediction_file = work_dir / MODEL / f"{MODEL}_TinyCOCO.xlsx"
    predicted = pd.read_excel(prediction_file)
    predicted["prediction"] = [" ".join(eval(answer)[i % 2].split()[:6]) for i, answer in enumerate(predicted["answer"])]
    predicted.to_excel(prediction_file, index=False)
    assert not (work_dir / MODEL / f"{MODEL}_TinyCOCO_score.json").exists()
    scores = tiny_coco_run(sandbox, work_dir, mode="eval")
    res = {str(i): [str(p)] for i, p in enumerate(predicted["prediction"])}
    gts = {str(i): eval(answer) for i, answer in enumerate(predicted["answer"])}
    direct = Meteor().compute_score(gts, res)[0] * 100
    print(f"METEOR plugin {scores['METEOR']!r}, pycocoevalcap direct {direct!r}")
    assert direct > 1.0 and scores["METEOR"] == pytest.approx(direct, abs=1e-9)
    tokenizer = PTBTokenizer()  # the COCO caption server's pipeline, as in pycocoevalcap.eval.COCOEvalCap
    gts_tok = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
    res_tok = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    assert scores["PTB_METEOR"] == pytest.approx(Meteor().compute_score(gts_tok, res_tok)[0] * 100, abs=1e-9)
    ptb_cider = Cider().compute_score(gts_tok, res_tok)[0] * 100
    print(f"PTB CIDEr plugin {scores['PTB_CIDEr']!r}, direct {ptb_cider!r}; PTB METEOR plugin {scores['PTB_METEOR']!r}")
    assert ptb_cider > 1.0 and scores["PTB_CIDEr"] == pytest.approx(ptb_cider, abs=1e-9)
    assert scores["PTB_Bleu"] == pytest.approx([b * 100 for b in Bleu(4).compute_score(gts_tok, res_tok, verbose=0)[0]])
    untokenized_cider = Cider().compute_score(gts, res)[0] * 100
    assert scores["CIDEr"] == pytest.approx(untokenized_cider, abs=1e-9)  # VLMEvalKit's own CIDEr is left as it was
    assert not any(note.startswith("METEOR") for note in scores["notes"])

    markdown = report_markdown(work_dir, tmp_path / "reports")
    header = next(line for line in markdown.splitlines() if line.startswith("| configuration") and "CIDEr" in line)
    assert "| METEOR |" in header and "| PTB METEOR |" in header
    assert f"{scores['METEOR']:.1f}" in markdown


@needs_vlmeval
def test_without_java_the_score_file_and_report_say_meteor_was_not_computed(sandbox, tmp_path):  # noqa: F811
    no_java = tmp_path / "bin"  # a PATH with no java on it (run.py is started by absolute path)
    no_java.mkdir()
    work_dir = sandbox["root"] / "no_java"
    scores = tiny_coco_run(sandbox, work_dir, extra_env={"PATH": str(no_java)}, limit=["--limit", "3"])
    assert "METEOR" not in scores and "CIDEr" in scores  # VLMEvalKit's scores are still there
    assert "METEOR: not computed (no java on PATH)" in scores["notes"]
    markdown = report_markdown(work_dir, tmp_path / "reports")
    assert "METEOR: not computed (no java on PATH)" in markdown


@needs_java
def test_a_caption_with_a_line_break_is_scored_like_the_same_words_on_one_line():
    """The jar reads one caption per line: a raw newline in a prediction (the tiny random model
    writes them) made the read fail and cost the dataset its score file."""
    from pycocoevalcap.meteor.meteor import Meteor

    from vlmeval_plugin.caption_scores import extra_scores

    gts = {"0": ["a small red circle at the top left", "a red circle"], "1": ["a blue square in the center"]}
    res = {"0": ["a red\ncircle at the\r\ntop"], "1": ["a blue ||| square"]}
    one_line = {"0": ["a red circle at the top"], "1": ["a blue square"]}
    scores = extra_scores(gts, res)
    direct = Meteor().compute_score(gts, one_line)[0] * 100
    assert direct > 1.0 and scores["METEOR"] == pytest.approx(direct, abs=1e-9)


@needs_java
def test_a_failing_extra_metric_becomes_a_note_and_costs_nothing_else(monkeypatch):
    from vlmeval_plugin import caption_scores

    def broken(*args):
        raise ValueError("the jar answered out of step")

    monkeypatch.setattr(caption_scores, "meteor", broken)
    scores = caption_scores.extra_scores({"0": ["a red circle"]}, {"0": ["a red circle"]})
    assert "METEOR" not in scores and "PTB_METEOR" not in scores
    assert scores["notes"][:2] == ["METEOR: not computed (ValueError: the jar answered out of step)",
                                   "PTB_METEOR: not computed (ValueError: the jar answered out of step)"]
    assert scores["PTB_CIDEr"] >= 0 and len(scores["PTB_Bleu"]) == 4  # the other metrics stand (a failure cost them all)


@needs_java
def test_a_jar_that_dies_mid_score_becomes_a_note_not_a_hang(monkeypatch):
    """pycocoevalcap's Meteor keeps its lock when compute_score raises, and its __del__ waits for
    that lock: a jar that died (out of memory on a degenerate caption, say) hung the evaluation."""
    import threading

    from pycocoevalcap.meteor.meteor import Meteor

    from vlmeval_plugin.caption_scores import extra_scores

    start = Meteor.__init__

    def dead_on_arrival(self):
        start(self)
        self.meteor_p.kill()
        self.meteor_p.wait()

    monkeypatch.setattr(Meteor, "__init__", dead_on_arrival)
    found = {}
    worker = threading.Thread(target=lambda: found.update(extra_scores({"0": ["a red circle"]}, {"0": ["a red circle"]})), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "extra_scores hung on the dead jar's lock"
    assert [note.split(":")[0] for note in found["notes"]][:2] == ["METEOR", "PTB_METEOR"] and "PTB_CIDEr" in found


@needs_java
def test_a_line_break_of_any_kind_keeps_each_ptb_tokenized_caption_on_its_image():
    """The Java tokenizer splits lines on \\r, form feeds and U+2028, which PTBTokenizer does not
    replace: a \\r in one caption moved every later caption onto the wrong image."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from vlmeval_plugin.caption_scores import extra_scores

    gts = {"0": ["a small red circle at the top left", "a red\rcircle"], "1": ["a blue square in the center"]}
    res = {"0": ["a red\ncircle at the\r\ntop"], "1": ["a blue\u2028square"]}
    one_line = {key: [" ".join(text.split()) for text in texts] for key, texts in gts.items()}
    tokens = PTBTokenizer().tokenize({("g", k): [{"caption": c} for c in v] for k, v in one_line.items()}
                                     | {("r", "0"): [{"caption": "a red circle at the top"}], ("r", "1"): [{"caption": "a blue square"}]})
    direct = Cider().compute_score({k: tokens[("g", k)] for k in gts}, {k: tokens[("r", k)] for k in res})[0] * 100
    assert direct > 1.0 and extra_scores(gts, res)["PTB_CIDEr"] == pytest.approx(direct, abs=1e-9)
