"""The one reader of evaluation results: VLMEvalKit's output files and the plugin's stats sidecars,
as typed records. run.py's summary, `python -m hybrid_tools.sweep` and `python -m hybrid_tools.report`
all read through here, so one run shows the same numbers everywhere.

A VLMEvalKit work dir holds one folder per model name, `<work_dir>/<model>/`, and in it per dataset:
    <model>_<dataset>.{xlsx,tsv,json}          predictions (one row per question)
    <model>_<dataset>_acc.{csv,...}            MCQ accuracy: report_acc's table, fractions, a row per split
    <model>_<dataset>_score.json               caption scores: {"Bleu": [4], "ROUGE_L", "CIDEr"}, x100
    <model>_<dataset>_stats.jsonl              the plugin's per-row sidecar (vlmeval_plugin.stats)
plus VLMEvalKit's `status.json` and run.py's `run_info.json` per model folder, and the sweep
records `sweep_<tag>.json` at the top.

One rule per quantity:
- split: the `dev` row of an acc table with several splits, else its first row;
- main metric: MCQ `Overall`; captions `CIDEr`; any other score file its first numeric field;
- units: MCQ accuracy in percent, caption scores as VLMEvalKit writes them (x100);
- prefill time: the median over rows, in ms (`prefill_ms_median`), the one statistic of it
  anywhere; tokens in / kept, visual tokens in / kept / layer-averaged, theoretical
  prefill GMACs and new tokens: means over rows.

Nothing here imports vlmeval.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .stats import read_records, stats_path

PREDICTION_SUFFIXES = ("xlsx", "tsv", "json")
TABLE_SUFFIXES = ("csv", "xlsx", "tsv", "json")
PREFERRED_SPLIT = "dev"
MCQ_MAIN_METRIC = "Overall"
CAPTION_MAIN_METRIC = "CIDEr"


@dataclass(eq=False)
class DatasetResult:
    """What one model folder holds for one dataset."""

    model: str
    dataset: str
    kind: str = "none"  # mcq | caption | other | none (no metric file yet)
    metrics: dict = field(default_factory=dict)  # MCQ in %, captions x100 (VLMEvalKit's units)
    main_metric: str | None = None
    split: str | None = None
    metric_files: list = field(default_factory=list)
    prediction_file: Path | None = None
    rows: int | None = None  # prediction rows (None: no or unreadable prediction file)
    row_indices: frozenset | None = None  # their indices, as strings
    stats_file: Path | None = None
    stats_rows: int = 0
    tokens_in_mean: float | None = None
    tokens_kept_mean: float | None = None
    visual_in_mean: float | None = None  # rule A: visual tokens entering the LLM
    visual_kept_mean: float | None = None  # rule B: after the last reduction
    visual_layer_mean: float | None = None  # rule C: averaged over the LLM's layers
    prefill_gmacs_mean: float | None = None  # theoretical, the method's scoring included
    prefill_ms_median: float | None = None
    new_tokens_mean: float | None = None
    batch_sizes: list = field(default_factory=list)
    settings: list = field(default_factory=list)  # the sidecar's "setting" values
    failed_rows: list = field(default_factory=list)  # (index, reason) of rows whose latest record failed
    notes: list = field(default_factory=list)  # the score file's notes (e.g. "METEOR: not computed (...)")

    @property
    def main_value(self) -> float | None:
        return self.metrics.get(self.main_metric) if self.main_metric else None


@dataclass(eq=False)
class ModelFolder:
    """One model folder of a work dir: one configuration (model name + setting)."""

    work_dir: Path
    name: str
    results: dict = field(default_factory=dict)  # dataset -> DatasetResult
    status: dict | None = None
    status_file: Path | None = None
    run_info: list = field(default_factory=list)  # run.py's records, oldest first
    run_info_file: Path | None = None

    @property
    def folder(self) -> Path:
        return self.work_dir / self.name


# ------------------------------------------------------------------------------------ files


def load_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".xlsx":
        return pd.read_excel(path)
    if path.suffix == ".tsv":
        return pd.read_csv(path, sep="\t")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    return pd.read_json(path)


def read_json(path: Path):
    """The parsed file, or None when it is missing or not JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):  # ValueError: not JSON, or bytes cut inside a character
        return None


