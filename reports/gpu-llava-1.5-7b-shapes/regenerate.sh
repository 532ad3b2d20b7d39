#!/usr/bin/env bash
# Regenerates reports/gpu-llava-1.5-7b-shapes/report.md from the raw files of the GPU run (raw/, put
# there by ingest.sh from checks.sh's $OUT). Nothing is re-measured: the GPU figures come only from raw/.
# Run from the repository root.
set -euo pipefail
here=reports/gpu-llava-1.5-7b-shapes
# each bench that came back is reported (a step stopped before writing loses only its own rows; the
# targets table then says "not measured" for what it would have shown)
benches=()
for bench in bench-bs1 bench-bs16 bench-next; do
  [ -f "$here/raw/$bench/bench.json" ] && benches+=("$here/raw/$bench")
done
[ ${#benches[@]} -gt 0 ] || { echo "no $here/raw/bench-*/bench.json: run checks.sh on a GPU, then ingest.sh" >&2; exit 2; }
extra=()  # what the run left beside its benches: parity, each step's exit status, the CUDA test results
[ -f "$here/raw/parity.json" ] && extra+=(--parity "$here/raw/parity.json")
[ -f "$here/raw/checks.log" ] && extra+=(--steps "$here/raw/checks.log")
[ -f "$here/raw/pytest.xml" ] && extra+=(--pytest "$here/raw/pytest.xml")
python -m hybrid_tools.report --bench "${benches[@]}" "${extra[@]}" \
    --name gpu-llava-1.5-7b-shapes --recipe "$here/checks.sh" --targets \
    --title "gpu-llava-1.5-7b-shapes: stock transformers vs the engine, FastV, DyMU and the hybrid at LLaVA-1.5-7B shapes on a GPU (random weights, bf16)"
