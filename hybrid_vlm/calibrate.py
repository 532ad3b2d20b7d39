"""Calibrate DyMU merge thresholds for a LLaVA checkpoint's vision tower.

    python -m hybrid_vlm.calibrate --model PATH --images DIR --target 192out --out thresholds/mid.json

Method (DyMU's threshold finding, `batch_level_bipartite_soft_matching` in their open_clip fork):
images, padded to a square as LLaVA-1.5's inference pads them (`--preprocess crop`: the processor's
resize and centre crop alone, as DyMU's finder preprocesses; LLaVA-NeXT: every anyres crop), go
through the CLIP layers LLaVA reads in batches (64 images each by default, as DyMU's
shipped `threshold_finding.sh` runs per GPU); in every layer the bipartite merge scores of all
images of the batch are ranked together, the top r_l·B pairs are merged (so counts already vary per
image) and the score of the best pair left unmerged, clamped at 0, is that batch's cutoff for the
layer. A layer's threshold is the mean of its cutoffs over batches. At inference every pair scoring
above the threshold merges. The thresholds are then re-run on the calibration images and the token
count they achieve is reported (mean ± std).

Targets and schedules follow DyMU's configs (see `hybrid_vlm.dymu.PRESETS`): `--target 72out`
(or `192out-linear`, ...) removes r_total = 576 - 72 patch tokens over all 24 blocks of ViT-L with
DyMU's schedule, and the 23 blocks LLaVA reads (vision_feature_layer -2) take the first 23 entries,
so the nominal count at the read layer is 93 for 72out and 72 for 72out-linear. An integer target
counts the same way (tokens after the tower's last block). Presets low / mid / high are 72out /
192out / 384out; DyMU reports 89±27 / 195±47 / 394±57 tokens with them on LLaVA-1.5's images. A
block whose r is 0 never merges (its threshold is +inf, `null` in the file), as in DyMU. The
read_* schedules keep this project's former mapping: r_total = 576 - target over the blocks LLaVA
reads (target = nominal tokens at the read layer).

The bipartite split (`--split`, default official) must be the one inference uses; the file records it.

Numerics: cutoffs are summed in float64. DyMU's finder keeps a running mean in the model's bf16
(`threshold_running_avg` under `precision='bf16'`), which stops absorbing new batches once
threshold·count passes 256 and decays towards 0 over the shipped script's ~2000 batches; its
published thresholds therefore cannot be expected to match a float64 calibration on the same data.

The output JSON names the model it belongs to (a fingerprint of the vision tower: config fields and
a hash of weights that decide merging, plus a signature of those weights that survives a change of
float dtype); `load_thresholds(path, model)` refuses other models.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .dymu import (
    ALL_SCHEDULES,
    PRESETS,
    SPLITS,
    MergeState,
    check_split,
    nominal_counts,
    plan_merging,
    top_r_merge_mask,
)
from .hf_compat.clip import (
    MERGING_KEYS,
    READ_LAYERS,
    WEIGHT_COVERAGES,
    LlavaForConditionalGeneration,
    dymu_image_features,
    merging_vision_forward,
    read_blocks,
    signatures_match,
    tower_shape_tag,
    vision_fingerprint,
    vision_parts,
    vision_signature,
)
from .hf_compat.loading import looks_like_hub_id
from .provenance import portable_path, replace_file
from .runtime import DTYPE_CHOICES, resolve_device, resolve_dtype

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
THRESHOLD_FORMAT = "hybrid-vlm/dymu-thresholds/v2"
# v1 files predate the "split" field; every one of them was calibrated with the slot split.
READABLE_FORMATS = {THRESHOLD_FORMAT: None, "hybrid-vlm/dymu-thresholds/v1": "slot"}
DEFAULT_BATCH_SIZE = 64  # DyMU's threshold_finding.sh: BATCH_SIZE=64 per GPU (the argparse default is 128)


def write_threshold_file(path: str | Path, payload: dict) -> None:
    payload = {"format": THRESHOLD_FORMAT, **payload}
    payload["thresholds"] = [None if not math.isfinite(v) else float(v) for v in payload["thresholds"]]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(payload, indent=2) + "\n")


def read_threshold_file(path: str | Path, identity_of: Callable[[str], dict], signature_of: Callable[[str], dict] | None = None) -> tuple[torch.Tensor, dict]:
    """Thresholds [L] float32 from a file made by `hybrid_vlm.calibrate`, after checking that it was
    made for the model whose `vision_fingerprint` is `identity_of(coverage)` (null = +inf = never
    merge), over the weights the file's fingerprint covers. Where the digests differ,
    `signature_of(coverage)` (`vision_signature` of that model) may still match the file's: the same
    weights loaded in another float dtype (a float32 checkpoint calibrated in float32 and run in
    float16, say) hash differently."""
    payload = read_threshold_payload(path)
    model = payload["model"]
    coverage = model.get("weights", MERGING_KEYS)
    if coverage not in WEIGHT_COVERAGES:
        raise ValueError(f"DyMU threshold file {path}: model 'weights' is {coverage!r}; calibrate writes {READ_LAYERS!r}")
    if coverage == MERGING_KEYS:
        warnings.warn(
            f"DyMU threshold file {path} fingerprints only the q/k path of its vision tower's layers, so a tower that "
            f"differs elsewhere would pass its check: `python -m hybrid_vlm.calibrate --sign --model MODEL --out {path}` "
            "re-signs it over every weight of the layers LLaVA reads.", stacklevel=3)
    identity = identity_of(coverage)
    signature = (lambda: signature_of(coverage)) if signature_of is not None else None
    if not _same_vision_weights(model, identity, signature):
        raise ValueError(
            f"DyMU threshold file {path} was calibrated for model {model.get('name')!r} "
            f"(vision fingerprint {model.get('fingerprint')}), but it is being loaded into {identity['name']!r} "
            f"(vision fingerprint {identity['fingerprint']}; nor do their weight signatures match, where the file records one). Thresholds "
            "are specific to a vision tower's weights: run `python -m hybrid_vlm.calibrate` for this model."
        )
    values = [math.inf if v is None else float(v) for v in payload["thresholds"]]
    return torch.tensor(values, dtype=torch.float32), payload


def shape_mismatch(payload: dict, checkpoint_config: dict) -> str | None:
    """Why a threshold file cannot be a checkpoint's, from the tower shape its fingerprint records and
    the checkpoint's config.json alone (the weights are compared once loaded); None where they agree
    or either does not say."""
    vision = checkpoint_config.get("vision_config") or {}
    if vision.get("model_type", "clip_vision_model") == "clip_vision_model" and vision:
        from transformers import CLIPVisionConfig

        vision = {**CLIPVisionConfig().to_dict(), **vision}  # a saved config leaves out the class defaults
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    layer = checkpoint_config.get("vision_feature_layer", -2)
    recorded = str(payload.get("model", {}).get("fingerprint") or "").split("-sha256:")[0]
    if not recorded or not isinstance(layer, int) or any(not isinstance(vision.get(name), int) for name in fields):
        return None
    expected = tower_shape_tag(vision, read_blocks(layer, vision["num_hidden_layers"]))
    if recorded == expected:
        return None
    return f"it was calibrated for a vision tower of shape {recorded}, and this checkpoint's is {expected}"


def read_threshold_payload(path: str | Path) -> dict:
    """The contents of a threshold file, checked for shape (not yet against a model)."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DyMU threshold file {path} does not exist: make one with `python -m hybrid_vlm.calibrate`") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"DyMU threshold file {path} is not valid JSON: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path} is not a DyMU threshold file of format {' or '.join(map(repr, READABLE_FORMATS))}")
    payload.setdefault("split", READABLE_FORMATS[payload["format"]])
    check_threshold_payload(path, payload)
    return payload


