"""Row-level failures instead of set-level ones, and a quiet start-up: the plugin's reaches into
VLMEvalKit 0.0.20 internals, all in this one module (nothing in VLMEvalKit's files is changed).

Upstream, one bad row takes the whole set down:
- `ImageBaseDataset.__init__` asserts that every short image cell (a reference to another row's
  image) names an existing row, and silently drops rows whose image cell is empty;
- `vlmeval.smp.vlm.decode_base64_to_image_file` saves every image as PNG, which fails for CMYK and
  other modes PNG cannot hold, and raises on truncated data; the error reaches `infer_data`'s loop
  and ends the set.
Here a bad image cell is replaced, at load time, by a placeholder that carries the reason; the
model wrapper (vlmeval_plugin.model) turns such a row, and any row whose prompt cannot be built,
into a failed row whose prediction starts with VLMEvalKit's INFER_FAIL_MSG.

Upstream's circular (MMBench-style) scoring also round-trips its table through
`<YYYYmmddHHMMSS>.xlsx` in `/tmp` and never removes it: one file per evaluation is left behind, and two
evaluations finishing in the same second (one job per GPU) write and read the same file. Here the
name is unique to the call and the file is removed once read.

`install()` must run in every process that builds datasets, before the first one is built.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import glob
import inspect
import io
import logging
import os
import pickle
import re
import uuid
from pathlib import Path

import pandas as pd

# A placeholder longer than 64 characters, so VLMEvalKit does not read it as a row reference.
BAD_CELL_PREFIX = "hybrid-vlm unusable image cell: "
PLACEHOLDER_WIDTH = 80
ENV_FILE_MESSAGE = "Did not detect the .env file"
PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
UPSTREAM_SCRATCH = "/tmp"  # hard-coded in vlmeval.dataset.utils.multiple_choice.mcq_circular_eval


class RowError(Exception):
    """A row that cannot be answered; the message is the reason shown to the user."""


def bad_cell_reason(cell) -> str | None:
    """The reason carried by a placeholder cell, else None."""
    if isinstance(cell, str) and cell.startswith(BAD_CELL_PREFIX):
        return cell[len(BAD_CELL_PREFIX):].strip()
    return None


def placeholder(reason: str) -> str:
    return (BAD_CELL_PREFIX + reason).ljust(PLACEHOLDER_WIDTH)


def is_blank(cell) -> bool:
    """An empty table cell: None, NaN/NA, or only white space (a number such as option "3" read as int is not)."""
    if isinstance(cell, str):
        return not cell.strip()
    return cell is None or bool(pd.isna(cell))


def mark_bad_image_cells(data: pd.DataFrame, keep_empty_rows: bool) -> pd.DataFrame:
    """Replace dangling image references (and, when keep_empty_rows, empty cells) by placeholders.

    Empty cells are left alone for registered (official) sets: VLMEvalKit drops those rows on
    purpose there (text-only rows), and their row set must stay VLMEvalKit's."""
    if "image" not in data:
        return data
    data = data.copy()
    indices = [str(value) for value in data["index"]]
    cells = dict(zip(indices, data["image"]))
    fixed = []
    for cell in data["image"]:
        if is_blank(cell):
            fixed.append(placeholder("the image cell is empty") if keep_empty_rows else cell)
            continue
        text = str(cell)
        if len(text) <= 64 and not _is_full_image(cells.get(text)):
            fixed.append(placeholder(f"the image cell refers to row {text}, which does not exist or has no image"))
            continue
        fixed.append(cell)
    data["image"] = fixed
    return data


def _is_full_image(cell) -> bool:
    return not is_blank(cell) and len(str(cell)) > 64


def decode_image(base64_string: str):
    """VLMEvalKit's decode_base64_to_image, plus a full decode so truncated data fails here."""
    from PIL import Image

    reason = bad_cell_reason(base64_string)
    if reason is not None:
        raise RowError(reason)
    try:
        image = Image.open(io.BytesIO(base64.b64decode(base64_string)))
        image.load()
    except Exception as error:
        raise RowError(f"the image cannot be decoded ({type(error).__name__}: {error})") from error
    if image.mode in ("RGBA", "P", "LA"):
        image = image.convert("RGB")  # as VLMEvalKit does
    if image.mode not in PNG_MODES:
        image = image.convert("RGB")  # CMYK, YCbCr, ...: PNG cannot hold them; RGB answers the same question
    return image


