"""CIDEr of a model's captions beside the CIDEr of the same captions given to the wrong images.

    python -m hybrid_tools.caption_baseline WORK_DIR MODEL [--dataset TinyCOCO] [--out FILE.json]

Shuffled: caption i is scored against the references of image (i + 1) mod n, a derangement that
keeps the caption style and vocabulary and removes only the match to the picture; a model that
looks at the image must beat it clearly. Scored with pycocoevalcap's Cider, the scorer VLMEvalKit's
COCO_Caption_Scorer uses (x 100 as VLMEvalKit prints it); the matched score is recomputed here
and must agree with VLMEvalKit's `_score.json`.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

from hybrid_vlm.provenance import portable
from vlmeval_plugin.results import load_table, prediction_file


def cider(predictions: list[str], references: list[list[str]]) -> float:
    return float(sum(cider_per_image(predictions, references)) / len(predictions))


def cider_per_image(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Each caption's CIDEr x 100 within the set (document frequencies over all its references);
    their mean is the set's CIDEr."""
    from pycocoevalcap.cider.cider import Cider

    candidates = {str(i): [text] for i, text in enumerate(predictions)}
    truth = {str(i): refs for i, refs in enumerate(references)}
    _, scores = Cider().compute_score(truth, candidates)
    return [float(score) * 100 for score in scores]


def caption_baseline(work_dir: Path, model: str, dataset: str) -> dict:
    path = prediction_file(work_dir / model, model, dataset)
    if path is None:
        raise FileNotFoundError(f"no predictions of {model} on {dataset} under {work_dir / model}")
    table = load_table(path)
    predictions = [str(text) for text in table["prediction"]]
    references = [list(ast.literal_eval(text)) for text in table["answer"]]
    if len(references) < 2:  # one image shifted onto itself would score its own references
        raise ValueError(f"{dataset}: {len(references)} image(s) in {portable(str(path))}: the shuffled floor needs at least 2")
    shifted = references[1:] + references[:1]
    return {
        "model": model, "dataset": dataset, "predictions": portable(str(path)), "images": len(predictions),
        "cider_matched": round(cider(predictions, references), 2),
        "cider_shuffled": round(cider(predictions, shifted), 2),
        "shuffle": "caption i scored against the references of image (i + 1) mod n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_tools.caption_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir")
    parser.add_argument("model")
    parser.add_argument("--dataset", default="TinyCOCO")
    parser.add_argument("--out", default=None, help="write the result as JSON here too")
    args = parser.parse_args(argv)
    try:
        result = caption_baseline(Path(args.work_dir), args.model, args.dataset)
    except (FileNotFoundError, ValueError) as error:
        print(f"hybrid_tools.caption_baseline: error: {error}", file=sys.stderr)
        return 2
    show_and_write(result, args.out)
    return 0


def show_and_write(result: dict, out: str | None) -> None:
    """Print a result as JSON, and write it to `out` too when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