def prediction_file(folder: str | Path, model: str, dataset: str) -> Path | None:
    """VLMEvalKit's prediction file (xlsx, tsv or json, per $PRED_FORMAT), if it exists. Where a rerun
    under another $PRED_FORMAT left two, the one VLMEvalKit last scored, as its status.json names it
    (an eval-only run scores a file without writing it), else the newer one."""
    paths = [Path(folder) / f"{model}_{dataset}.{suffix}" for suffix in PREDICTION_SUFFIXES]
    existing = [(path.stat().st_mtime_ns, -order, path) for order, path in enumerate(paths) if path.exists()]
    if len(existing) > 1:  # rare, so status.json is read only then
        named = scored_prediction_name(read_json(Path(folder) / "status.json"), dataset)
        scored = [path for *_, path in existing if path.name == named]
        if scored:
            return scored[0]
    return max(existing)[2] if existing else None


def scored_prediction_name(status, dataset: str) -> str | None:
    """The file name of the prediction file VLMEvalKit's status.json says it scored for `dataset`."""
    datasets = status.get("datasets") if isinstance(status, dict) else None
    entry = datasets.get(dataset) if isinstance(datasets, dict) else None
    named = entry.get("prediction_file") if isinstance(entry, dict) else None
    return Path(str(named)).name if named else None


def is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------- metrics


def read_acc_metrics(path: Path) -> tuple[dict, str | None, str]:
    """An `_acc` table -> ({name: value}, split, kind). report_acc's MCQ table (a `split` column, a
    row per split; Overall, then categories; fractions) gives percentages and kind "mcq". Other
    datasets write `_acc` tables of their own (VLMEvalKit's VQA sets: one row, already in percent):
    their numbers are kept as written, kind "other"."""
    table = load_table(path)
    if len(table) == 0:
        return {}, None, "other"
    row, split = table.iloc[0], None
    if "split" in table.columns:
        splits = [str(value) for value in table["split"]]
        if PREFERRED_SPLIT in splits:
            row = table.iloc[splits.index(PREFERRED_SPLIT)]
        split = str(row["split"])
    values = {str(c): float(row[c]) for c in table.columns if c != "split" and is_number(row[c])}
    if "split" in table.columns and all(0.0 <= value <= 1.0 for value in values.values()):
        return {name: 100.0 * value for name, value in values.items()}, split, "mcq"
    return values, split, "other"


def read_score_metrics(path: Path) -> tuple[dict, str]:
    """A caption `_score.json` (BLEU-1..4 from its "Bleu" list, ROUGE_L, CIDEr; the plugin's METEOR,
    and "PTB BLEU-1..4" from "PTB_Bleu", PTB_CIDEr, PTB_METEOR, PTB_SPICE: see
    vlmeval_plugin.caption_scores) or another score file's numeric fields -> (metrics, kind)."""
    if path.suffix != ".json":
        table = load_table(path)
        if len(table) == 0:
            return {}, "other"
        row = table.iloc[0]
        return {str(c): float(row[c]) for c in table.columns if is_number(row[c])}, "other"
    scores = read_json(path)
    if not isinstance(scores, dict):
        return {}, "other"
    metrics = {}
    for key, prefix in (("Bleu", "BLEU"), ("PTB_Bleu", "PTB BLEU")):
        if isinstance(scores.get(key), list):
            metrics.update({f"{prefix}-{order}": float(v) for order, v in enumerate(scores[key], start=1) if is_number(v)})
    metrics.update({str(k).replace("_", " ", 1) if str(k).startswith("PTB_") else str(k): float(v)
                    for k, v in scores.items() if is_number(v)})
    kind = "caption" if CAPTION_MAIN_METRIC in metrics or "BLEU-4" in metrics else "other"
    return metrics, kind


def read_score_notes(path: Path) -> list[str]:
    """The plugin's notes on caption metrics that were not computed (and why)."""
    scores = read_json(path) if path.suffix == ".json" else None
    notes = scores.get("notes") if isinstance(scores, dict) else None
    return [str(note) for note in notes] if isinstance(notes, list) else []


def _read_metric_file(result: DatasetResult, folder: Path) -> None:
    stem = f"{result.model}_{result.dataset}"
    for suffix in TABLE_SUFFIXES:
        path = folder / f"{stem}_acc.{suffix}"
        if path.exists():
            result.metrics, result.split, result.kind = read_acc_metrics(path)
            result.metric_files = [path]
            result.main_metric = MCQ_MAIN_METRIC if MCQ_MAIN_METRIC in result.metrics else next(iter(result.metrics), None)
            return
    for suffix in ("json", *TABLE_SUFFIXES):
        path = folder / f"{stem}_score.{suffix}"
        if path.exists():
            result.metrics, result.kind = read_score_metrics(path)
            result.metric_files = [path]
            result.notes = read_score_notes(path)
            main = CAPTION_MAIN_METRIC if CAPTION_MAIN_METRIC in result.metrics else next(iter(result.metrics), None)
            result.main_metric = main
            return


