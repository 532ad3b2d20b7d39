"""DyMU thresholds for the testbed's own ViT, calibrated on training-distribution scenes.

The images come from the calibration stream of `scenes` (never used for training or evaluation);
the method is `hybrid_vlm.calibrate` (DyMU's batch-level threshold finding, batches of 64, the
official split), the targets DyMU's presets low / mid / high (72out / 192out / 384out: r_total
over the ViT's 6 blocks, of which LLaVA reads the first 5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..calibrate import (
    calibrate_thresholds,
    count_summary,
    load_thresholds,
    measure_token_counts,
    read_threshold_payload,
    write_threshold_file,
)
from ..provenance import replace_file
from . import scenes
from .train import jpeg_roundtrip

BATCH_SIZE = 64


def calibration_pixels(image_processor, count: int, dtype=torch.float32) -> list[torch.Tensor]:
    images = [jpeg_roundtrip(scenes.render(scenes.scene_for(scenes.CALIBRATION_STREAM, index)[0])) for index in range(count)]
    return [
        image_processor(images[start : start + BATCH_SIZE], return_tensors="pt")["pixel_values"].to(dtype)
        for start in range(0, count, BATCH_SIZE)
    ]


def load_testbed(model_dir: Path):
    """(model, image processor) of a testbed checkpoint folder."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from ..hf_compat.loading import NO_HUB_KERNELS

    return LlavaForConditionalGeneration.from_pretrained(model_dir, **NO_HUB_KERNELS).eval(), AutoImageProcessor.from_pretrained(model_dir)


@torch.no_grad()
def remeasure_testbed(model_dir: Path, out_dir: Path, targets: list[str]) -> list[Path]:
    """Measure the "achieved" counts of each testbed-<target>.json in out_dir again, with its own
    thresholds on the scenes it was calibrated on, and rewrite that field only: the thresholds, which
    the committed reports ran, stay as calibrated."""
    model, image_processor = load_testbed(model_dir)
    written, scenes_of = [], {}  # the files share their scenes: rendered once per count
    for target in targets:
        path = out_dir / f"testbed-{target}.json"
        payload = read_threshold_payload(path)
        images = payload["calibration"]["images"]
        if images not in scenes_of:
            scenes_of[images] = calibration_pixels(image_processor, images)
        counts = measure_token_counts(model, scenes_of[images], load_thresholds(path, model), progress=False)
        payload["achieved"] = count_summary(counts)
        replace_file(path, json.dumps(payload, indent=2) + "\n")
        written.append(path)
    return written


@torch.no_grad()
def calibrate_testbed(model_dir: Path, out_dir: Path, targets: list[str], num_images: int = 256) -> list[Path]:
    """Write testbed-<target>.json per target into out_dir; return the paths."""
    model, image_processor = load_testbed(model_dir)
    batches = calibration_pixels(image_processor, num_images)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for target in targets:
        payload = calibrate_thresholds(model, batches, target, progress=False)
        counts = measure_token_counts(model, batches, torch.tensor(payload["thresholds"], dtype=torch.float32), progress=False)
        payload["achieved"] = count_summary(counts)
        payload["calibration"]["images_source"] = f"hybrid_vlm.testbed.scenes calibration stream, scenes 0..{num_images - 1}"
        path = out_dir / f"testbed-{target}.json"
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        write_threshold_file(staging, payload)
        os.replace(staging, path)
        written.append(path)
    return written
