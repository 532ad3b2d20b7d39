#!/usr/bin/env bash
# Regenerates reports/tiny-demo/ from scratch on CPU (about a minute). Run from the repository root.
set -euo pipefail
work=runs/tiny-demo  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
# 1. The tiny random LLaVA, vanilla and hybrid, on TinyMMBench + TinyCOCO (the embedded default before
#    the trained testbed replaced it: reports/testbed-demo/), into a fresh work dir: VLMEvalKit would
#    reuse the predictions of an existing ./outputs.
MMEVAL_ROOT="$work/outputs" python run.py --data TinyMMBench TinyCOCO --model llava_tiny llava_tiny_hybrid
# 2. Speed and FLOPs of the same tiny model, with its DyMU "mid" thresholds for the DyMU and hybrid rows.
dymu=$(python -c "from hybrid_vlm.tiny import ensure_tiny_thresholds; print(ensure_tiny_thresholds())")
python -m hybrid_tools.bench --preset tiny --repeats 3 --dymu "$dymu" --no-progress --out "$work/bench"
# 3. The report; --snapshot copies the raw files it reads into reports/tiny-demo/raw/.
python -m hybrid_tools.report "$work/outputs" --bench "$work/bench" --name tiny-demo --snapshot \
    --recipe reports/tiny-demo/regenerate.sh --title "tiny-demo: the embedded default on the tiny random-weight LLaVA"
rm -rf "$work"