# ------------------------------------------------------------------------------- statistics


def _read_row_stats(result: DatasetResult, folder: Path) -> None:
    """The sidecar's means over the rows the prediction file holds (`result.row_indices`; None: no
    readable prediction file, every record), so they describe the rows behind the metric."""
    path = stats_path(folder, result.model, result.dataset)
    records = list(read_records(path).values())
    scored = result.row_indices
    if scored is not None:
        outside = [record for record in records if str(record["index"]) not in scored]
        records = [record for record in records if str(record["index"]) in scored]
        if outside:
            result.notes.append(f"{len(outside)} stats records of rows the prediction file does not hold "
                                "(an earlier run of another --limit?) are left out of the means")
    if not records:
        return

    def column(key: str) -> list[float]:
        return [float(r[key]) for r in records if is_number(r.get(key))]

    def mean(key: str) -> float | None:
        values = column(key)
        return statistics.fmean(values) if values else None

    result.failed_rows = [(str(r["index"]), str(r["error"])) for r in records if r.get("error")]
    prefill_s = column("prefill_s")
    result.stats_file, result.stats_rows = path, len(records)
    result.tokens_in_mean, result.tokens_kept_mean, result.new_tokens_mean = mean("tokens_in"), mean("tokens_kept"), mean("new_tokens")
    result.visual_in_mean, result.visual_kept_mean = mean("visual_in"), mean("visual_kept")
    result.visual_layer_mean, result.prefill_gmacs_mean = mean("visual_layer_mean"), mean("prefill_gmacs")
    result.batch_sizes = requested_batch_sizes(records)
    if len(result.batch_sizes) > 1:  # a row records its batch's prefill: times at several sizes have no one median
        prefill_s = []  # the report says so beside the table
    result.prefill_ms_median = 1000.0 * statistics.median(prefill_s) if prefill_s else None
    result.settings = sorted({str(r["setting"]) for r in records if r.get("setting") is not None})


def requested_batch_sizes(records: list[dict]) -> list[int]:
    """The --batch-size values the rows were generated with. A generate call may hold fewer rows
    (a rank's last batch, a split after running out of memory), so a record's own `batch_size` is not
    the setting; records written before `batch_requested` existed stand for the largest of theirs."""
    requested = {int(r["batch_requested"]) for r in records if is_number(r.get("batch_requested"))}
    older = [int(r["batch_size"]) for r in records if not is_number(r.get("batch_requested")) and is_number(r.get("batch_size"))]
    return sorted(requested | ({max(older)} if older else set()))


def read_dataset(folder: str | Path, model: str, dataset: str) -> DatasetResult:
    """Everything one model folder holds for one dataset; missing files leave their fields empty."""
    folder = Path(folder)
    result = DatasetResult(model=model, dataset=dataset)
    result.prediction_file = prediction_file(folder, model, dataset)
    if result.prediction_file is not None:
        try:
            table = load_table(result.prediction_file)
            result.rows, result.row_indices = len(table), frozenset(str(index) for index in table["index"])
        except Exception:  # an unreadable prediction file: its row count stays unknown
            result.rows = None
    try:
        _read_metric_file(result, folder)
    except Exception as error:  # a metric file torn by a kill: this dataset has no metric, the others keep theirs
        result.metrics, result.kind, result.main_metric = {}, "none", None
        result.notes.append(f"metric file unreadable ({type(error).__name__}: {error}): evaluate again (--mode eval)")
    _read_row_stats(result, folder)
    return result


# -------------------------------------------------------------------------------- work dirs


def datasets_in(folder: Path, model: str, status: dict | None) -> list[str]:
    """Dataset names of a model folder: status.json's first, then the others sorted."""
    names = [str(name) for name in status["datasets"]] if status and isinstance(status.get("datasets"), dict) else []
    prefix, found = model + "_", set()
    for path in folder.iterdir():
        rest = path.name[len(prefix):] if path.name.startswith(prefix) else None
        if rest is None:
            continue
        if rest.endswith("_stats.jsonl"):
            found.add(rest[: -len("_stats.jsonl")])
            continue
        match = re.fullmatch(r"(.+)_(acc|score)\.(csv|xlsx|tsv|json)", rest)
        # a metric file counts only beside its prediction file ("<dataset>_<group>_acc.csv" is no dataset)
        if match and prediction_file(folder, model, match.group(1)) is not None:
            found.add(match.group(1))
    return names + sorted(found - set(names))


def read_run_info(path: Path) -> list[dict]:
    data = read_json(path)
    if isinstance(data, dict):
        runs = data.get("runs") if isinstance(data.get("runs"), list) else [data]
    else:
        runs = data if isinstance(data, list) else []
    return [run for run in runs if isinstance(run, dict)]