def decode_base64_to_image_file(base64_string, image_path, target_size=-1):
    """Drop-in for vlmeval.smp.vlm.decode_base64_to_image_file that never writes a broken file."""
    image = decode_image(base64_string)
    if target_size > 0:
        image.thumbnail((target_size, target_size))
    os.makedirs(os.path.dirname(image_path) or ".", exist_ok=True)
    try:
        image.save(image_path)
    except Exception as error:
        if os.path.exists(image_path):
            os.remove(image_path)
        raise RowError(f"the image cannot be saved as {image_path} ({type(error).__name__}: {error})") from error


def _patch_dataset_loading() -> None:
    """Wrap every image dataset's load_data (through the instance, so subclasses' overrides are
    covered) with mark_bad_image_cells, before VLMEvalKit's reference check runs."""
    from vlmeval.dataset.image_base import ImageBaseDataset

    original_init = ImageBaseDataset.__init__
    if getattr(original_init, "_hybrid_vlm", False):
        return

    def __init__(self, dataset="MMBench", *args, **kwargs):
        load_data = self.load_data
        official = dataset in getattr(self, "DATASET_MD5", {})

        def checked_load_data(name, *load_args, **load_kwargs):
            return mark_bad_image_cells(load_data(name, *load_args, **load_kwargs), keep_empty_rows=not official)

        self.load_data = checked_load_data
        try:
            original_init(self, dataset, *args, **kwargs)
        finally:
            del self.load_data

    __init__._hybrid_vlm = True
    ImageBaseDataset.__init__ = __init__


def _patch_image_dumping() -> None:
    """dump_image looks decode_base64_to_image_file up in vlmeval.dataset.image_base's globals."""
    import vlmeval.dataset.image_base as image_base

    image_base.decode_base64_to_image_file = decode_base64_to_image_file


def _retry_failed_rows() -> None:
    """infer_data_job drops earlier predictions containing vlmeval.inference.FAIL_MSG ('Failed to
    obtain answer via API.') before resuming; INFER_FAIL_MSG ('Failed to obtain answer') is its
    prefix, so with it the rerun also regenerates the wrapper's failed rows (and API failures)."""
    import vlmeval.inference as inference
    from vlmeval.smp.file import INFER_FAIL_MSG

    inference.FAIL_MSG = INFER_FAIL_MSG


def _resume_checkpoints_cleanly() -> None:
    """infer_data resumes an interrupted run from its rank checkpoint (`out_file`, written every 10
    rows) with every entry in it: a row that failed before the interruption was never asked again,
    even once its input was fixed, and a checkpoint cut short by a kill failed every rerun. Before
    it reads the file, failed rows are dropped (as infer_data_job drops them from a finished run's
    predictions) and an unreadable file is set aside."""
    import vlmeval.inference as inference

    infer_data = inference.infer_data
    if getattr(infer_data, "_hybrid_vlm", False):
        return
    signature = inspect.signature(infer_data)

    @functools.wraps(infer_data)
    def checked_infer_data(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        out_file = call.arguments["out_file"]
        if os.path.exists(out_file):
            clean_checkpoint(out_file, inference.FAIL_MSG if call.arguments["retry_failed"] else None)
        return infer_data(*args, **kwargs)

    checked_infer_data._hybrid_vlm = True
    inference.infer_data = checked_infer_data


def clean_checkpoint(path: str, fail_message: str | None) -> None:
    """Drop the entries of VLMEvalKit's checkpoint `path` whose prediction holds `fail_message`
    (None: keep them); move an unreadable checkpoint to `<path>.unreadable`, saying so. Its rows are
    then answered again: from the plugin's stats file where they had finished."""
    try:
        with open(path, "rb") as file:
            results = pickle.load(file)
        if not isinstance(results, dict):
            raise TypeError(f"it holds a {type(results).__name__}, not a dict of predictions")
    except Exception as error:  # a torn pickle raises any of several types
        set_aside("checkpoint", path, f"{type(error).__name__}: {error}")
        return
    if fail_message is None:
        return
    kept = {index: prediction for index, prediction in results.items() if fail_message not in str(prediction)}
    if len(kept) < len(results):
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "wb") as file:
            pickle.dump(kept, file)
        os.replace(partial, path)


