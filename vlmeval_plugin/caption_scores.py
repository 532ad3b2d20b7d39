"""COCO caption metrics that VLMEvalKit 0.0.20's scorer leaves out: METEOR, the COCO-standard
PTB-tokenized BLEU/CIDEr/METEOR, and SPICE when its Stanford CoreNLP models are present.

VLMEvalKit's COCO_Caption_Scorer computes BLEU-1..4, ROUGE-L and CIDEr on untokenized captions
(METEOR and SPICE were removed upstream). Those numbers stay exactly as VLMEvalKit writes them, for
comparability with its leaderboards. Beside them the score file gets:
  METEOR                 METEOR 1.5 (the jar bundled in pycocoevalcap) on the same untokenized captions
  PTB_Bleu, PTB_CIDEr,   the same metrics after pycocoevalcap's PTBTokenizer, as the COCO caption
  PTB_METEOR, PTB_SPICE  evaluation server (pycocoevalcap.eval.COCOEvalCap) computes them
  notes                  what was not computed and why ("METEOR: not computed (no java on PATH)")
All scores x100, VLMEvalKit's unit. METEOR, the tokenizer and SPICE are Java programs.
`install()` wraps ImageCaptionDataset.evaluate (a reach into VLMEvalKit, named as such).
"""

from __future__ import annotations

import contextlib
import os
import shutil

from hybrid_vlm.provenance import portable_path

NO_JAVA = "no java on PATH"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"


def java_available() -> bool:
    return shutil.which("java") is not None


def meteor_line_safe(text: str) -> str:
    """`text` as one line the METEOR jar can read. pycocoevalcap talks to the jar one line per
    caption, fields split by " ||| ": a newline (or a carriage return) in a caption ends the line
    early, the jar answers out of step, and the read fails. METEOR splits words on whitespace
    anyway, so collapsing every run of it to one space changes no word; "|||" is dropped, as
    pycocoevalcap drops it from a prediction."""
    return one_line(text.replace("|||", ""))


def one_line(text: str) -> str:
    """`text` with every run of whitespace (line breaks of any kind included) one space."""
    return " ".join(text.split())


def meteor(scorer, gts: dict, res: dict) -> float:
    """METEOR 1.5 x100 from a pycocoevalcap Meteor (one jar process, reused: it takes seconds to start)."""
    safe_gts = {key: [meteor_line_safe(text) for text in texts] for key, texts in gts.items()}
    safe_res = {key: [meteor_line_safe(text) for text in texts] for key, texts in res.items()}
    try:
        score, _ = scorer.compute_score(safe_gts, safe_res)
    finally:  # compute_score keeps its lock when it raises (the jar out of memory, say): every later use would wait forever
        if scorer.lock.locked():
            scorer.lock.release()
    return 100.0 * float(score)


def ptb_tokenize(gts: dict, res: dict) -> tuple[dict, dict]:
    """pycocoevalcap's PTBTokenizer on references and predictions in one Java run."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # one line each: the Java tokenizer splits on \r, form feeds and U+2028 too, which PTBTokenizer
    # does not replace (only \n), and every later caption would be read onto the wrong image
    joined = {("g", key): [{"caption": one_line(text)} for text in texts] for key, texts in gts.items()}
    joined.update({("r", key): [{"caption": one_line(text)} for text in texts] for key, texts in res.items()})
    tokens = PTBTokenizer().tokenize(joined)
    return {key: tokens[("g", key)] for key in gts}, {key: tokens[("r", key)] for key in res}


def spice_lib() -> str:
    import pycocoevalcap.spice as spice_package

    return os.path.join(os.path.dirname(spice_package.__file__), "lib")


def spice_missing() -> list[str]:
    return [name for name in SPICE_JARS if not os.path.exists(os.path.join(spice_lib(), name))]


def ptb_scores(meteor_scorer, gts: dict, res: dict) -> tuple[dict, list[str]]:
    """COCO-standard scores on PTB-tokenized captions, and notes on what was skipped."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts_tok, res_tok = ptb_tokenize(gts, res)
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    cider, _ = Cider().compute_score(gts_tok, res_tok)
    scores, notes = {"PTB_Bleu": [100.0 * float(value) for value in bleu], "PTB_CIDEr": 100.0 * float(cider)}, []
    try:
        scores["PTB_METEOR"] = meteor(meteor_scorer, gts_tok, res_tok)
    except Exception as error:
        notes.append(f"PTB_METEOR: not computed ({type(error).__name__}: {error})")
    missing = spice_missing()
    if missing:
        notes.append(
            f"SPICE: not computed (needs Stanford CoreNLP 3.6.0: put {' and '.join(missing)} into {portable_path(spice_lib())}; "
            f"both are in {CORENLP_URL})"
        )
    else:
        try:
            from pycocoevalcap.spice.spice import Spice

            scores["PTB_SPICE"] = 100.0 * float(Spice().compute_score(gts_tok, res_tok)[0])
        except Exception as error:  # SPICE is optional: say why it is absent, keep the rest
            notes.append(f"SPICE: not computed ({type(error).__name__}: {error})")
    return scores, notes


