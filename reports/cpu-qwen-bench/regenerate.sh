#!/usr/bin/env bash
# Regenerates reports/cpu-qwen-bench/: Qwen2.5-VL prefill, decode, memory and KV cache on CPU,
# measured beside theory, with the `qwen-mid` preset (random weights: LLM 1024 x 16 layers with 16
# query and 2 KV heads, windowed ViT 384 x 8 blocks with full attention at 3 and 7; one 1120 x 896
# image = 1,280 visual tokens; 60 text tokens): stock transformers, the engine with nothing cut, and
# FastV keeping 640 / 320 / 160 visual tokens at layer 2 with their original (t, h, w) ids.
# Run from the repository root on an otherwise idle machine (about 10 minutes on 2 cores).
set -euo pipefail
work=runs/cpu-qwen-bench  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
python -m hybrid_tools.bench --preset qwen-mid --fastv-k 640 320 160 \
    --repeats 5 --warmup 1 --decode-tokens 8 --sync-debug --no-progress --out "$work/bench"
python -m hybrid_tools.report "$work/bench" --name cpu-qwen-bench --snapshot --recipe reports/cpu-qwen-bench/regenerate.sh \
    --title "cpu-qwen-bench: Qwen2.5-VL prefill and decode on CPU, measured beside theory (qwen-mid preset, random weights)"
rm -rf "$work"
