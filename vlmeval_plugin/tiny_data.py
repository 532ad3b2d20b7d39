"""Bundled evaluation sets, made offline: TinyMMBench (MMBench format) and TinyCOCO (COCO_VAL format).

Images come from `hybrid_vlm.tiny.synthetic_image` (coloured shapes on a gradient), so nothing is
downloaded. Questions and captions are computed from the pixels (which colour channel dominates,
which half is brighter), so a real LLaVA can answer them and a random one scores at chance.

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
from pathlib import Path

import numpy as np
import pandas as pd

TINY_MCQ_NAME = "TinyMMBench"
TINY_CAPTION_NAME = "TinyCOCO"
BUNDLED_SETS = (TINY_MCQ_NAME, TINY_CAPTION_NAME)

MCQ_QUESTIONS = 8
CAPTION_IMAGES = 8
MCQ_SEED_OFFSET = 1000
CAPTION_SEED_OFFSET = 2000
CIRCULAR_OFFSET = 1_000_000  # MMBench convention: copy k of question i has index i + k * 1e6
COLOUR_NAMES = ("Red", "Green", "Blue")

MMBENCH_COLUMNS = [
    "index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
    "source", "l2-category", "comment", "split",
]


def image_to_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def dominant_colour(pixels: np.ndarray) -> str:
    return COLOUR_NAMES[int(pixels.reshape(-1, 3).mean(axis=0).argmax())]


def brighter_half(pixels: np.ndarray, axis: int) -> int:
    """0 if the first half (top / left) is brighter on average, else 1."""
    luminance = pixels.astype(np.float64).mean(axis=2)
    first, second = np.array_split(luminance, 2, axis=axis)
    return 0 if first.mean() >= second.mean() else 1


def mcq_question(seed: int, pixels: np.ndarray) -> dict:
    """One MMBench-style question about the synthetic image, with its options and answer letter."""
    kind = seed % 4
    if kind == 0:
        options = list(COLOUR_NAMES)
        return dict(
            question="Which colour dominates this image?",
            hint=None,
            options=options,
            answer=options.index(dominant_colour(pixels)),
            category="image_color",
            l2="coarse_perception",
        )
    if kind in (1, 2):
        axis = kind - 1  # 0: top vs bottom, 1: left vs right
        return dict(
            question="Which half of the image is brighter?",
            hint=None,
            options=[["The top half", "The bottom half"], ["The left half", "The right half"]][axis],
            answer=brighter_half(pixels, axis=axis),
            category="spatial_brightness",
            l2="fine-grained_perception",
        )
    options = list(COLOUR_NAMES)
    left_half = np.array_split(pixels, 2, axis=1)[0]
    return dict(
        question="Which colour dominates the left half of the image?",
        hint="The picture was drawn by a program: a colour gradient with a few flat shapes on top.",
        options=options,
        answer=options.index(dominant_colour(left_half)),
        category="image_color",
        l2="fine-grained_perception",
    )


def mcq_image(seed: int):
    """synthetic_image brightens towards the bottom right; every other group of four is turned
    upside down so that "which half is brighter" has both answers."""
    from hybrid_vlm.tiny import synthetic_image

    image = synthetic_image(seed)
    return image.rotate(180) if (seed // 4) % 2 else image


def build_mcq_table(num_questions: int = MCQ_QUESTIONS) -> pd.DataFrame:
    """MMBench layout with the circular copies already expanded, as in VLMEvalKit's MMBench TSVs:
    copy k rotates the options by k and stores the base question's index in `image` (saves space)."""
    rows = []
    for base_index in range(num_questions):
        seed = MCQ_SEED_OFFSET + base_index
        image = mcq_image(seed)
        item = mcq_question(seed, np.asarray(image))
        options = item["options"]
        for shift in range(len(options)):
            rotated = options[shift:] + options[:shift]
            answer_text = options[item["answer"]]
            row = {
                "index": base_index + shift * CIRCULAR_OFFSET,
                "question": item["question"],
                "hint": item["hint"],
                "answer": "ABCD"[rotated.index(answer_text)],
                "category": item["category"],
                "image": image_to_base64(image) if shift == 0 else str(base_index),
                "source": "synthetic",
                "l2-category": item["l2"],
                "comment": None,
                "split": "dev",
            }
            for letter_index, letter in enumerate("ABCD"):
                row[letter] = rotated[letter_index] if letter_index < len(rotated) else None
            rows.append(row)
    return pd.DataFrame(rows, columns=MMBENCH_COLUMNS)


def build_caption_table(num_images: int = CAPTION_IMAGES) -> pd.DataFrame:
    """COCO_VAL layout: index, image (base64), answer (a Python list literal of reference captions)."""
    from hybrid_vlm.tiny import synthetic_image

    rows = []
    for index in range(num_images):
        image = synthetic_image(CAPTION_SEED_OFFSET + index)
        pixels = np.asarray(image)
        colour = dominant_colour(pixels).lower()
        brightness = "bright" if pixels.mean() >= 127.5 else "dark"
        captions = [
            f"a {brightness} {colour} picture with a few simple shapes",
            f"some flat shapes on a {colour} gradient background",
            f"a synthetic image of circles and squares in {colour} tones",
        ]
        rows.append({"index": index, "image": image_to_base64(image), "answer": repr(captions)})
    return pd.DataFrame(rows, columns=["index", "image", "answer"])


def write_tsv(table: pd.DataFrame, path: Path) -> None:
    # Write to a temporary name first: two ranks of a torchrun may both find the file missing.
    temporary = path.with_name(f".{path.name}.{id(table)}.tmp")
    table.to_csv(temporary, sep="\t", index=False)
    temporary.replace(path)


def ensure_tiny_sets(lmu_data: str | Path, names=BUNDLED_SETS, force: bool = False) -> list[Path]:
    """Write the bundled sets that are missing from `lmu_data`; return their paths."""
    root = Path(lmu_data)
    root.mkdir(parents=True, exist_ok=True)
    builders = {TINY_MCQ_NAME: build_mcq_table, TINY_CAPTION_NAME: build_caption_table}
    written = []
    for name in names:
        path = root / f"{name}.tsv"
        if force or not path.exists():
            write_tsv(builders[name](), path)
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
