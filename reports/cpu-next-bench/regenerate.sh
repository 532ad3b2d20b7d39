#!/usr/bin/env bash
# Regenerates reports/cpu-next-bench/: LLaVA-NeXT (anyres) prefill, decode, memory and KV cache on
# CPU, measured beside theory, with the `next-mid` preset (random weights: Llama 1024 x 16 layers,
# CLIP 384 x 6; one 640 x 480 image = base + 4 crops = 2,340 visual tokens; 60 text tokens):
# stock transformers, the engine with nothing cut, FastV at 576 / 320 / 160 kept visual tokens,
# DyMU "mid" (thresholds calibrated here on synthetic images) and DyMU + FastV.
# Run from the repository root on an otherwise idle machine (about 15 minutes on 2 cores).
set -euo pipefail
work=runs/cpu-next-bench  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
python -m hybrid_tools.bench --preset next-mid --fastv-k 576 320 160 --dymu-target mid --dymu-images 8 \
    --repeats 5 --warmup 1 --decode-tokens 8 --sync-debug --no-progress --out "$work/bench"
python -m hybrid_tools.report "$work/bench" --name cpu-next-bench --snapshot --recipe reports/cpu-next-bench/regenerate.sh \
    --title "cpu-next-bench: LLaVA-NeXT prefill and decode on CPU, measured beside theory (next-mid preset, random weights)"
rm -rf "$work"