def check_threshold_payload(path: str | Path, payload: dict) -> None:
    """A ValueError naming the file and the field for a hand-edited or truncated file: a NaN or a
    string would otherwise merge silently at a wrong threshold (NaN: never)."""
    if not isinstance(payload.get("model"), dict):
        raise ValueError(f"DyMU threshold file {path}: 'model' must be the object calibrate writes, got {payload.get('model')!r}")
    thresholds = payload.get("thresholds")
    if not isinstance(thresholds, list) or not thresholds:
        raise ValueError(f"DyMU threshold file {path}: 'thresholds' must be a non-empty list, got {thresholds!r}")
    for layer, value in enumerate(thresholds):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value)):
            raise ValueError(f"DyMU threshold file {path}: thresholds[{layer}] is {value!r}; each must be a finite number, or null (never merge)")
    if payload["split"] not in SPLITS:
        raise ValueError(f"DyMU threshold file {path}: 'split' is {payload['split']!r}; calibrate writes one of {', '.join(SPLITS)}")


def _same_vision_weights(recorded: dict, identity: dict, signature: Callable[[], dict] | None) -> bool:
    """The recorded fingerprint, or else (same shape and read layer) the recorded signature, is this model's."""
    if recorded.get("fingerprint") == identity["fingerprint"]:
        return True
    same_shape = str(recorded.get("fingerprint", "")).split("-sha256:")[0] == identity["fingerprint"].split("-sha256:")[0]
    return same_shape and signature is not None and "signature" in recorded and signatures_match(recorded["signature"], signature())


