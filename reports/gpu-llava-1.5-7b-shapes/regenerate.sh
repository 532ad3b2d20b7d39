#!/usr/bin/env bash
# Regenerates reports/gpu-llava-1.5-7b-shapes/report.md from the raw files of the GPU run (raw/, put
# there by ingest.sh from checks.sh's $OUT). Nothing is re-measured: the GPU figures come only from raw/.
# Run from the repository root.
set -euo pipefail
here=reports/gpu-llava-1.5-7b-shapes
for bench in bench-bs1 bench-bs16; do
  [ -f "$here/raw/$bench/bench.json" ] || { echo "no $here/raw/$bench/bench.json: run checks.sh on a GPU, then ingest.sh" >&2; exit 2; }
done
next=(); [ -f "$here/raw/bench-next/bench.json" ] && next=("$here/raw/bench-next")
parity=(); [ -f "$here/raw/parity.json" ] && parity=(--parity "$here/raw/parity.json")
python -m hybrid_tools.report --bench "$here/raw/bench-bs1" "$here/raw/bench-bs16" "${next[@]}" "${parity[@]}" \
    --name gpu-llava-1.5-7b-shapes --recipe "$here/checks.sh" --targets \
    --title "gpu-llava-1.5-7b-shapes: stock transformers vs the engine, FastV, DyMU and the hybrid at LLaVA-1.5-7B shapes on a GPU (random weights, bf16)"
