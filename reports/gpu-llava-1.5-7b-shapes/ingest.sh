#!/usr/bin/env bash
# Copies the files a GPU run of checks.sh left in $OUT (the device tool's files_at folder) into raw/,
# then regenerates the report from them. Run from the repository root: ingest.sh FILES_AT
set -euo pipefail
here=reports/gpu-llava-1.5-7b-shapes
from=${1:?usage: ingest.sh FILES_AT (the folder holding checks.log, pytest.xml, parity.json, bench-*/)}
rm -rf "$here/raw" && mkdir -p "$here/raw"
for item in checks.log pytest.xml parity.json bench-bs1 bench-bs16 bench-next; do
  if [ -e "$from/$item" ]; then cp -r "$from/$item" "$here/raw/"; else echo "missing from the run: $item" >&2; fi
done
chmod -R u+w "$here/raw"
bash "$here/regenerate.sh"
