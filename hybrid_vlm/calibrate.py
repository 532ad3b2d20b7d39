"""Calibrate DyMU merge thresholds for a LLaVA checkpoint's vision tower.

    python -m hybrid_vlm.calibrate --model PATH --images DIR --target mid --out thresholds/mid.json

Method (DyMU's threshold finding, `batch_level_bipartite_soft_matching` in their open_clip fork):
images go through the CLIP layers LLaVA reads in batches; in every layer the bipartite merge
scores of all images of the batch are ranked together, the top r_l·B pairs are merged (so counts
already vary per image) and the score of the best pair left unmerged, clamped at 0, is that batch's
cutoff for the layer. A layer's threshold is the mean of its cutoffs over batches. At inference every
pair scoring above the threshold merges. The thresholds are then re-run on the calibration images
and the token count they achieve is reported (mean ± std).

Target convention: the number of patch tokens (CLS excluded) at the layer LLaVA reads
(vision_feature_layer, -2 = the 23rd of ViT-L's 24 layers); the last, unused layer never runs.
r_total = 576 - target is spread over the merging layers with DyMU's constant schedule (the
remainder on the first layers): r_l tokens go per layer, at most half of the layer's tokens.
Presets low / mid / high = 93 / 208 / 392 tokens are DyMU's released ViT-L-14-336 "72out",
"192out" and "384out" settings (r = 21 / 16 / 8 in every layer); with those DyMU reports
89±27 / 195±47 / 394±57 tokens on LLaVA-1.5's images.

The output JSON names the model it belongs to (a fingerprint of the vision tower: config fields and
a hash of weights that decide merging); `load_thresholds(path, model)` refuses other models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .dymu import (
    PRESETS,
    SCHEDULES,
    MergeState,
    nominal_counts,
    r_schedule,
    resolve_target,
    top_r_merge_mask,
)
from .hf_compat.clip import (
    LlavaForConditionalGeneration,
    dymu_image_features,
    merging_vision_forward,
    vision_fingerprint,
    vision_parts,
)
from .runtime import DTYPE_CHOICES, resolve_device, resolve_dtype

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
THRESHOLD_FORMAT = "hybrid-vlm/dymu-thresholds/v1"


def write_threshold_file(path: str | Path, payload: dict) -> None:
    payload = {"format": THRESHOLD_FORMAT, **payload}
    payload["thresholds"] = [None if not math.isfinite(v) else float(v) for v in payload["thresholds"]]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def read_threshold_file(path: str | Path, fingerprint: str, model_name: str = "this model") -> tuple[torch.Tensor, dict]:
    """Thresholds [L] float32 from a file made by `hybrid_vlm.calibrate`, after checking that it was
    made for the model whose vision-tower fingerprint is `fingerprint` (null = +inf = never merge)."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DyMU threshold file {path} does not exist: make one with `python -m hybrid_vlm.calibrate`") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"DyMU threshold file {path} is not valid JSON: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != THRESHOLD_FORMAT:
        raise ValueError(f"{path} is not a DyMU threshold file of format {THRESHOLD_FORMAT!r}")
    model = payload.get("model", {})
    if model.get("fingerprint") != fingerprint:
        raise ValueError(
            f"DyMU threshold file {path} was calibrated for model {model.get('name')!r} "
            f"(vision fingerprint {model.get('fingerprint')}), but it is being loaded into {model_name!r} "
            f"(vision fingerprint {fingerprint}). Thresholds are specific to a vision tower's weights: "
            "run `python -m hybrid_vlm.calibrate` for this model."
        )
    values = [math.inf if v is None else float(v) for v in payload["thresholds"]]
    return torch.tensor(values, dtype=torch.float32), payload


def load_thresholds(path: str | Path, model: LlavaForConditionalGeneration) -> torch.Tensor:
    """Thresholds [num_merging_layers] float32 on the vision tower's device, from a file made by
    this module for this very model (a ValueError naming both models otherwise)."""
    identity = vision_fingerprint(model)
    thresholds, payload = read_threshold_file(path, identity["fingerprint"], identity["name"])
    layers = len(vision_parts(model).layers)
    if thresholds.shape[0] != layers:
        raise ValueError(f"DyMU threshold file {path} has {thresholds.shape[0]} thresholds, this model merges in {layers} layers")
    device = vision_parts(model).embeddings.patch_embedding.weight.device
    return thresholds.to(device)


