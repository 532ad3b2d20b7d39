"""Command line of the testbed: train it, calibrate DyMU thresholds for it, write its card."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch

from ..provenance import git_state
from . import CHECKPOINT_DIR, THRESHOLDS_DIR, build_untrained
from .train import TrainSettings, train


def train_command(args: argparse.Namespace) -> None:
    if args.threads < 1:
        args.parser.error(f"--threads {args.threads}: use at least 1")
    torch.set_num_threads(args.threads)
    try:
        settings = TrainSettings(
            steps=args.steps, batch_images=args.batch_images, seed=args.seed, window_steps=args.window_steps, vision_steps=args.vision_steps,
            language_learning_rate=args.language_lr, attention_weight=args.attention_weight,
            option_attention_weight=args.option_attention_weight, answer_probe_weight=args.answer_probe_weight,
            option_tokens=args.option_tokens, bf16=not args.fp32,
        )
    except ValueError as error:
        args.parser.error(str(error))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        args.parser.error(f"--out {args.out}: a file is there, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_untrained(settings.seed, settings.option_tokens)
    code = git_state()  # before the hour of training, in which the checkout may change
    started = time.perf_counter()
    log = train(model, processor, settings, out / "train_log.jsonl", progress=not args.quiet)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = dict(
        settings=asdict(settings), threads=args.threads, torch=torch.__version__, machine=platform.processor() or platform.machine(),
        train_seconds=round(time.perf_counter() - started, 1), images_seen=settings.steps * settings.batch_images,
        scenes_drawn={"window": settings.window_steps * settings.window_batch_scenes,
                      "vision": settings.vision_steps * settings.vision_batch_images, "language": settings.steps * settings.batch_images},
        **rerun_record(out, code),
        answer_loss_mean_last_50=round(statistics.mean(r["answer_loss"] for r in log[-50:] if "answer_loss" in r), 4),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def rerun_record(out: Path, code: tuple[str | None, bool | None]) -> dict:
    """What a bitwise rerun must match, beside the settings: the code (`code`: git_state() when the
    run started), the package versions and torch's build configuration, the CPU (bf16 autocast rounds
    by its instruction set) and the weights' hash to compare with."""
    import hashlib

    from ..provenance import package_versions

    commit, dirty = code
    versions = package_versions()
    for package in ("numpy", "pillow", "tokenizers", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), None)
    weights = out / "model.safetensors"
    bf16_flags = sorted({flag for line in _cpuinfo() if line.startswith("flags") for flag in line.split() if "bf16" in flag or flag.startswith("amx")})
    return dict(git={"commit": commit, "dirty": dirty}, versions=versions, torch_build=torch_build(), cpu=cpu, cpu_flags_bf16=bf16_flags,
                weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None)


def torch_build() -> list[str]:
    """torch's build configuration (its BLAS, oneDNN and CPU capability), without the build-settings
    line, which holds the paths of the machine torch was built on."""
    return [line.strip(" -") for line in torch.__config__.show().splitlines()[1:] if "Build settings" not in line]


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def calibrate_command(args: argparse.Namespace) -> None:
    from ..calibrate import tower_shape
    from ..dymu import plan_merging
    from .calibration import calibrate_testbed, remeasure_testbed

    if args.images < 1:
        args.parser.error(f"--images {args.images}: use at least 1 calibration scene")
    tower = tower_shape(args.model)
    if tower is None:
        args.parser.error(f"--model {args.model}: no checkpoint config.json can be read there")
    out = Path(args.out) if args.out is not None else Path(args.model) / THRESHOLDS_DIR.name  # the thresholds of --model
    for target in args.targets:  # every target, before the first one is calibrated
        try:
            plan_merging(target, None, *tower)
        except ValueError as error:
            args.parser.error(f"--targets {target}: {error}")
        if args.remeasure and not (out / f"testbed-{target}.json").is_file():
            args.parser.error(f"--remeasure: {out / f'testbed-{target}.json'} does not exist (calibrate it first)")
    paths = remeasure_testbed(Path(args.model), out, args.targets) if args.remeasure else calibrate_testbed(Path(args.model), out, args.targets, args.images)
    for path in paths:
        print(path)


def card_command(args: argparse.Namespace) -> None:
    from .card import write_card

    print(write_card())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hybrid_vlm.testbed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser("train", help="train the testbed from scratch")
    trainer.add_argument("--out", required=True, help="directory for the checkpoint, processor and loss log")
    trainer.add_argument("--steps", type=int, default=TrainSettings.steps)
    trainer.add_argument("--batch-images", type=int, default=TrainSettings.batch_images)
    trainer.add_argument("--seed", type=int, default=TrainSettings.seed)
    trainer.add_argument("--window-steps", type=int, default=TrainSettings.window_steps, help="steps of the window phase (first)")
    trainer.add_argument("--vision-steps", type=int, default=TrainSettings.vision_steps, help="steps of the vision phase")
    trainer.add_argument("--language-lr", type=float, default=None, help="peak learning rate of the language phase (default: that of every phase)")
    trainer.add_argument(
        "--attention-weight", type=float, default=TrainSettings.attention_weight,
        help=f"weight of the loss teaching head {TrainSettings.attention_head} of LLM layer {TrainSettings.attention_layer} "
        "to attend from each question to the object it names (default: none)",
    )
    trainer.add_argument(
        "--option-attention-weight", type=float, default=TrainSettings.option_attention_weight,
        help=f"weight of the loss teaching head {TrainSettings.option_attention_head} of LLM layer {TrainSettings.option_attention_layer} "
        "to attend from each MCQ's last prompt token to the right option's line (default: none)",
    )
    trainer.add_argument(
        "--answer-probe-weight", type=float, default=TrainSettings.answer_probe_weight,
        help=f"weight of a training-only linear probe reading each MCQ's answer (in words) from the input of LLM layer "
        f"{TrainSettings.answer_probe_layer} at its last prompt token (default: none)",
    )
    trainer.add_argument("--option-tokens", action="store_true", help="each option line (\"B. red\") one added token (default: ordinary BPE tokens)")
    trainer.add_argument("--threads", type=int, default=2)
    trainer.add_argument("--fp32", action="store_true", help="no bf16 autocast (slower; for CPUs without fast bf16)")
    trainer.add_argument("--quiet", action="store_true", help="no progress bar")
    trainer.set_defaults(run=train_command, parser=trainer)
    calibrator = commands.add_parser("calibrate", help="DyMU thresholds for the testbed (training-distribution images)")
    calibrator.add_argument("--model", default=str(CHECKPOINT_DIR))
    calibrator.add_argument("--out", default=None, help="default: the --model folder's dymu-thresholds/ (for the shipped model, the shipped files)")
    calibrator.add_argument("--targets", nargs="+", default=["low", "mid", "high"])
    calibrator.add_argument("--images", type=int, default=256, help="calibration scenes (default 256)")
    calibrator.add_argument("--remeasure", action="store_true",
                            help="keep each file's thresholds and measure its \"achieved\" counts again, on the scenes it was calibrated on")
    calibrator.set_defaults(run=calibrate_command, parser=calibrator)
    carder = commands.add_parser("card", help="rewrite checkpoint/README.md from the committed training log, thresholds and report")
    carder.set_defaults(run=card_command)
    args = parser.parse_args(argv)
    args.run(args)
