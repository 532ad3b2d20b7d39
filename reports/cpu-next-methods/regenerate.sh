#!/usr/bin/env bash
# Regenerates reports/cpu-next-methods/: the methods on LLaVA-NeXT (anyres) on CPU, measured beside the
# MACs model of their crops (`flops.next_method_prefill_macs`), with the `next-mid` preset (random
# weights: Llama 1024 x 16 layers, CLIP 384 x 6; one 640 x 480 image = base + 4 crops = 2,340 visual
# tokens; 60 text tokens): stock transformers, the engine with nothing cut, and every method that runs
# on NeXT at 0.11 of each image (VisionZip's and VisPruner's NeXT default; FastV at FASTV_K = 0.89).
# Run from the repository root on an otherwise idle machine (about 15 minutes on 2 cores).
set -euo pipefail
work=runs/cpu-next-methods  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
python -m hybrid_tools.bench --preset next-mid --fastv-k --methods fastv visionzip vispruner divprune pdrop dart --budgets 0.11 \
    --repeats 5 --warmup 1 --decode-tokens 8 --sync-debug --no-progress --out "$work/bench"
python -m hybrid_tools.report "$work/bench" --name cpu-next-methods --snapshot --recipe reports/cpu-next-methods/regenerate.sh \
    --title "cpu-next-methods: the methods on LLaVA-NeXT on CPU, measured beside their MACs (next-mid preset, random weights)"
rm -rf "$work"
