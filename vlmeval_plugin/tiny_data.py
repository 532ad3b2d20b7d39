"""Bundled evaluation sets, made offline: TinyMMBench (MMBench format) and TinyCOCO (COCO_VAL format).

Both are held-out scenes of the testbed (`hybrid_vlm.testbed.scenes`), drawn from random streams
that training never uses: TinyMMBench has 100 base questions, 20 of each kind (the colour of a
shape, the shape of a colour, how many objects, where one object is relative to another, is there
a given object), circular copies expanded; TinyCOCO has 40 scenes with 4 reference captions each.
The shipped testbed (hybrid_vlm/testbed/checkpoint) answers them; the random tiny LLaVA scores at chance.
What needs no image is measured by `python -m hybrid_tools.blind_baselines`: a text-only prior from
training scenes beats the shipped testbed's TinyMMBench Overall (a constant letter scores 0
circularly, but the options' words are not balanced), and one constant caption scores well above 0
CIDEr on TinyCOCO.

    python -m vlmeval_plugin.tiny_data --out DIR      # writes DIR/TinyMMBench.tsv, DIR/TinyCOCO.tsv

The names do not collide with official VLMEvalKit sets. VLMEvalKit reads them as follows:
TinyMMBench is an unknown name with A/B/image columns, so it becomes a custom MCQ set, evaluated
circularly because the name contains "mmbench". TinyCOCO has no question column, so
`vlmeval_plugin.cli` registers it as an ImageCaptionDataset (no md5, so no download is attempted).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
from pathlib import Path

import pandas as pd

from hybrid_vlm.testbed import scenes

TINY_MCQ_NAME = "TinyMMBench"
TINY_CAPTION_NAME = "TinyCOCO"
BUNDLED_SETS = (TINY_MCQ_NAME, TINY_CAPTION_NAME)

MCQ_QUESTIONS = 100
CAPTION_IMAGES = 40
CIRCULAR_OFFSET = 1_000_000  # MMBench convention: copy k of question i has index i + k * 1e6
ATTEMPTS_PER_QUESTION = 64  # scenes tried for a question kind that needs two well-separated objects

MMBENCH_COLUMNS = [
    "index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
    "source", "l2-category", "comment", "split",
]


def image_to_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def held_out_question(base_index: int):
    """(image, question) of TinyMMBench's base question `base_index`: kinds in turn."""
    scene, question = held_out_scene_question(base_index)
    return scenes.render(scene), question


def held_out_scene_question(base_index: int):
    """(scene, question) of TinyMMBench's base question `base_index`, unrendered."""
    kind = scenes.QUESTION_KINDS[base_index % len(scenes.QUESTION_KINDS)]
    for attempt in range(ATTEMPTS_PER_QUESTION):
        scene, rng = scenes.scene_for(scenes.MCQ_STREAM, base_index * ATTEMPTS_PER_QUESTION + attempt)
        question = scenes.ask(scene, kind, rng)
        if question is not None:
            return scene, question
    raise RuntimeError(f"no scene with a {kind} question in {ATTEMPTS_PER_QUESTION} attempts")


def build_mcq_table(num_questions: int = MCQ_QUESTIONS) -> pd.DataFrame:
    """MMBench layout with the circular copies already expanded, as in VLMEvalKit's MMBench TSVs:
    copy k rotates the options by k and stores the base question's index in `image` (saves space)."""
    rows = []
    for base_index in range(num_questions):
        image, item = held_out_question(base_index)
        category, l2_category = scenes.CATEGORIES[item.kind]
        for shift, (rotated, letter) in enumerate(circular_copies(item.options, item.answer)):
            row = {
                "index": base_index + shift * CIRCULAR_OFFSET,
                "question": item.question,
                "hint": None,
                "answer": letter,
                "category": category,
                "image": image_to_base64(image) if shift == 0 else str(base_index),
                "source": "testbed-scenes",
                "l2-category": l2_category,
                "comment": None,
                "split": "dev",
            }
            for letter_index, letter in enumerate("ABCD"):
                row[letter] = rotated[letter_index] if letter_index < len(rotated) else None
            rows.append(row)
    return pd.DataFrame(rows, columns=MMBENCH_COLUMNS)


def circular_copies(options: tuple[str, ...], answer: int) -> list[tuple[tuple[str, ...], str]]:
    """(options, right letter) of each circular copy of a question: copy k rotates the options by k."""
    rotations = [options[shift:] + options[:shift] for shift in range(len(options))]
    return [(rotated, "ABCD"[rotated.index(options[answer])]) for rotated in rotations]


def build_caption_table(num_images: int = CAPTION_IMAGES) -> pd.DataFrame:
    """COCO_VAL layout: index, image (base64), answer (a Python list literal of reference captions)."""
    rows = []
    for index in range(num_images):
        scene, _ = scenes.scene_for(scenes.CAPTION_STREAM, index)
        rows.append({"index": index, "image": image_to_base64(scenes.render(scene)), "answer": repr(scenes.captions(scene))})
    return pd.DataFrame(rows, columns=["index", "image", "answer"])


def write_tsv(table: pd.DataFrame | str, path: Path) -> None:
    """A table (or its TSV text) to `path`, through a temporary name: two ranks of a torchrun may both
    find the file missing."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(table if isinstance(table, str) else table.to_csv(sep="\t", index=False), encoding="utf-8")
    temporary.replace(path)


BUILDERS = {TINY_MCQ_NAME: build_mcq_table, TINY_CAPTION_NAME: build_caption_table}


def tsv_text(name: str) -> str:
    """The bundled set as this generator writes it (under a second for both sets)."""
    return BUILDERS[name]().to_csv(sep="\t", index=False)


def is_current(path: Path, text: str) -> bool:
    """Whether every row of the set on disk is this generator's row of the same index, image and all
    (the whole set, or a shortened copy such as the tests' sandbox writes): a file left by an earlier
    version of the project (other scenes, another renderer) is rewritten, not reused."""
    try:
        found = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception:  # noqa: BLE001 - missing, unreadable or not a table: not ours
        return False
    expected = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False)
    if found.empty or list(found.columns) != list(expected.columns) or found["index"].duplicated().any():
        return False
    same_rows = expected.set_index("index").reindex(found["index"])
    return bool(same_rows.notna().all(axis=None) and (same_rows.to_numpy() == found.set_index("index").to_numpy()).all())


def ensure_tiny_sets(lmu_data: str | Path, names=BUNDLED_SETS, force: bool = False) -> list[Path]:
    """Write the bundled sets that are missing from `lmu_data` or stale (see `is_current`); return
    their paths. Rewriting a set also clears VLMEvalKit's cache of its images (`images/<name>`, its
    `img_root_map` of these names), which it reuses by row index whenever a file there decodes: the
    new questions were asked about the old scenes."""
    root = Path(lmu_data)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path, text = root / f"{name}.tsv", tsv_text(name)
        if force or not is_current(path, text):
            write_tsv(text, path)
            shutil.rmtree(root / "images" / name, ignore_errors=True)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the LMUData directory to write into")
    parser.add_argument("--force", action="store_true", help="rewrite files that already exist")
    args = parser.parse_args()
    for path in ensure_tiny_sets(args.out, force=args.force):
        print(path)


if __name__ == "__main__":
    main()