def extra_scores(gts: dict, res: dict) -> dict:
    """The metrics added beside VLMEvalKit's, with a "notes" list (empty when all were computed).
    gts: key -> reference captions; res: key -> [prediction], as pycocoevalcap's scorers take them."""
    if not java_available():
        return {"notes": [f"METEOR: not computed ({NO_JAVA})", f"PTB-tokenized BLEU/CIDEr/METEOR and SPICE: not computed ({NO_JAVA})"]}
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    scores, notes = {}, []
    try:  # our extra metrics never cost the dataset VLMEvalKit's own scores, nor one another
        try:
            scores["METEOR"] = meteor(scorer, gts, res)
        except Exception as error:
            notes.append(f"METEOR: not computed ({type(error).__name__}: {error})")
        try:
            ptb, ptb_notes = ptb_scores(scorer, gts, res)
            scores.update(ptb)
            notes += ptb_notes
        except Exception as error:
            notes.append(f"PTB-tokenized BLEU/CIDEr/METEOR and SPICE: not computed ({type(error).__name__}: {error})")
    finally:
        close_meteor(scorer)
    return {**scores, "notes": notes}


def close_meteor(scorer) -> None:
    """Ends the jar process now: Meteor.__del__ would, but only once the scorer is collected, which
    a traceback holding this frame delays."""
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
    with contextlib.suppress(OSError):  # a write the dead jar never read may be left in the pipe's buffer
        scorer.meteor_p.stdin.close()


def captions_of(eval_file: str) -> tuple[dict, dict]:
    """(gts, res) from a caption prediction file, keyed as ImageCaptionDataset.evaluate keys them."""
    from vlmeval.smp import load

    data = load(eval_file)
    gts, res = {}, {}
    for position in range(len(data)):
        line = data.iloc[position]
        res[str(position)] = [str(line["prediction"])]
        gts[str(position)] = eval(line["answer"])  # VLMEvalKit's own parsing of the answer lists
    return gts, res


def install() -> None:
    """Wrap ImageCaptionDataset.evaluate: VLMEvalKit's scores first, then ours into the same file."""
    from vlmeval.dataset.image_caption import ImageCaptionDataset
    from vlmeval.smp import dump
    from vlmeval.smp.file import get_intermediate_file_path

    original = ImageCaptionDataset.__dict__["evaluate"].__func__
    if getattr(original, "_hybrid_vlm", False):
        return

    def evaluate(cls, eval_file, **kwargs):
        scores = original(cls, eval_file, **kwargs)
        scores.update(extra_scores(*captions_of(eval_file)))
        for note in scores["notes"]:
            print(f"[hybrid-vlm] {note}", flush=True)
        dump(scores, get_intermediate_file_path(eval_file, "_score", "json"))
        return scores

    evaluate._hybrid_vlm = True
    ImageCaptionDataset.evaluate = classmethod(evaluate)
