"""Per-row statistics beside VLMEvalKit's predictions, and the end-of-run results table.

VLMEvalKit keeps one prediction string per row. The plugin appends one JSON line per generated row
to `<work-dir>/<model>/<model>_<dataset>_stats.jsonl`:

    {"index": "17", "prediction": "B", "tokens_in": 636, "tokens_kept": 132, "prefill_s": 0.061,
     "generate_s": 0.094, "new_tokens": 2, "batch_size": 1, "rank": 0, "setting": "fastv-k72-l2"}

index: the dataset row (as a string); tokens_in: real tokens entering the LLM (text + visual, no
padding); tokens_kept: of those, the ones that reach the layers after pruning (= tokens_in when
nothing prunes); prefill_s: wall time of generate's first forward (vision tower + LLM prefill) for
the batch this row was in; generate_s: wall time of the whole generate call of that batch;
new_tokens: generated tokens including </s>; batch_size: rows in that generate call.

A line is appended (under an exclusive lock, so torchrun ranks can share the file) as soon as its
row is generated, so an interrupted run keeps every finished row; the plugin answers rows found
here without generating them again. Nothing here imports vlmeval.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
from pathlib import Path

import pandas as pd


def stats_path(folder: str | Path, model_name: str, dataset_name: str) -> Path:
    return Path(folder) / f"{model_name}_{dataset_name}_stats.jsonl"


def read_records(path: str | Path) -> dict[str, dict]:
    """index (str) -> record. Later lines win; a torn last line (killed mid-write) is skipped."""
    records: dict[str, dict] = {}
    path = Path(path)
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "index" in record and "prediction" in record:
                records[str(record["index"])] = record
    return records


def append_record(path: str | Path, record: dict) -> None:
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # A torn line left by a killed writer would swallow this one: start on a fresh line.
            if handle.tell() > 0:
                with open(path, "rb") as reader:
                    reader.seek(-1, os.SEEK_END)
                    if reader.read(1) != b"\n":
                        line = "\n" + line
            handle.write(line)
            handle.flush()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prediction_file(folder: str | Path, model_name: str, dataset_name: str) -> Path | None:
    """VLMEvalKit's prediction file (xlsx, tsv or json, per $PRED_FORMAT), if it exists."""
    for extension in ("xlsx", "tsv", "json"):
        path = Path(folder) / f"{model_name}_{dataset_name}.{extension}"
        if path.exists():
            return path
    return None


def load_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".xlsx":
        return pd.read_excel(path)
    if path.suffix == ".tsv":
        return pd.read_csv(path, sep="\t")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    return pd.read_json(path)


def read_metrics(folder: str | Path, model_name: str, dataset_name: str) -> tuple[dict, list[Path]]:
    """Headline metrics from VLMEvalKit's evaluation files: MCQ `*_acc.csv` (Overall, first split)
    and caption `*_score.json` (BLEU-1..4, ROUGE_L, CIDEr). Other datasets: files listed, no numbers."""
    prefix = f"{model_name}_{dataset_name}_"
    metrics: dict = {}
    files: list[Path] = []
    for path in sorted(glob.glob(os.path.join(glob.escape(str(folder)), glob.escape(prefix) + "*"))):
        path = Path(path)
        if path.name.endswith("_acc.csv") or path.name.endswith("_acc.json"):
            files.append(path)
            table = load_table(path)
            if "Overall" in table:
                metrics["Overall"] = float(table["Overall"].iloc[0])
        elif path.name.endswith("_score.json"):
            files.append(path)
            with open(path) as handle:
                scores = json.load(handle)
            if isinstance(scores.get("Bleu"), list):
                for order, value in enumerate(scores["Bleu"], start=1):
                    metrics[f"BLEU-{order}"] = float(value)
            for key in ("ROUGE_L", "CIDEr"):
                if key in scores:
                    metrics[key] = float(scores[key])
        elif path.name.endswith(("_result.xlsx", "_result.csv", "_result.json")):
            files.append(path)
    return metrics, files


def summarise(work_dir: str | Path, model_name: str, dataset_name: str) -> dict:
    """One row of the results table for (model, dataset): metrics, row counts and stats means."""
    folder = (Path(work_dir) / model_name).resolve()
    predictions = prediction_file(folder, model_name, dataset_name)
    rows = len(load_table(predictions)) if predictions is not None else 0
    metrics, metric_files = read_metrics(folder, model_name, dataset_name)
    records = read_records(stats_path(folder, model_name, dataset_name))
    summary = {
        "model": model_name,
        "dataset": dataset_name,
        "rows": rows,
        "metrics": metrics,
        "stats_rows": len(records),
        "tokens_in": None,
        "tokens_kept": None,
        "prefill_ms": None,
        "folder": str(folder),
        "prediction_file": str(predictions) if predictions is not None else None,
        "metric_files": [str(path) for path in metric_files],
    }
    if records:
        table = pd.DataFrame(records.values())
        summary["tokens_in"] = float(table["tokens_in"].mean())
        summary["tokens_kept"] = float(table["tokens_kept"].mean())
        summary["prefill_ms"] = float(table["prefill_s"].mean() * 1000.0)
    return summary


def headline(metrics: dict) -> str:
    """The metric a table shows first: MMBench Overall (as %), else CIDEr, else nothing."""
    if "Overall" in metrics:
        return f"Overall {100.0 * metrics['Overall']:.1f}"
    if "CIDEr" in metrics:
        return f"CIDEr {metrics['CIDEr']:.1f}  BLEU-4 {metrics.get('BLEU-4', float('nan')):.1f}"
    return "-"


def format_table(summaries: list[dict]) -> str:
    def number(value, pattern):
        return "-" if value is None else pattern.format(value)

    header = ("model", "dataset", "rows", "metric", "tokens in", "tokens kept", "prefill ms")
    lines = [
        (
            item["model"],
            item["dataset"],
            str(item["rows"]),
            headline(item["metrics"]),
            number(item["tokens_in"], "{:.1f}"),
            number(item["tokens_kept"], "{:.1f}"),
            number(item["prefill_ms"], "{:.2f}"),
        )
        for item in summaries
    ]
    widths = [max(len(row[column]) for row in [header, *lines]) for column in range(len(header))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *lines]]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)
