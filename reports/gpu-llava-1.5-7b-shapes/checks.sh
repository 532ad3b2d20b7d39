#!/usr/bin/env bash
# The one GPU run of issue 10 (step limits 400 s, then the NeXT step until 515 s; about 5 minutes of work expected on an H100/H200): the engine tests on CUDA, parity
# with stock transformers in bf16, then LLaVA-1.5-7B-shape speed, memory, KV cache, host syncs and SDPA
# backends against stock transformers, and last (if time is left) the LLaVA-NeXT-7B shape.
# Every step has its own time limit and a failed step does not stop the next; everything lands in $OUT.
#
#   here:        bash ../shared/gpu/prepare.sh huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 tokenizers==0.23.3 safetensors==0.8.0 && cp reports/gpu-llava-1.5-7b-shapes/checks.sh .gpu/checks.sh
#   rehearsal:   GPU_CHECKS_DRY=1 OUT=runs/gpu-rehearsal bash .gpu/checks.sh      (tiny models on CPU, no figures)
#   device:      run: command "bash .gpu/checks.sh", carry [".gpu"], timeout_s 540
#   afterwards:  bash reports/gpu-llava-1.5-7b-shapes/ingest.sh FILES_AT           (raw files + report)
#   on your own GPU, with this package importable: LIMIT_SCALE=4 OUT=runs/gpu bash reports/gpu-llava-1.5-7b-shapes/checks.sh
#                then bash reports/gpu-llava-1.5-7b-shapes/ingest.sh runs/gpu
# LIMIT_SCALE (a whole number, default 1) multiplies every step's limit, which is sized for one 540 s device call.
set -u
OUT=${OUT:-runs/gpu-checks-out}; mkdir -p "$OUT"
LIMIT_SCALE=${LIMIT_SCALE:-1}
if [[ ! $LIMIT_SCALE =~ ^[0-9]+$ ]] || (( 10#$LIMIT_SCALE < 1 )); then
  echo "LIMIT_SCALE=$LIMIT_SCALE: use a whole number from 1 (it multiplies every step's limit)"; exit 2
fi
LIMIT_SCALE=$((10#$LIMIT_SCALE))  # base 10: bash reads a leading 0 as octal
root=$PWD
site=$root/.gpu/site  # the carried wheels, installed
# the log names no machine's folders: the output is "$OUT", the checkout "."
exec > >(sed -u -e "s#$OUT#\$OUT#g" -e "s#$root#.#g" | tee -a "$OUT/checks.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
step() {  # step SECONDS NAME CMD...; at the limit STEP_SIGNAL (default TERM), then KILL 10 s later
  local secs=$(($1 * LIMIT_SCALE)) name=$2; shift 2; local t0=$SECONDS
  echo "== $name (limit ${secs}s): $*"; timeout -s "${STEP_SIGNAL:-TERM}" -k 10 "$secs" "$@"; local rc=$?
  echo "== $name: rc=$rc after $((SECONDS - t0))s"
}
if [ "${GPU_CHECKS_DRY:-0}" = 1 ]; then
  # the tiny LLaVA-NeXT checkpoint, saved once: the rehearsal takes the anyres path the GPU run takes
  tiny_next=$(python3 -c 'from hybrid_vlm.tiny import ensure_tiny_llava_next; print(ensure_tiny_llava_next())' | tail -n1)
  [ -d "$tiny_next" ] || { echo "the tiny LLaVA-NeXT checkpoint could not be made (got '$tiny_next')"; exit 1; }
  dev=(--device cpu --preset tiny --dtype float32); next=(--device cpu --model "$tiny_next" --dtype float32)
  reps=(--repeats 2 --warmup 1); reps16=(--repeats 1 --warmup 1)
else
  dev=(--device cuda --preset llava-1.5-7b --dtype bfloat16); next=(--device cuda --preset llava-next-7b --dtype bfloat16)
  reps=(--repeats 10 --warmup 3); reps16=(--repeats 3 --warmup 1)
fi
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
if ls .gpu/whl/*.whl >/dev/null 2>&1 && [ "${GPU_CHECKS_DRY:-0}" != 1 ]; then
  # The carried huggingface_hub, tokenizers and safetensors are spares: the carried transformers (5.25)
  # checks their versions at import (hub >= 2.4, tokenizers >= 0.23.1, safetensors >= 0.8), and the
  # machine's own, made for 5.17, may be older (its hub is 1.33). They are put in front only if the
  # machine's own fail that import, whose error is printed either way. Hub 2.4 imports httpx2, which
  # imports httpcore2 and truststore: the machine has none of them (its hub 1.x uses httpx), so they
  # travel as spares with it.
  wheels=(); spare=()
  for wheel in .gpu/whl/*.whl; do
    case ${wheel##*/} in huggingface_hub-*|httpx2-*|httpcore2-*|truststore-*|tokenizers-*|safetensors-*) spare+=("$wheel");; *) wheels+=("$wheel");; esac
  done
  install_to() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
  install_to "$site" "${wheels[@]}" || exit 1
  export PYTHONPATH="$site:$PWD"
  if ! python3 -c 'import transformers' >/dev/null 2>&1; then
    python3 -c 'import transformers' 2>&1 | grep -m 1 -E '^[A-Za-z]*Error'  # why
    if [ ${#spare[@]} -gt 0 ]; then
      echo "transformers' import fails with the machine's packages: using the carried ${spare[*]##*/}"
      install_to "$root/.gpu/site-spare" "${spare[@]}" || exit 1
      export PYTHONPATH="$site:$root/.gpu/site-spare:$PWD"
    fi
  fi
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c 'import torch, transformers, huggingface_hub, hybrid_vlm; print("torch", torch.__version__, "| transformers", transformers.__version__, "| huggingface_hub", huggingface_hub.__version__, "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))' || exit 1
# 1. Correctness on CUDA: the engine tests, where the CUDA-only sync tests run instead of skipping.
#    SIGINT at the limit: pytest then still writes its junit file for the tests that ran (SIGTERM: none).
#    The files holding the CUDA-only tests (the trace's device side, the sync counts) go first, before the limit can cut.
STEP_SIGNAL=INT step 70 pytest python3 -m pytest -q -p no:cacheprovider tests/test_sdpa_kernels.py tests/test_engine.py \
  tests/test_conditional_sdpa.py tests/test_hybrid.py tests/test_dymu.py --junitxml="$OUT/pytest.xml"
# 2. Parity in bf16: the engine vs stock, and FastV K=64 without vs with a mask (logits, kept sets, greedy tokens);
#    each comparison is written as it completes.
step 50 parity python3 -m hybrid_tools.parity "${dev[@]}" --new-tokens 32 --out "$OUT/parity.json"
# 3. Batch 1: prefill, decode, memory, KV cache, host syncs and SDPA backends per row.
step 130 bench-bs1 python3 -m hybrid_tools.bench "${dev[@]}" --fastv-k 288 144 64 --dymu-target mid --sync-debug --kernels \
  "${reps[@]}" --decode-tokens 16 --no-progress --out "$OUT/bench-bs1"
rm -f "$OUT/bench-bs1/bench.csv"  # at most 8 files come back: bench.json holds every column of bench.csv
thresholds_to_log() {  # the DyMU thresholds a bench calibrated, into the log rather than a file of their own (the 8-file limit)
  [ -f "$1" ] && { echo "== DyMU thresholds the bench calibrated ($1):"; cat "$1"; echo; rm -f "$1"; }
}
thresholds_to_log "$OUT/bench-bs1/mid.json"
# 4. Batch 16: prefill, decode per token and tokens per second of a 64-token generation. The batch is
#    unpadded and passed with its all-ones mask, as generate passes one: vanilla and FastV run both
#    with the default (the mask kept in every layer, no host read) and with MASK_READ=once (read once,
#    then SDPA without a mask), with --kernels to show which SDPA backend each took and --sync-debug
#    to count that read.
step 150 bench-bs16 python3 -m hybrid_tools.bench "${dev[@]}" --fastv-k 64 --dymu-target mid --batch-size 16 \
  --mask-read never once --sync-debug --kernels "${reps16[@]}" --decode-tokens 64 --no-progress --out "$OUT/bench-bs16"
rm -f "$OUT/bench-bs16/bench.csv"
thresholds_to_log "$OUT/bench-bs16/mid.json"
# 5. LLaVA-NeXT-7B shapes (one 640 x 480 image: 2,340 visual tokens), batch 1, where pruning pays most.
# Its limit is the time left before 515 s (at least 20 s), so that with the 10 s grace to SIGKILL it ends
# inside the device call's 540 s and still writes its bench.json.
next_limit=$(((515 * LIMIT_SCALE - SECONDS) / LIMIT_SCALE)); [ "$next_limit" -ge 20 ] || next_limit=20  # step() scales it back
step "$next_limit" bench-next python3 -m hybrid_tools.bench "${next[@]}" --fastv-k 576 320 160 --sync-debug --kernels \
  --repeats 5 --warmup 2 --decode-tokens 16 --no-progress --out "$OUT/bench-next"
rm -f "$OUT/bench-next/bench.csv"
ls -la "$OUT" "$OUT"/bench-*
exec >&- 2>&-; wait  # let the log's sed | tee finish writing checks.log