def set_aside_unreadable_predictions(folder: str, model: str, datasets: list[str]) -> list[str]:
    """Move each prediction file of `model` x `datasets` in `folder` that cannot be read as a table
    with index and prediction columns (an .xlsx cut short by a kill during VLMEvalKit's final write
    is a truncated zip) to `<file>.unreadable`, saying so; the paths moved. VLMEvalKit would load it
    on every rerun and fail; without it the rerun answers the rows from the plugin's stats file."""
    from .results import PREDICTION_SUFFIXES, load_table

    moved = []
    for dataset in datasets:
        for suffix in PREDICTION_SUFFIXES:
            path = os.path.join(folder, f"{model}_{dataset}.{suffix}")
            if not os.path.exists(path):
                continue
            try:
                table = load_table(Path(path))
                missing = len(table) and not {"index", "prediction"} <= set(table.columns)  # an empty set's file is fine
                problem = f"no index or prediction column in {sorted(table.columns)}" if missing else None
            except Exception as error:  # a torn xlsx raises BadZipFile, a torn json ValueError, ...
                problem = f"{type(error).__name__}: {error}"
            if problem:
                set_aside("prediction file", path, problem)
                moved.append(path)
    return moved


def set_aside(kind: str, path: str, problem: str) -> None:
    """Move an unreadable VLMEvalKit file to `<path>.unreadable`, saying so and what happens next."""
    os.replace(path, f"{path}.unreadable")
    print(f"[hybrid-vlm] the {kind} {path} could not be read ({problem}); moved to {path}.unreadable. "
          "Its rows are answered again, from the stats file where they had finished.", flush=True)


class _DropEnvFileError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return ENV_FILE_MESSAGE not in str(record.msg)


def import_vlmeval_quietly() -> None:
    """`import vlmeval` logs an ERROR when VLMEvalKit's optional .env file (API keys) is missing,
    which users read as a failure. Drop that one record while importing; everything else passes."""
    root = logging.getLogger()
    quiet = _DropEnvFileError()
    root.addFilter(quiet)
    try:
        import vlmeval  # noqa: F401
    finally:
        root.removeFilter(quiet)


def _private_circular_scratch() -> None:
    """mcq_circular_eval names its scratch file `{timestr()}.{ext}` in UPSTREAM_SCRATCH (timestr from its module's
    globals, used nowhere else there). Give each call a name of its own, and remove the file after."""
    import vlmeval.dataset.utils.multiple_choice as multiple_choice

    circular_eval = multiple_choice.mcq_circular_eval
    if getattr(circular_eval, "_hybrid_vlm", False):
        return
    second_stamp = multiple_choice.timestr
    call_stems: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("call_stems", default=None)

    def unique_stem(*args, **kwargs) -> str:
        stem = f"{second_stamp(*args, **kwargs)}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        stems = call_stems.get()
        if stems is not None:  # inside a call: its own list, so another thread's call keeps its file
            stems.append(stem)
        return stem

    def mcq_circular_eval(*args, **kwargs):
        stems: list[str] = []
        token = call_stems.set(stems)
        try:
            return circular_eval(*args, **kwargs)
        finally:
            call_stems.reset(token)
            for stem in stems:
                for path in glob.glob(os.path.join(UPSTREAM_SCRATCH, glob.escape(stem) + ".*")):
                    os.remove(path)

    mcq_circular_eval._hybrid_vlm = True
    multiple_choice.timestr = unique_stem
    multiple_choice.mcq_circular_eval = mcq_circular_eval


def install() -> None:
    import_vlmeval_quietly()
    _patch_dataset_loading()
    _patch_image_dumping()
    _retry_failed_rows()
    _resume_checkpoints_cleanly()
    _private_circular_scratch()


XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def storable_prediction(text: str) -> str:
    """`text` as VLMEvalKit's prediction file keeps it. It writes .xlsx with xlsxwriter, which
    stores a string starting with "=" as a formula (the text is lost, and a control character
    inside makes the whole file unreadable: "not well-formed (invalid token)"), and XML 1.0 has no
    place for the C0 control characters other than tab and newline. So those characters go (no
    answer or caption is made of them) and a leading "=" gets one space before it, which every
    scorer strips."""
    text = XML_ILLEGAL.sub("", text)
    return " " + text if text.startswith("=") else text
