#!/usr/bin/env bash
# Installs hybrid-vlm and what its evaluation needs into the current Python environment.
# VLMEvalKit (ms-vlmeval) is installed with --no-deps: it declares 68 requirements (timm, lpips, ...), and
# requirements-eval.txt names the runtime dependencies run.py, MCQ and captioning really use.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# The newest transformers release hybrid-vlm supports, unless TRANSFORMERS names another one of the
# supported range (pyproject.toml), e.g. TRANSFORMERS=5.23.0 for the oldest.
TRANSFORMERS=${TRANSFORMERS:-5.25.*}
"$PYTHON" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$PYTHON" -m pip install --quiet "transformers==$TRANSFORMERS"
"$PYTHON" -m pip install --quiet -e ".[test,report]"
if [ -f requirements-eval.txt ]; then
  "$PYTHON" -m pip install --quiet -r requirements-eval.txt
  "$PYTHON" -m pip install --quiet --no-deps "ms-vlmeval==0.0.20"
fi
"$PYTHON" -c "import hybrid_vlm, torch, transformers; print('hybrid_vlm', hybrid_vlm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
