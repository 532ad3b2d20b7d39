#!/usr/bin/env bash
# Regenerates reports/testbed-demo/ from scratch on CPU (about two minutes on 2 cores): what the README's
# first command, `python run.py`, prints, kept as raw files. Run from the repository root.
set -euo pipefail
work=runs/testbed-demo  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
# The embedded default (the trained testbed, vanilla / FastV / DyMU + FastV, TinyMMBench + TinyCOCO),
# into a fresh work dir: VLMEvalKit would reuse the predictions of an existing ./outputs.
MMEVAL_ROOT="$work/outputs" python run.py
# --snapshot copies the raw files the report reads into reports/testbed-demo/raw/.
python -m hybrid_tools.report "$work/outputs" --name testbed-demo --snapshot --recipe reports/testbed-demo/regenerate.sh \
    --title "testbed-demo: python run.py, the embedded default (the trained testbed on TinyMMBench and TinyCOCO)"
rm -rf "$work"
