#!/usr/bin/env bash
# Regenerates reports/cpu-next-overhead/: stock transformers against the engine with nothing cut on
# LLaVA-NeXT (`next-mid` preset, 2,340 visual + 60 text tokens), prefill only, more rounds than
# cpu-next-bench: a re-check of that report's 12% prefill overhead of `vanilla`.
# Run from the repository root on an otherwise idle machine (about 4 minutes on 2 cores).
set -euo pipefail
work=runs/cpu-next-overhead  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
python -m hybrid_tools.bench --preset next-mid --fastv-k --repeats 9 --warmup 2 --decode-tokens 0 --no-memory \
    --no-progress --out "$work/bench"
python -m hybrid_tools.report "$work/bench" --name cpu-next-overhead --snapshot --recipe reports/cpu-next-overhead/regenerate.sh \
    --title "cpu-next-overhead: stock vs the engine with nothing cut, LLaVA-NeXT prefill on CPU (next-mid preset, random weights)"
rm -rf "$work"
