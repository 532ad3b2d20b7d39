"""The bench's outputs: ratios against the baseline row, the terminal table, bench.csv and
bench.json with the run's environment."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

from hybrid_vlm import __version__
from hybrid_vlm.provenance import git_state, portable
from vlmeval_plugin.results import number_text, text_table

from ..presets import bench_shape
from ..report.bench import IDEAL_THEORY_FOOTNOTE, prefill_theory_text

if TYPE_CHECKING:
    from .session import BenchRun


CSV_COLUMNS = (
    "config", "status", "method", "fastv_k", "fastv_layer", "scoring", "position_mode", "dymu", "mask_read",
    "batch_size", "repeats", "text_tokens", "visual_in", "visual_kept", "llm_tokens_in", "llm_tokens_kept",
    "vision_ms", "llm_prefill_ms", "prefill_ms", "prefill_ms_min", "prefill_ms_max", "decode_ms_per_token",
    "prefill_host_ms", "decode_host_ms_per_token",
    "generate_tokens_per_s", "peak_mem_mb", "peak_mem_abs_mb", "mem_kind", "kv_cache_mb_theory",
    "kv_cache_mb_prompt", "kv_cache_mb_prompt_theory",
    "vision_gmacs", "llm_prefill_gmacs", "prefill_gmacs", "decode_gmacs_per_token",
    "prefill_ratio", "prefill_theory_ratio", "prefill_ratio_minus_theory",
    "llm_prefill_ratio", "llm_prefill_theory_ratio", "llm_prefill_ratio_minus_theory",
    "decode_ratio", "decode_theory_ratio", "ratios_divide_by", "llm_prefill_gmacs_per_s", "sync_debug", "sdpa_prefill", "sdpa_decode",
    "note",
)


# bench.csv names each column's statistic, as the report's headers do; bench.json keeps the row keys
# (its meta says the same in `statistics`), which every reader of committed runs uses.
MEDIAN_COLUMNS = ("vision_ms", "llm_prefill_ms", "prefill_ms", "decode_ms_per_token", "prefill_host_ms",
                  "decode_host_ms_per_token", "generate_tokens_per_s")


MEAN_COLUMNS = ("visual_in", "visual_kept", "llm_tokens_in", "llm_tokens_kept")


CSV_HEADER = tuple(
    f"{column}_median" if column in MEDIAN_COLUMNS else f"{column}_mean" if column in MEAN_COLUMNS else column
    for column in CSV_COLUMNS
)


STATISTICS = {
    **{column: "median over the timed rounds" for column in MEDIAN_COLUMNS},
    **{column: "mean over the batch's samples" for column in MEAN_COLUMNS},
}


def environment(device, args) -> dict:

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    commit, dirty = git_state()
    env = dict(
        device=str(device), torch=torch.__version__, transformers=transformers.__version__, hybrid_vlm=__version__,
        python=platform.python_version(), platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), git_commit=commit, git_dirty=dirty,
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv=portable(sys.argv[1:]),
    )
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def median(values):
    return statistics.median(values) if values else float("nan")


def timed(row: dict) -> bool:
    """Its timed rounds stand: an ok row, or one failed only in the untimed memory or sync pass."""
    return row["status"] == "ok" or row.get("failed_in") == PASS_FAILED  # set only on a failed row that was timed


def summarize(configs, baseline_name: str) -> list[dict]:
    rows = [config.row for config in configs]
    base = next((r for r in rows if r["config"] == baseline_name and timed(r)), None)
    for row in rows:
        for measured, theoretical, key in (
            ("prefill_ms", "prefill_gmacs", "prefill"),
            ("llm_prefill_ms", "llm_prefill_gmacs", "llm_prefill"),
            ("decode_ms_per_token", "decode_gmacs_per_token", "decode"),
        ):
            ok = base is not None and timed(row)
            r = row.get(measured, math.nan) / base[measured] if ok and base.get(measured) else math.nan
            t = row.get(theoretical, math.nan) / base[theoretical] if ok and base.get(theoretical) else math.nan
            row[f"{key}_ratio"], row[f"{key}_theory_ratio"] = r, t
            if key != "decode":
                row[f"{key}_ratio_minus_theory"] = r - t
    return rows


TABLE_HEADER = (
    "config", "vis in→kept", "vision ms", "LLM ms", "prefill ms", "ratio", "theory", "ratio−th", "LLM ratio", "LLM th",
    "decode ms/tok", "peak MiB",
)


def print_table(rows, file=None):
    """The terminal table; times are medians over the repeats. A row that did not run says why below
    it, so that its reason does not widen a column."""
    lines, reasons = [], []
    for r in rows:
        if r["status"] != "ok":
            lines.append((r["config"], r["status"], *[""] * (len(TABLE_HEADER) - 2)))
            reasons.append(f"{r['config']}: {r['status']}: {r.get('note') or ''}")
            continue
        lines.append((
            r["config"], f"{number_text(r['visual_in'], '.0f')}→{number_text(r['visual_kept'], '.0f')}",
            number_text(r["vision_ms"]), number_text(r["llm_prefill_ms"]), number_text(r["prefill_ms"]),
            number_text(r["prefill_ratio"], ".3f"), prefill_theory_text(r),
            number_text(r["prefill_ratio_minus_theory"], "+.3f"), number_text(r["llm_prefill_ratio"], ".3f"),
            number_text(r["llm_prefill_theory_ratio"], ".3f"), number_text(r.get("decode_ms_per_token"), ".2f"),
            number_text(r["peak_mem_mb"], ".0f"),
        ))
    file = file or sys.stdout  # looked up now, so that a redirected stdout is the one written
    print(text_table(TABLE_HEADER, lines), file=file)
    for reason in reasons:
        print(reason, file=file)
    if any(prefill_theory_text(r).endswith("*") for r in rows if r["status"] == "ok"):
        print(IDEAL_THEORY_FOOTNOTE, file=file)


def write_outputs(out_dir: Path, rows, meta) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        writer.writerows([row.get(column) for column in CSV_COLUMNS] for row in rows)

    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    with open(out_dir / "bench.json", "w") as f:
        json.dump({"meta": meta, "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}, f, indent=2)


PASS_FAILED = "memory or sync pass"  # a failed row's `failed_in` (and note) when only its untimed passes failed (`timed`)


def bench_meta(bench: BenchRun) -> dict:
    args = bench.args
    meta = environment(bench.device, args)
    meta.update(
        preset=None if args.model else args.preset, model=portable(args.model), dtype=str(bench.dtype).replace("torch.", ""),
        batch_size=args.batch_size, text_tokens=bench.text_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats,
        warmup=args.warmup, baseline=args.baseline, shape=asdict(bench_shape(bench.model.config)), stopped=bench.stopped,
        conventions="MACs per batch; causal attention (n(n+1)/2 pairs); lm_head on the last prompt token; see hybrid_vlm.flops",
        statistics=STATISTICS,
    )
    return meta
