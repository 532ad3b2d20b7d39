"""Per-row statistics beside VLMEvalKit's predictions, and the end-of-run results table.

VLMEvalKit keeps one prediction string per row. The plugin appends one JSON line per generated row
to `<work-dir>/<model>/<model>_<dataset>_stats.jsonl`:

    {"index": "17", "prediction": "B", "tokens_in": 636, "tokens_kept": 132, "visual_in": 576,
     "visual_kept": 72, "visual_layer_mean": 103.5, "prefill_gmacs": 1267.4756, "prefill_s": 0.061,
     "generate_s": 0.094, "new_tokens": 2, "batch_size": 1, "batch_requested": 1, "rank": 0, "setting": "fastv-k72-l2"}

index: the dataset row (as a string); tokens_in: real tokens entering the LLM (text + visual, no
padding); tokens_kept: of those, the ones that reach the layers after pruning (= tokens_in when
nothing prunes); visual_in / visual_kept / visual_layer_mean: the visual tokens entering LLM
layer 0, after the last reduction, and averaged over the LLM's layers (the three budget rules A, B
and C), read from the engine's cache state; prefill_gmacs: theoretical prefill MACs of the row
(`hybrid_vlm.flops.method_prefill_macs`, on LLaVA-NeXT `next_method_prefill_macs`, on Qwen2.5-VL
`qwen_flops.qwen_method_prefill_macs`, the method's own scoring included; null for DyMU, whose
tower counts are not recorded, and for PyramidDrop and DART on Qwen2.5-VL, whose per-layer counts follow each image); prefill_s: wall time of generate's first forward (vision tower + LLM prefill) for
the batch this row was in; generate_s: wall time of the whole generate call of that batch;
new_tokens: generated tokens including </s>; batch_size: rows in that generate call; batch_requested: the run's --batch-size (a call may hold fewer rows:
a rank's last batch, a split after running out of memory), which reports compare runs by.
A failed row's record has only index, prediction (VLMEvalKit's failure marker), error (the reason),
rank and setting; the plugin generates such a row again on the next run.

A line is appended (under an exclusive lock, so torchrun ranks can share the file) as soon as its
row is generated, so an interrupted run keeps every finished row; the plugin answers rows found
here without generating them again. `vlmeval_plugin.results` reads these files back. Nothing here
imports vlmeval.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


def stats_path(folder: str | Path, model_name: str, dataset_name: str) -> Path:
    return Path(folder) / f"{model_name}_{dataset_name}_stats.jsonl"


def read_records(path: str | Path) -> dict[str, dict]:
    """index (str) -> record. Later lines win; a torn last line (killed mid-write) is skipped."""
    records: dict[str, dict] = {}
    path = Path(path)
    if not path.exists():
        return records
    with open(path, "rb") as handle:  # bytes: a line torn inside a multi-byte character must not end the read
        for line in handle:
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
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
