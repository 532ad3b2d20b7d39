#!/usr/bin/env bash
# Regenerates reports/method-comparison/ on CPU (about 40 minutes on 2 cores). Run from the repository root.
# Every method at 192/128/64/32/16 visual tokens (each by its own budget rule), both position modes
# at 64, random selection with 3 seeds, DyMU alone and the hybrid, on TinyMMBench (circular accuracy)
# and TinyCOCO (CIDEr), with the bundled tiny random-weight LLaVA. Its accuracies check the harness and
# rank nothing.
# FAMILY=llava_testbed runs the same sweeps on the trained testbed into reports/method-comparison-testbed/
# (DyMU and the hybrid at its shipped mid thresholds; no speed bench: the mid-shape bench is the
# tiny report's). Another FAMILY (e.g. llava_v1.5_7b) writes reports/method-comparison-<family>/ and
# runs DyMU and the hybrid only if DYMU_THRESHOLDS names its threshold file.
set -euo pipefail
family=${FAMILY:-llava_tiny}
case "$family" in
    llava_tiny) out=reports/method-comparison ;;
    llava_testbed) out=reports/method-comparison-testbed ;;
    *) out=reports/method-comparison-$family ;;
esac
work=runs/method-comparison-$family  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
sweep() { python -m hybrid_tools.sweep --model "$family" --data TinyMMBench TinyCOCO --work-dir "$work/outputs" "$@" -- --batch-size 8 --judge exact_matching || true; }
sweep --methods fastv random pool visionzip vispruner divprune pdrop sparsevlm dart --budgets 192 128 64 32 16 --vanilla
SELECT_SEED=1 sweep --methods random --budgets 192 128 64 32 16
SELECT_SEED=2 sweep --methods random --budgets 192 128 64 32 16
sweep --methods fastv pool visionzip vispruner divprune pdrop sparsevlm dart --budgets 64 --positions renumbered
# DyMU alone and the hybrid (DyMU, then FastV at layer 2) at the family's thresholds.
if [ "$family" = llava_tiny ]; then  # its mid thresholds and FastV halving, fixed by the names
    for name in llava_tiny_dymu llava_tiny_hybrid; do
        python -m vlmeval_plugin --data TinyMMBench TinyCOCO --model "$name" --work-dir "$work/outputs" --batch-size 8 --judge exact_matching || true
    done
elif [ "$family" = llava_testbed ]; then
    sweep --family testbed --model dymu --dymu mid
    sweep --family testbed --model hybrid --dymu mid --fastv-k 64 32 --fastv-layer 2
elif [ -n "${DYMU_THRESHOLDS:-}" ]; then
    sweep --model "${family}_dymu" --dymu "$DYMU_THRESHOLDS"
    sweep --model "${family}_hybrid" --dymu "$DYMU_THRESHOLDS" --fastv-k 64 32 --fastv-layer 2
else
    echo "regenerate.sh: DYMU_THRESHOLDS is not set: DyMU and the hybrid are not run for $family" >&2
fi
bench=()
if [ "$family" = llava_tiny ]; then
    # Speed at the mid shape, every method at 64, against stock transformers in one process.
    python -m hybrid_tools.bench --preset mid --fastv-k --methods fastv random pool visionzip vispruner divprune pdrop sparsevlm dart \
        --budgets 64 --repeats 3 --decode-tokens 8 --no-progress --out "$work/bench"
    bench=(--bench "$work/bench")
fi
# The report: raw per-question hits and per-run counts into raw/, then the tables and plots from them.
recipe="bash reports/method-comparison/regenerate.sh"
[ "$family" = llava_tiny ] || recipe="FAMILY=$family $recipe"
python -m hybrid_tools.compare "$work/outputs" "${bench[@]}" --out "$out" --recipe "$recipe"
rm -rf "$work"