def load_thresholds(path: str | Path, model: LlavaForConditionalGeneration, split: str | None = None) -> torch.Tensor:
    """Thresholds [num_merging_layers] float32 on the vision tower's device, from a file made by
    this module for this very model (a ValueError naming both models otherwise). With `split`, a
    file calibrated under another bipartite split gets a warning: it still runs, but its token
    counts will not be the calibrated ones."""
    thresholds, payload = read_threshold_file(path, lambda coverage: vision_fingerprint(model, coverage),
                                              lambda coverage: vision_signature(model, coverage))
    if split is not None and payload["split"] != check_split(split):
        warnings.warn(
            f"DyMU threshold file {path} was calibrated with DYMU_SPLIT={payload['split']}, but DYMU_SPLIT={split} "
            f"merges with it: token counts will differ from the calibration's. Recalibrate with "
            f"`python -m hybrid_vlm.calibrate --split {split}` (or set DYMU_SPLIT={payload['split']}).",
            stacklevel=2,
        )
    layers = len(vision_parts(model).layers)
    if thresholds.shape[0] != layers:
        raise ValueError(f"DyMU threshold file {path} has {thresholds.shape[0]} thresholds, this model merges in {layers} layers")
    device = vision_parts(model).embeddings.patch_embedding.weight.device
    return thresholds.to(device)


@dataclass
class CutoffTally:
    """Per-layer cutoffs summed over calibration batches (float64), and what the batches held."""

    sums: torch.Tensor  # [L]
    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    tokens_left: int = 0  # patch tokens left after merging, summed over images

    def add(self, cutoffs: torch.Tensor, tokens_left_per_image: torch.Tensor) -> None:
        self.sums += cutoffs
        self.batches += 1
        self.images += tokens_left_per_image.shape[0]
        self.largest_batch = max(self.largest_batch, tokens_left_per_image.shape[0])
        self.tokens_left += int(tokens_left_per_image.sum())

    def mean_tokens(self) -> float:
        return self.tokens_left / self.images


def _checked_plan(target: int | str, schedule: str | None, parts) -> tuple:
    """The merge plan and its nominal patch counts per layer, warning when the target is out of reach."""
    layers = len(parts.layers)
    plan = plan_merging(target, schedule, parts.tower_layers, layers, parts.num_patches)
    nominal = [c - parts.prefix for c in nominal_counts(parts.num_patches + parts.prefix, plan.r_per_layer, parts.prefix)]
    if nominal[-1] != parts.num_patches - sum(plan.r_per_layer):
        warnings.warn(
            f"target {target} is out of reach: at most half the tokens can merge per layer, so r/layer {plan.r_per_layer} over "
            f"{layers} layers leaves {nominal[-1]}, not {parts.num_patches - sum(plan.r_per_layer)}; the thresholds aim at that instead",
            stacklevel=4,
        )
    return plan, nominal


