#!/usr/bin/env bash
# Regenerates reports/cpu-mid-bench/: FastV's measured prefill ratios against theory on CPU, with the
# `mid` preset (random weights: Llama 1024 x 16 layers, CLIP 384 x 6; 576 visual + 60 text tokens).
# Run from the repository root on an otherwise idle machine (a few minutes on 2 cores): other load
# on the cores distorts the ratios.
set -euo pipefail
work=runs/cpu-mid-bench  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
python -m hybrid_tools.bench --preset mid --fastv-k 288 144 64 --repeats 11 --warmup 2 --decode-tokens 0 --no-memory \
    --no-progress --out "$work/bench"
python -m hybrid_tools.report "$work/bench" --name cpu-mid-bench --snapshot --recipe reports/cpu-mid-bench/regenerate.sh \
    --title "cpu-mid-bench: FastV prefill on CPU, measured beside theory (mid preset, random weights)"
rm -rf "$work"
