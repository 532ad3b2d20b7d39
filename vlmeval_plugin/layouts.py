"""Fail fast on a local TSV that lacks a column its layout needs, before any model loads.

VLMEvalKit reads a custom set's columns only deep inside inference or evaluation (a KeyError after
the model has loaded and, for a missing `answer`, after every row has been generated). The layout is
decided the way VLMEvalKit and the plugin decide it: option columns A/B make an MCQ set (VLMEvalKit's
CustomMCQDataset), a question without options a VQA set (CustomVQADataset), neither a caption set
(vlmeval_plugin.cli.register_caption_sets). Nothing here imports vlmeval.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd

IMAGE_COLUMNS = ("image", "image_path")
CAPTION_LAYOUT = "caption (COCO_VAL layout)"
LAYOUTS = {
    "MCQ (MMBench layout)": ("index", "question", "A", "B", "answer"),
    "VQA": ("index", "question", "answer"),
    CAPTION_LAYOUT: ("index", "answer"),
}


def layout_of(columns: set[str]) -> str:
    if {"A", "B"} <= columns:  # as VLMEvalKit's build_dataset: both, or it is a VQA set
        return "MCQ (MMBench layout)"
    if "question" in columns:
        return "VQA"
    return CAPTION_LAYOUT


def missing_columns(columns: set[str]) -> tuple[str, list[str]]:
    """The layout these columns describe and the columns it needs but lacks."""
    layout = layout_of(columns)
    missing = [name for name in LAYOUTS[layout] if name not in columns]
    if not set(IMAGE_COLUMNS) & columns:
        missing.append("image or image_path")
    return layout, missing


def needs_text(layout: str) -> str:
    return ", ".join(LAYOUTS[layout]) + " and image (base64) or image_path"


def check_tsv(path: Path, scored: bool = True) -> str | None:
    """None when the TSV's header has what its layout needs, else the error to show. `scored`: the
    run evaluates the set, so every row needs an answer (`--mode infer` only generates)."""
    try:
        columns = {str(name) for name in pd.read_csv(path, sep="\t", nrows=0).columns}
    except Exception as error:
        return f"{path}: cannot read its header as a TSV ({type(error).__name__}: {error})"
    layout, missing = missing_columns(columns)
    if missing:
        return (
            f"{path}: missing column(s) {', '.join(missing)}. It reads as a {layout} set, which needs the columns "
            f"{needs_text(layout)}; it has {', '.join(sorted(columns)) or 'none'}."
        )
    return index_problem(path) or (answer_problem(path, layout) if scored and layout != "VQA" else None)


def answer_problem(path: Path, layout: str) -> str | None:
    """Every row of a scored MCQ or caption set is scored against its answer: an empty one was scored
    as a miss with no word (and, in a circular set, took its whole group with it). Read as VLMEvalKit
    reads it, where "NA" or "None" is missing too. (A VQA set has no scorer: its answers are unread.)"""
    table = pd.read_csv(path, sep="\t", usecols=["index", "answer"], dtype=str)
    answer = table["answer"].fillna("").str.strip()
    empty = list(table["index"][answer == ""])  # index values, not line numbers: a quoted field may span lines
    if empty:
        more = f" (and {len(empty) - 10} more)" if len(empty) > 10 else ""
        return (f"{path}: empty answer in the row(s) of index {', '.join(empty[:10])}{more}: every row of a {layout} set is scored "
                "against its answer; fill it in or remove the row")
    if layout.startswith("caption"):
        unreadable = [index for index, text in zip(table["index"], answer) if not is_caption_list(text)]
        if unreadable:
            return (f"{path}: the answer of the row(s) of index {', '.join(unreadable[:10])} is not a non-empty list of captions "
                    "as VLMEvalKit's caption scorer reads it (a Python list of strings, e.g. ['a cat', 'a small cat'])")
    return None


def is_caption_list(text: str) -> bool:
    """What VLMEvalKit's caption scorer needs of an answer cell: a literal list or tuple of strings, not empty."""
    try:
        captions = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    return isinstance(captions, (list, tuple)) and len(captions) > 0 and all(isinstance(caption, str) for caption in captions)


def index_problem(path: Path) -> str | None:
    """Every row is keyed by its index (predictions, the stats sidecar, evaluation): a repeated index
    gave two rows one answer, and an empty one turned the column into floats that evaluation then
    refused for the whole set."""
    index = pd.read_csv(path, sep="\t", usecols=["index"], dtype=str, keep_default_na=False)["index"].str.strip()
    empty = [str(row + 1) for row in index.index[index == ""]]  # rows, not lines: a quoted field may span lines
    if empty:
        return f"{path}: empty index in data row(s) {', '.join(empty[:10])} (1 = the first row after the header): every row needs its own index"
    repeated = sorted(set(index[index.duplicated()]))
    if repeated:
        return f"{path}: index {', '.join(repeated[:10])} repeated: every row needs its own index (each keys its prediction and stats)"
    numbers = pd.to_numeric(index, errors="coerce")
    if numbers.notna().all():  # VLMEvalKit reads an all-numeric column as numbers: "1" and "01" are one row then
        same = [" and ".join(index[numbers == value]) for value in sorted(set(numbers[numbers.duplicated()]))]
        if same:
            return (f"{path}: index {'; '.join(same[:10])} are the same number, as VLMEvalKit reads the column: "
                    "every row needs its own index (each keys its prediction and stats)")
    return None


def check_local_sets(custom_names: list[str], lmu_root: str | Path, scored: bool = True) -> str | None:
    """The first problem among the custom (unregistered) sets' TSVs in LMUData, else None.
    A name without a TSV is left to VLMEvalKit (it reports unknown sets itself)."""
    for name in custom_names:
        path = Path(lmu_root) / f"{name}.tsv"
        if path.exists():
            problem = check_tsv(path, scored)
            if problem:
                return problem
    return None