@torch.no_grad()
def calibrate_thresholds(
    model: LlavaForConditionalGeneration,
    batches: Iterable[torch.Tensor],
    target: int | str,
    schedule: str = "constant",
    progress: bool = True,
    total_batches: int | None = None,
) -> dict:
    """DyMU threshold finding over `batches` of pixel values; returns the threshold file's payload
    (without the achieved counts: see `measure_token_counts`)."""
    from tqdm.auto import tqdm

    parts = vision_parts(model)
    layers = len(parts.layers)
    target_count, preset = resolve_target(target, parts.num_patches)
    rs = r_schedule(layers, parts.num_patches - target_count, schedule)
    nominal = [c - parts.prefix for c in nominal_counts(parts.num_patches + parts.prefix, rs, parts.prefix)]
    if nominal[-1] != target_count:
        warnings.warn(
            f"target {target_count} tokens is out of reach: at most half the tokens can merge per layer, so "
            f"r/layer {rs} over {layers} layers leaves {nominal[-1]}; the thresholds aim at that instead",
            stacklevel=3,
        )
    sums = torch.zeros(layers, dtype=torch.float64)
    merged_counts: list[int] = []
    num_batches = num_images = 0
    largest_batch = 0
    bar = tqdm(batches, total=total_batches, desc="calibrating DyMU thresholds", unit="batch", disable=not progress)
    for pixel_values in bar:
        cutoffs = torch.zeros(layers, dtype=torch.float64)

        def select(index: int, node_max: torch.Tensor, state: MergeState, cutoffs=cutoffs) -> torch.Tensor:
            merge, cutoff = top_r_merge_mask(node_max, rs[index], state.counts(), protected=parts.prefix)
            cutoffs[index] = float(cutoff)
            return merge

        _, state, _ = merging_vision_forward(model, pixel_values, select, compact=True)
        sums += cutoffs
        num_batches += 1
        num_images += pixel_values.shape[0]
        largest_batch = max(largest_batch, pixel_values.shape[0])
        merged_counts += (state.counts() - parts.prefix).tolist()
        bar.set_postfix(tokens=f"{sum(merged_counts) / len(merged_counts):.1f}")
    if num_batches == 0:
        raise ValueError("no calibration images")
    thresholds = (sums / num_batches).tolist()
    identity = vision_fingerprint(model)
    return {
        "model": identity,
        "target": {
            "tokens": target_count,
            "preset": preset,
            "convention": "patch tokens (CLS excluded) at the CLIP layer LLaVA reads (vision_feature_layer)",
            "schedule": schedule,
            "r_per_layer": rs,
            "nominal_tokens_per_layer": nominal,
        },
        "thresholds": thresholds,
        "calibration": {
            "method": "DyMU batch-level DToMe: per layer, merge the top r*B scores of the batch; "
            "threshold = mean over batches of the best unmerged score (clamped at 0)",
            "images": num_images,
            "batches": num_batches,
            "batch_size": largest_batch,
            "tokens_during_calibration_mean": sum(merged_counts) / len(merged_counts),
        },
    }


@torch.no_grad()
def measure_token_counts(
    model: LlavaForConditionalGeneration, batches: Iterable[torch.Tensor], thresholds: torch.Tensor, progress: bool = True,
    total_batches: int | None = None,
) -> list[int]:
    """Surviving patch tokens (CLS excluded) per image with `thresholds`, as inference computes them."""
    from tqdm.auto import tqdm

    counts: list[int] = []
    for pixel_values in tqdm(batches, total=total_batches, desc="measuring token counts", unit="batch", disable=not progress):
        counts += dymu_image_features(model, pixel_values, thresholds, compact=True).num_tokens.tolist()
    return counts


def count_summary(counts: list[int]) -> dict:
    mean = sum(counts) / len(counts)
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts))
    return {"tokens_mean": mean, "tokens_std": std, "tokens_min": min(counts), "tokens_max": max(counts), "images": len(counts)}


def find_images(directory: str | Path, limit: int | None = None) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {directory}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--images {directory}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files[:limit] if limit else files


def pixel_batches(files: list[Path], image_processor, batch_size: int, device, dtype) -> Iterator[torch.Tensor]:
    from PIL import Image

    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start : start + batch_size]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        pixel_values = image_processor(images, return_tensors="pt").pixel_values
        yield pixel_values.to(device=device, dtype=dtype)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_vlm.calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="llava-hf LLaVA-1.5 checkpoint directory or hub id")
    parser.add_argument("--images", required=True, help="directory of calibration images (searched recursively)")
    parser.add_argument(
        "--target", default="mid",
        help=f"patch tokens (CLS excluded) at the layer LLaVA reads, or a preset: {', '.join(f'{k}={v}' for k, v in PRESETS.items())}",
    )
    parser.add_argument("--out", required=True, help="threshold JSON file to write")
    parser.add_argument("--batch-size", type=int, default=128, help="images per calibration batch (DyMU: 128)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant", help="r per layer schedule (DyMU default: constant)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: float16 on cuda, float32 on cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoImageProcessor

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    files = find_images(args.images, args.max_images)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
    image_processor = AutoImageProcessor.from_pretrained(args.model)
    total = math.ceil(len(files) / args.batch_size)

    def batches() -> Iterator[torch.Tensor]:
        return pixel_batches(files, image_processor, args.batch_size, device, dtype)

    payload = calibrate_thresholds(
        model, batches(), args.target, schedule=args.schedule, progress=not args.no_progress, total_batches=total
    )
    thresholds = torch.tensor(payload["thresholds"], dtype=torch.float32)
    counts = measure_token_counts(model, batches(), thresholds, progress=not args.no_progress, total_batches=total)
    payload["achieved"] = {**count_summary(counts), "note": "re-run of the thresholds on the calibration images"}
    write_threshold_file(args.out, payload)
    achieved = payload["achieved"]
    layers = len(payload["thresholds"])
    print(
        f"DyMU thresholds for {payload['model']['name']} ({layers} merging layers, target {payload['target']['tokens']}"
        f"{' = ' + payload['target']['preset'] if payload['target']['preset'] else ''}, r/layer {payload['target']['r_per_layer']}):\n"
        f"  {', '.join(f'{t:.4f}' for t in payload['thresholds'])}\n"
        f"  tokens at the read layer (CLS excluded) on {achieved['images']} calibration images: "
        f"{achieved['tokens_mean']:.1f} ± {achieved['tokens_std']:.1f} (min {achieved['tokens_min']}, max {achieved['tokens_max']})\n"
        f"  written to {args.out}",
        file=sys.stderr,
    )
    return payload


if __name__ == "__main__":
    main()
