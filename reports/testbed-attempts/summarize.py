"""Summarise the testbed training attempts from their raw logs: python reports/testbed-attempts/summarize.py

Prints, per run, means over windows of steps of the answer loss, the letter accuracy on the
training batches' option letters, and the probe's colour / shape accuracy on object patches (runs 4
to 8: its patch heads; run6 is the shipped checkpoint's log), and for the runs with attention losses
the mass the taught head puts on the named object's patches and on the right option's line, and
for run9 the accuracy of its mid-depth answer probe.
"""

import json
import math
from pathlib import Path

RAW = Path(__file__).resolve().parent / "raw"
SHIPPED_LOG = Path(__file__).resolve().parents[2] / "hybrid_vlm" / "testbed" / "checkpoint" / "train_log.jsonl"  # run6
LONG_RUN_WINDOW = 150  # runs 4 to 8
LONG_RUNS = ("run4", "run5", "run5-continued-600", "run7", "run8")
HALF_BATCH_WINDOW = 250  # run9: 4 images a step instead of 8
HALF_BATCH_RUNS = ("run9",)
CONTINUATION_WINDOW = 100
CONTINUATIONS = ("run8-continued-option", "run8-continued-control")
SHORT_CONTINUATION_WINDOW = 50
SHORT_CONTINUATIONS = ("run6-continued-option-tokens", "run6-continued-control-stopped")
WINDOW = 40


def mean(records, key):
    values = [r[key] for r in records if key in r and not (isinstance(r[key], float) and math.isnan(r[key]))]
    return f"{sum(values) / len(values):.3f}" if values else "-"


def main():
    print("| run | phase | steps | answer loss | letter accuracy | probe colour acc. | probe shape acc. | named-object attention | right-option attention | answer probe acc. | seconds at end |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    logs = []
    for path in sorted(RAW.glob("run*_train_log.jsonl")):
        run = path.name.split("_")[0]
        windows = {**dict.fromkeys(LONG_RUNS, LONG_RUN_WINDOW), **dict.fromkeys(HALF_BATCH_RUNS, HALF_BATCH_WINDOW),
                   **dict.fromkeys(CONTINUATIONS, CONTINUATION_WINDOW), **dict.fromkeys(SHORT_CONTINUATIONS, SHORT_CONTINUATION_WINDOW)}
        logs.append((run, path, windows.get(run, WINDOW)))
    if SHIPPED_LOG.exists():
        logs.append(("run6 (shipped)", SHIPPED_LOG, LONG_RUN_WINDOW))
    for run, path, window_size in logs:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for phase in dict.fromkeys(r.get("phase", "all") for r in records):
            rows = [r for r in records if r.get("phase", "all") == phase]
            for start in range(0, len(rows), window_size):
                window = rows[start : start + window_size]
                answer = mean(window, "answer_loss") if "answer_loss" in window[0] else mean(window, "loss")
                colour = mean(window, "probe_colour_accuracy") if "probe_colour_accuracy" in window[0] else mean(window, "patch_colour")
                shape = mean(window, "probe_shape_accuracy") if "probe_shape_accuracy" in window[0] else mean(window, "patch_shape")
                print(f"| {run} | {phase} | {window[0]['step']}–{window[-1]['step']} | {answer} | "
                      f"{mean(window, 'letter_accuracy')} | {colour} | {shape} | {mean(window, 'named_attention')} | "
                      f"{mean(window, 'option_attention')} | {mean(window, 'answer_probe')} | {window[-1]['seconds']} |")


if __name__ == "__main__":
    main()
