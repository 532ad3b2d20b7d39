"""Sweep FASTV_K through VLMEvalKit and print one results table.

    python -m hybrid_vlm.sweep --data MMBench_DEV_EN --fastv-k 576 288 144 72 36 0.5 0.75
    python -m hybrid_vlm.sweep --data MMBench_DEV_EN COCO_VAL --fastv-k 144 72 --vanilla \\
        --launcher "torchrun --nproc-per-node=8" -- --work-dir outputs --batch-size 8

Each setting is one `run.py` process (`python -m vlmeval_plugin`) with FASTV_K set, so each lands
in its own results folder (<work-dir>/<model>__fastv-k72-l2/, ...) and settings never share
predictions; a setting whose folder is complete is not recomputed (VLMEvalKit's reuse). Flags this
command does not know (--work-dir, --model-path, --judge, --limit, --batch-size, ...) go to every
run unchanged. At the end: one table (metric, mean tokens in / kept, mean prefill ms per row) and
the same as CSV in <work-dir>/sweep_<model>.csv.

The equivalent shell loop:
    for k in 576 288 144 72 36 0.5 0.75; do FASTV_K=$k python run.py --data MMBench_DEV_EN --model llava_v1.5_7b_fastv; done

This module does not import vlmeval: the runs are subprocesses.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from .config import parse_fastv_k


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_vlm.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--data", nargs="+", required=True, help="VLMEvalKit dataset names")
    parser.add_argument("--fastv-k", nargs="+", required=True, help="FASTV_K values: integers keep top-n, decimals prune a fraction")
    parser.add_argument("--model", default="llava_v1.5_7b_fastv", help="plugin name that reads FASTV_K (default llava_v1.5_7b_fastv)")
    parser.add_argument("--fastv-layer", type=int, default=None, help="FASTV_LAYER for every run (default: the environment's, else 2)")
    parser.add_argument("--vanilla", action="store_true", help="also run llava_v1.5_7b (nothing patched) as the reference")
    parser.add_argument("--launcher", default=None, help='e.g. "torchrun --nproc-per-node=8" (default: this Python)')
    parser.add_argument("--work-dir", default="./outputs", help="VLMEvalKit --work-dir (default ./outputs)")
    return parser


def run_command(launcher: str | None, run_args: list[str]) -> list[str]:
    if launcher:
        return shlex.split(launcher) + ["-m", "vlmeval_plugin"] + run_args
    return [sys.executable, "-m", "vlmeval_plugin"] + run_args


def main(argv: list[str] | None = None) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    passthrough = [item for item in passthrough if item != "--"]
    from vlmeval_plugin import settings, stats  # no vlmeval import in either

    # Every setting is checked before the first (long) run starts.
    base_env = dict(os.environ)
    if args.fastv_layer is not None:
        base_env["FASTV_LAYER"] = str(args.fastv_layer)
    runs = []  # (label, model name given to run.py, effective folder name, environment)
    if args.vanilla:
        runs.append(("vanilla", "llava_v1.5_7b", "llava_v1.5_7b", base_env))
    try:
        for text in args.fastv_k:
            parse_fastv_k(text)
            env = dict(base_env, FASTV_K=text)
            name = settings.effective_name(args.model, settings.hybrid_config_for(args.model, env))
            runs.append((f"FASTV_K={text}", args.model, name, env))
    except (ValueError, settings.PluginError) as error:
        print(f"hybrid_vlm.sweep: error: {error}", file=sys.stderr)
        return 2
    if not settings.VARIANTS[args.model].fastv:
        print(f"hybrid_vlm.sweep: error: {args.model} does not read FASTV_K; use a _fastv or _hybrid name", file=sys.stderr)
        return 2

    work_dir = os.environ.get("MMEVAL_ROOT", args.work_dir)
    failed = []
    for label, model, folder_name, env in runs:
        command = run_command(args.launcher, ["--data", *args.data, "--model", model, "--work-dir", work_dir, *passthrough])
        print(f"\n=== {label}: {folder_name} ===\n$ {shlex.join(command)}", flush=True)
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            failed.append(f"{label} (exit status {result.returncode})")

    rows = []
    for label, _, folder_name, _ in runs:
        for dataset in args.data:
            summary = stats.summarise(work_dir, folder_name, dataset)
            summary["setting"] = label
            rows.append(summary)
    print("\n" + stats.format_table(rows), flush=True)

    import pandas as pd

    table = pd.DataFrame(
        [
            {
                "setting": row["setting"],
                "model": row["model"],
                "dataset": row["dataset"],
                "rows": row["rows"],
                **row["metrics"],
                "tokens_in": row["tokens_in"],
                "tokens_kept": row["tokens_kept"],
                "prefill_ms": row["prefill_ms"],
                "folder": row["folder"],
            }
            for row in rows
        ]
    )
    csv_path = Path(work_dir) / f"sweep_{args.model}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    print(f"\nSweep table: {csv_path}", flush=True)
    if failed:
        print("hybrid_vlm.sweep: these runs failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
