#!/usr/bin/env bash
# Regenerates reports/method-comparison/ on CPU (about 40 minutes on 2 cores). Run from the repository root.
# Every method at 192/128/64/32/16 visual tokens (each by its own budget rule), both position modes
# at 64, random selection with 3 seeds, DyMU alone and the hybrid, on TinyMMBench (circular accuracy)
# and TinyCOCO (CIDEr), with the bundled tiny random-weight LLaVA. Its accuracies check the harness and
# rank nothing. FAMILY=llava_testbed (the trained testbed) or FAMILY=llava_v1.5_7b runs the method
# sweeps on that family instead (not run here yet).
set -euo pipefail
family=${FAMILY:-llava_tiny}
work=runs/method-comparison  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
sweep() { python -m hybrid_tools.sweep --model "$family" --data TinyMMBench TinyCOCO --work-dir "$work/outputs" "$@" -- --batch-size 8 --judge exact_matching || true; }
sweep --methods fastv random pool visionzip vispruner divprune pdrop sparsevlm dart --budgets 192 128 64 32 16 --vanilla
SELECT_SEED=1 sweep --methods random --budgets 192 128 64 32 16
SELECT_SEED=2 sweep --methods random --budgets 192 128 64 32 16
sweep --methods fastv pool visionzip vispruner divprune pdrop sparsevlm dart --budgets 64 --positions renumbered
# DyMU alone (the tiny model's mid thresholds) and the hybrid as the tiny model fixes it (those
# thresholds, then FastV halving at layer 2); with another FAMILY, replace these two lines by sweeps
# of <family>_dymu and <family>_hybrid with their DYMU_THRESHOLDS.
for name in llava_tiny_dymu llava_tiny_hybrid; do
    python -m vlmeval_plugin --data TinyMMBench TinyCOCO --model "$name" --work-dir "$work/outputs" --batch-size 8 --judge exact_matching || true
done
# Speed at the mid shape, every method at 64, against stock transformers in one process.
python -m hybrid_tools.bench --preset mid --fastv-k --methods fastv random pool visionzip vispruner divprune pdrop sparsevlm dart \
    --budgets 64 --repeats 3 --decode-tokens 8 --no-progress --out "$work/bench"
# The report: raw per-question hits and per-run counts into raw/, then the tables and plots from them.
python -m hybrid_tools.compare "$work/outputs" --bench "$work/bench" --out reports/method-comparison
rm -rf "$work"