def _batch_cutoffs(model, pixel_values: torch.Tensor, rs: list[int], prefix: int, split: str) -> tuple[torch.Tensor, MergeState]:
    """One batch through the merging loop, each layer merging its top r*B pairs; that layer's cutoff
    is the best unmerged score (+inf where r is 0: DyMU never merges there)."""
    cutoffs = torch.zeros(len(rs), dtype=torch.float64)

    def select(index: int, node_max: torch.Tensor, state: MergeState) -> torch.Tensor:
        if rs[index] == 0:
            cutoffs[index] = math.inf
            return torch.zeros_like(state.valid)
        merge, cutoff = top_r_merge_mask(node_max, rs[index], state.counts(), protected=prefix)
        cutoffs[index] = float(cutoff)
        return merge

    _, state, _ = merging_vision_forward(model, pixel_values, select, compact=True, split=split)
    return cutoffs, state


@torch.no_grad()
def calibrate_thresholds(
    model: LlavaForConditionalGeneration,
    batches: Iterable[torch.Tensor],
    target: int | str,
    schedule: str | None = None,
    split: str = "official",
    progress: bool = True,
    total_batches: int | None = None,
) -> dict:
    """DyMU threshold finding over `batches` of pixel values; returns the threshold file's payload
    (without the achieved counts: see `measure_token_counts`). schedule None: the one a DyMU config
    name carries, else constant; split: the bipartite split order (`dymu.SPLITS`)."""
    from tqdm.auto import tqdm

    check_split(split)
    parts = vision_parts(model)
    plan, nominal = _checked_plan(target, schedule, parts)
    tally = CutoffTally(torch.zeros(len(parts.layers), dtype=torch.float64))
    bar = tqdm(batches, total=total_batches, desc="calibrating DyMU thresholds", unit="batch", disable=not progress)
    for pixel_values in bar:
        cutoffs, state = _batch_cutoffs(model, pixel_values, plan.r_per_layer, parts.prefix, split)
        tally.add(cutoffs, state.counts() - parts.prefix)
        bar.set_postfix(tokens=f"{tally.mean_tokens():.1f}")
    if tally.batches == 0:
        raise ValueError("no calibration images")
    return _threshold_payload(model, parts, plan, nominal, split, tally)


def _threshold_payload(model, parts, plan, nominal: list[int], split: str, tally: CutoffTally) -> dict:
    identity = vision_fingerprint(model)
    if plan.schedule.startswith("read_"):
        convention = "patch tokens (CLS excluded) at the CLIP layer LLaVA reads (vision_feature_layer)"
    else:
        convention = (
            f"patch tokens (CLS excluded) after the tower's last block, as in DyMU's config names: r_total over "
            f"all {parts.tower_layers} blocks, the {len(parts.layers)} blocks LLaVA reads take the first entries"
        )
    return {
        "model": {**identity, "name": portable_path(identity["name"]), "signature": vision_signature(model)},
        "split": split,
        "target": {
            "tokens": plan.tokens,
            "preset": plan.name,
            "convention": convention,
            "schedule": plan.schedule,
            "r_per_layer": plan.r_per_layer,
            "nominal_tokens_per_layer": nominal,
        },
        "thresholds": (tally.sums / tally.batches).tolist(),
        "calibration": {
            "method": "DyMU batch-level DToMe: per layer, merge the top r*B scores of the batch; "
            "threshold = mean over batches of the best unmerged score (clamped at 0); r = 0: never merge",
            "images": tally.images,
            "batches": tally.batches,
            "batch_size": tally.largest_batch,
            "tokens_during_calibration_mean": tally.mean_tokens(),
        },
    }


@torch.no_grad()
def measure_token_counts(
    model: LlavaForConditionalGeneration, batches: Iterable[torch.Tensor], thresholds: torch.Tensor, progress: bool = True,
    total_batches: int | None = None, split: str = "official",
) -> list[int]:
    """Surviving patch tokens (CLS excluded) per image with `thresholds`, as inference computes them:
    on the static path the engine runs (compacting rounds the scores otherwise in float32, which
    flips merges whose score sits at a threshold: the testbed's are about 0.9999)."""
    from tqdm.auto import tqdm

    counts: list[int] = []
    for pixel_values in tqdm(batches, total=total_batches, desc="measuring token counts", unit="batch", disable=not progress):
        counts += dymu_image_features(model, pixel_values, thresholds, split=split).num_tokens.tolist()
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
    return files if limit is None else files[:limit]


PREPROCESS = {
    "pad": "centred on a square of the processor's mean colour, then the processor (LLaVA-1.5's 'pad', as the plugin feeds images)",
    "crop": "the processor alone: resize the short side, centre crop (DyMU's threshold_finder, open_clip's transform)",
}
ANYRES_PREPROCESS = "the processor's anyres tiling: base image and grid crops (LLaVA-NeXT)"


