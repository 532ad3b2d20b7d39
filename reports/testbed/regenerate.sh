#!/usr/bin/env bash
# Regenerates reports/testbed/ on CPU (about 20 minutes on 2 cores). Run from the repository root.
# The trained testbed (hybrid_vlm/testbed/checkpoint) on its held-out TinyMMBench (100 base
# questions, circular) and TinyCOCO (40 scenes), batch size 1 so each row's prefill time is its own.
# Reads the shipped checkpoint in hybrid_vlm/testbed/checkpoint/ and its DyMU thresholds (after retraining, run
# `python -m hybrid_vlm.testbed calibrate` first); afterwards `python -m hybrid_vlm.testbed card`.
set -euo pipefail
work=runs/testbed  # inside the checkout (git-ignored), so every recorded path is relative
rm -rf "$work"
sweep() { python -m hybrid_tools.sweep --family testbed --data TinyMMBench TinyCOCO --work-dir "$work/outputs" "$@"; }
# FastV and random selection at the same layer and budgets, and the vanilla reference.
sweep --model vanilla fastv --fastv-k 288 144 64 32 16 --fastv-layer 2 --select attention random
# FastV's layer at K=64 (layer 2 ran above).
sweep --model fastv --fastv-k 64 --fastv-layer 1 3
# DyMU alone with the shipped thresholds (calibrated on training-distribution scenes).
sweep --model dymu --dymu low mid high
# The hybrid: DyMU mid, then FastV to 64 and 32 visual tokens at layer 2.
sweep --model hybrid --dymu mid --fastv-k 64 32 --fastv-layer 2
# Spatial pooling before layer 0: 2x2 / 3x3 / 4x4 blocks (144 / 64 / 36 tokens).
sweep --model pool --pool 2 3 4
# CIDEr of the vanilla captions against the references of the wrong images.
python -m hybrid_tools.caption_baseline "$work/outputs" llava_testbed --out reports/testbed/shuffled_captions.json
# What needs no image: a text-only prior on TinyMMBench (and its accuracy on 20,000 fresh questions) and one constant caption on TinyCOCO (about two minutes).
python -m hybrid_tools.blind_baselines --out reports/testbed/blind_baselines.json
# The report, with the two files above as each set's floors; --snapshot copies the raw files it reads into reports/testbed/raw/.
python -m hybrid_tools.report "$work/outputs" --name testbed --snapshot --recipe reports/testbed/regenerate.sh \
    --floors reports/testbed/blind_baselines.json reports/testbed/shuffled_captions.json \
    --title "testbed: accuracy and CIDEr against tokens kept, every method at matched budgets"
# How much of the held-out sets' text training fed word for word (seconds; the card quotes it).
python -m hybrid_tools.text_overlap --out reports/testbed/text_overlap.json
rm -rf "$work"
