#!/usr/bin/env bash
# Regenerates reports/cpu-mid-methods/: every registered method at 64 visual tokens, timed against
# stock transformers on CPU with the `mid` preset (random weights: Llama 1024 x 16 layers, CLIP
# 384 x 6; 576 visual + 60 text tokens), with prefill, decode per token and the theoretical KV cache.
# Run from the repository root on an otherwise idle machine (a few minutes on 2 cores): other load
# on the cores distorts the ratios.
set -euo pipefail
work=runs/cpu-mid-methods  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
python -m hybrid_tools.bench --preset mid --fastv-k --methods fastv visionzip vispruner divprune random pool --budgets 64 \
    --repeats 11 --warmup 2 --decode-tokens 16 --no-memory --no-progress --out "$work/bench"
python -m hybrid_tools.report "$work/bench" --name cpu-mid-methods --snapshot --recipe reports/cpu-mid-methods/regenerate.sh \
    --title "cpu-mid-methods: every method at 64 tokens on CPU, measured beside theory (mid preset, random weights)"
rm -rf "$work"