def readable_images(files: list[Path]) -> tuple[list[Path], dict[str, str]]:
    """(the files PIL decodes, {file: why not} for the others): a truncated download or a stray
    '._x.jpg' is named and left out before any model loads, instead of ending the run in its batch."""
    from PIL import Image

    readable, unreadable = [], {}
    for path in files:
        try:
            with Image.open(path) as image:
                image.convert("RGB")
            readable.append(path)
        except Exception as error:  # noqa: BLE001 - any decoder error: the file is named and skipped
            unreadable[str(path)] = f"{type(error).__name__}: {error}"
    return readable, unreadable


def pixel_batches(files: list[Path], image_processor, batch_size: int, device, dtype, model=None, preprocess: str = "pad") -> Iterator[torch.Tensor]:
    """[N, 3, H, W] batches of what the tower sees: for LLaVA-1.5 each image padded to a square
    first unless preprocess is "crop"; for LLaVA-NeXT (anyres) every crop of `batch_size` images
    (base image and grid crops; more than batch_size rows)."""
    from PIL import Image

    from .hf_compat.llava_next import takes_anyres, tower_pixels
    from .images import expand_to_square, mean_colour

    pad = preprocess == "pad" and not takes_anyres(model)
    background = mean_colour(image_processor)
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start : start + batch_size]:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            images.append(expand_to_square(rgb, background) if pad else rgb)
        processed = image_processor(images, return_tensors="pt")
        pixel_values = tower_pixels(model, processed.pixel_values, processed.get("image_sizes"))
        yield pixel_values.to(device=device, dtype=dtype)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_vlm.calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="llava-hf LLaVA-1.5 or LLaVA-NeXT checkpoint directory or hub id (NeXT: calibrated on every crop)")
    parser.add_argument("--images", help="directory of calibration images (searched recursively); required unless --sign")
    parser.add_argument(
        "--target", default="mid",
        help="a DyMU config name (72out, 192out, 384out, 192out-linear, ...), an integer (patch tokens after the "
        f"tower's last block; at the read layer with the read_* schedules), or a preset: "
        f"{', '.join(f'{k}={v}' for k, v in PRESETS.items())}",
    )
    parser.add_argument("--out", required=True, help="threshold JSON file to write")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help=f"images per calibration batch (default {DEFAULT_BATCH_SIZE}, as DyMU's threshold_finding.sh per GPU)",
    )
    parser.add_argument(
        "--schedule", choices=ALL_SCHEDULES, default=None,
        help="r per layer schedule (default: the one a DyMU config name carries, else constant)",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="official",
        help="bipartite split order: official (DyMU's, default) or slot (ablation); inference must use the same DYMU_SPLIT",
    )
    parser.add_argument(
        "--preprocess", choices=sorted(PREPROCESS), default="pad",
        help="LLaVA-1.5 only (LLaVA-NeXT tiles): pad (default) pads each image to a square as inference does, so the "
        "achieved counts are inference's; crop is the processor alone, as DyMU's threshold finder preprocesses",
    )
    parser.add_argument("--max-images", type=int, default=None, help="use the first N images (sorted by path); default all")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: float16 on cuda, float32 on cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--sign", action="store_true",
        help="calibrate nothing: add the weight signature to the existing file --out, made for --model before files recorded "
        "one (its fingerprint must be --model's; the model is read in float32 on the CPU). With it, a float16 load of a float32 "
        "checkpoint matches the file.",
    )
    args = parser.parse_args(argv)
    if not args.sign and not args.images:
        parser.error("--images is required (unless --sign)")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: use at least 1 image per calibration batch")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images {args.max_images}: use at least 1, or leave it out for every image")
    args.error = parser.error
    return args