def read_model_folder(work_dir: str | Path, name: str, datasets: list[str] | None = None) -> ModelFolder:
    """A model folder and its results: `datasets`, else every dataset found in it."""
    work_dir = Path(work_dir)
    folder = ModelFolder(work_dir=work_dir, name=name)
    status_file = folder.folder / "status.json"
    status = read_json(status_file)
    if isinstance(status, dict):
        folder.status, folder.status_file = status, status_file
    if (folder.folder / "run_info.json").exists():
        folder.run_info_file = folder.folder / "run_info.json"
        folder.run_info = read_run_info(folder.run_info_file)
    if datasets is None:
        datasets = datasets_in(folder.folder, name, folder.status) if folder.folder.is_dir() else []
    folder.results = {dataset: read_dataset(folder.folder, name, dataset) for dataset in datasets}
    return folder


def read_work_dir(work_dir: str | Path) -> list[ModelFolder]:
    """Every model folder of a work dir that holds results, sidecars or a status, by name."""
    work_dir = Path(work_dir)
    folders = [read_model_folder(work_dir, path.name) for path in sorted(work_dir.iterdir()) if path.is_dir()]
    return [folder for folder in folders if folder.results]


def read_sweep_runs(work_dir: str | Path) -> list[tuple[Path, dict]]:
    """(record file, run) for every run of every sweep record `sweep_*.json` in a work dir, the
    records oldest first (by their start time: `sweep_<tag>-2.json` sorts before `sweep_<tag>.json`
    by name), so a reader taking the last entry of a folder takes its latest run."""
    records = []
    for manifest in Path(work_dir).glob("sweep_*.json"):
        data = read_json(manifest)
        if isinstance(data, dict):
            records.append((record_start(data), record_number(manifest, data), manifest.name, manifest, data))
    return [(manifest, run) for *_, manifest, data in sorted(records) for run in data.get("runs", []) if isinstance(run, dict)]


def record_number(manifest: Path, data: dict) -> int:
    """The order of two records started within one second: 1 for `sweep_<tag>.json`, N for the
    `sweep_<tag>-N.json` a later sweep of the same tag took, as the record says; for a record
    written before it said so, N read off the name where `sweep_<tag>.json` is beside it (a tag may
    end in digits of its own: `sweep_budget-64.json`)."""
    if isinstance(data.get("record_number"), int):
        return data["record_number"]
    found = re.fullmatch(r"(sweep_.+)-(\d+)\.json", manifest.name)
    return int(found.group(2)) if found and manifest.with_name(f"{found.group(1)}.json").exists() else 1


def record_start(data: dict) -> datetime.datetime:
    """A sweep record's start time (`record_time` of its "started")."""
    return record_time(data.get("started"))


def record_time(text) -> datetime.datetime:
    """An ISO time of a record (naive times read as UTC); the earliest time when it has none."""
    try:
        moment = datetime.datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


# ---------------------------------------------------------------------------- plain text


def number_text(value: float | None, spec: str = ".1f") -> str:
    if value is None or not math.isfinite(value):
        return "–"
    text = format(value, spec)
    if re.fullmatch(r"-0(\.0*)?", text):  # a tiny negative that rounds to zero has no sign
        text = ("+" if spec.startswith("+") else "") + text[1:]
    return text


def metric_text(result: DatasetResult) -> str:
    """The main metric as a table shows it: "Overall 64.2", "CIDEr 110.4", or "-"."""
    return f"{result.main_metric} {number_text(result.main_value)}" if result.main_metric else "-"


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns with a dashed rule under the header (terminal output)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


SUMMARY_HEADER = ("model", "dataset", "rows", "metric", "tokens in (mean)", "tokens kept (mean)", "prefill ms (median)")


def rows_text(result: DatasetResult) -> str:
    """Prediction rows, and how many of them failed (scored as misses, listed below the table);
    without a readable prediction file, the stats records the means are over."""
    if result.rows is not None:
        return f"{result.rows} ({len(result.failed_rows)} failed)" if result.failed_rows else str(result.rows)
    return f"{result.stats_rows} (stats only)" if result.stats_rows else "–"


def summary_table(results: list[DatasetResult]) -> str:
    """run.py's end-of-run table: one line per model x dataset."""
    rows = [
        (
            r.model, r.dataset, rows_text(r), metric_text(r),
            number_text(r.tokens_in_mean), number_text(r.tokens_kept_mean), number_text(r.prefill_ms_median, ".2f"),
        )
        for r in results
    ]
    return text_table(SUMMARY_HEADER, rows)