def check_before_loading(args) -> tuple[list[Path], dict[str, str]]:
    """What can be checked before the model loads (minutes for a 7B), each a usage error (exit 2)
    naming the setting: the images (unreadable ones are named and left out), the output file's
    folder, and the target against the checkpoint's config. Returns (the images to calibrate on,
    {file: why it was left out})."""
    check_output_path(args)  # the cheap checks first: decoding every image of a large folder takes a while
    tower = tower_shape(args.model)
    if tower is not None:
        try:
            plan_merging(args.target, args.schedule, *tower)
        except ValueError as error:
            args.error(str(error))
    try:
        files = find_images(args.images, args.max_images)
    except FileNotFoundError as error:
        args.error(str(error))
    files, unreadable = readable_images(files)
    for path, reason in unreadable.items():
        print(f"calibrate: leaving out {portable_path(path)}, which does not decode as an image ({reason})", file=sys.stderr)
    if not files:
        args.error(f"--images {args.images}: none of its {len(unreadable)} image files decodes")
    return files, unreadable


def check_output_path(args) -> None:
    out = Path(args.out)
    if out.is_dir():
        args.error(f"--out {args.out} is a directory: name the threshold JSON file to write")
    if out.suffix.lower() != ".json":  # an --out among the --images overwrote that image, then failed on it
        args.error(f"--out {args.out}: name a .json file (the thresholds are written as JSON)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        args.error(f"--out {args.out}: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        args.error(f"--out {args.out}: not writable")


CALIBRATED_MODEL_TYPES = ("llava", "llava_next")


def check_model_kind(args) -> None:
    """A checkpoint DyMU can calibrate (LLaVA-1.5 or LLaVA-NeXT), from its config alone: anything
    else was a traceback after the load (or a hub lookup for a path that does not exist)."""
    from transformers import AutoConfig

    if not Path(args.model).expanduser().exists() and not looks_like_hub_id(args.model):
        args.error(f"--model {args.model}: no such checkpoint directory")
    try:
        model_type = AutoConfig.from_pretrained(args.model).model_type
    except Exception as error:  # noqa: BLE001 - named: a folder without a config, an unknown model_type, an uncached hub id
        args.error(f"--model {args.model}: not a checkpoint transformers can read ({type(error).__name__}: {str(error)[:200]})")
    if model_type == "qwen2_5_vl":
        args.error(f"--model {args.model}: DyMU is not implemented for Qwen2.5-VL (it merges CLIP patches; Qwen's windowed ViT "
                   "needs whole 2x2 merge units)")
    if model_type not in CALIBRATED_MODEL_TYPES:
        args.error(f"--model {args.model}: a llava-hf LLaVA-1.5 or LLaVA-NeXT checkpoint is needed (model_type "
                   f"{' or '.join(CALIBRATED_MODEL_TYPES)}), this one is {model_type!r}")


def tower_shape(model_path: str) -> tuple[int, int, int] | None:
    """(CLIP blocks, blocks LLaVA reads, patches) from the checkpoint's config alone; None where
    the config cannot be read here (the load then says why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
        vision, layer = config.vision_config, config.vision_feature_layer
        blocks = vision.num_hidden_layers
        return blocks, read_blocks(layer, blocks), (vision.image_size // vision.patch_size) ** 2
    except Exception:  # noqa: BLE001 - not a checkpoint this can read: the load reports it
        return None


def add_signature(path: str | Path, model) -> dict:
    """Record `vision_signature(model)` in the threshold file `path`, which must have been made for
    this model (the same fingerprint, over the weights the file's covers); a file of the older
    coverage is re-fingerprinted over every weight of the read layers. The thresholds and everything
    else are kept."""
    payload = read_threshold_payload(path)
    coverage = payload["model"].get("weights", MERGING_KEYS)
    identity = vision_fingerprint(model, coverage) if coverage in WEIGHT_COVERAGES else {"fingerprint": None}
    if payload["model"].get("fingerprint") != identity["fingerprint"]:
        raise ValueError(f"{path} was made for vision fingerprint {payload['model'].get('fingerprint')}, "
                         f"not this model's ({identity['fingerprint']}): its signature would not be its model's")
    current = vision_fingerprint(model)
    payload["model"].update(fingerprint=current["fingerprint"], weights=current["weights"], signature=vision_signature(model))
    replace_file(path, json.dumps(payload, indent=2) + "\n")
    return payload


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoImageProcessor

    from .hf_compat.llava_next import takes_anyres
    from .model import load_supported_model

    check_model_kind(args)
    if args.sign:
        return sign_only(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    files, unreadable = check_before_loading(args)
    model = load_supported_model(args.model, dtype=dtype, device_map={"": device}).eval()
    image_processor = AutoImageProcessor.from_pretrained(args.model)
    total = math.ceil(len(files) / args.batch_size)

    def batches() -> Iterator[torch.Tensor]:
        return pixel_batches(files, image_processor, args.batch_size, device, dtype, model, args.preprocess)

    payload = calibrate_thresholds(
        model, batches(), args.target, schedule=args.schedule, split=args.split, progress=not args.no_progress,
        total_batches=total,
    )
    anyres = takes_anyres(model)
    payload["calibration"].update(
        source_images=len(files), images_per_batch=args.batch_size,
        preprocess=ANYRES_PREPROCESS if anyres else PREPROCESS[args.preprocess],
        unreadable_files_left_out=[portable_path(path) for path in unreadable],
    )
    # Written before the second pass, which only measures what the thresholds achieve: a failure
    # or an interrupt there keeps the calibration, whose pass is the long one.
    payload["achieved"] = None
    write_threshold_file(args.out, payload)
    record_achieved(payload, model, batches(), total, anyres, args)
    print(calibration_summary(payload, len(files), anyres, args.out), file=sys.stderr)
    if total == 1:
        print(ONE_BATCH_NOTE.format(images=len(files), batch_size=args.batch_size), file=sys.stderr)
    return payload


def sign_only(args) -> dict:
    """--sign: adds the model's vision signature to an existing threshold file. In float32 on the
    CPU whatever --device/--dtype say: the weights as a float32 file holds them."""
    from .model import load_supported_model

    try:
        read_threshold_payload(args.out)
    except (OSError, ValueError) as error:
        args.error(f"--sign --out {args.out}: {error}")
    try:
        return add_signature(args.out, load_supported_model(args.model, dtype=torch.float32).eval())
    except ValueError as error:  # the file was made for another model
        args.error(f"--sign --out {args.out}: {error}")


def record_achieved(payload: dict, model, batches: Iterator[torch.Tensor], total: int, anyres: bool, args) -> None:
    """Re-runs the written thresholds on the calibration images and writes the token counts they
    achieve into the file; a failure here says the thresholds themselves are kept."""
    thresholds = torch.tensor(payload["thresholds"], dtype=torch.float32)
    try:
        counts = measure_token_counts(model, batches, thresholds, progress=not args.no_progress, total_batches=total, split=args.split)
    except (Exception, KeyboardInterrupt) as error:
        print(f"calibrate: the thresholds are written to {args.out}, but measuring the token counts they achieve failed "
              f"({type(error).__name__}: {error}); its \"achieved\" stays null", file=sys.stderr)
        raise
    unit = "tower inputs (crops)" if anyres else "images"
    payload["achieved"] = {**count_summary(counts), "note": f"re-run of the thresholds on the calibration {unit}, preprocessed as calibrated"}
    write_threshold_file(args.out, payload)


ONE_BATCH_NOTE = (
    "calibrate: note: all {images} images made one batch (--batch-size {batch_size}), so each threshold is that one "
    "batch's cutoff, not a mean over batches (DyMU's shipped script averages its cutoffs over many batches of 64); "
    "more images, from the distribution you will evaluate on, give steadier thresholds"
)


def calibration_summary(payload: dict, images: int, anyres: bool, out: str) -> str:
    achieved, target = payload["achieved"], payload["target"]
    crops = f" ({achieved['images']} crops)" if anyres else ""
    return (
        f"DyMU thresholds for {payload['model']['name']} ({len(payload['thresholds'])} merging layers, split {payload['split']}, "
        f"target {target['tokens']}{' = ' + target['preset'] if target['preset'] else ''}, r/layer {target['r_per_layer']}):\n"
        f"  {', '.join(f'{t:.4f}' for t in payload['thresholds'])}\n"
        f"  tokens at the read layer (CLS excluded) per {'crop' if anyres else 'image'}, on {images} calibration images{crops}: "
        f"{achieved['tokens_mean']:.1f} ± {achieved['tokens_std']:.1f} (min {achieved['tokens_min']}, max {achieved['tokens_max']})\n"
        f"  written to {out}"
    )


if __name__ == "__main__":
    main()
