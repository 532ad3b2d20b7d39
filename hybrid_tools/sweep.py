"""Sweeps and ablations through VLMEvalKit, one command each, ending with one results table.

    python -m hybrid_tools.sweep --data MMBench_DEV_EN --fastv-k 576 288 144 72 36 0.5 0.75
    python -m hybrid_tools.sweep --data MMBench_DEV_EN COCO_VAL --fastv-k 144 72 --vanilla --work-dir outputs \\
        --launcher "torchrun --nproc-per-node=8" -- --batch-size 8

Baselines and other models:

    --select attention random   FastV's selection (attention) and/or random selection (FASTV_SELECT) at the same K
    --model pool --pool 2 3 4   spatial pooling before layer 0 (VISUAL_POOL: 144 / 64 / 36 tokens)
    --family testbed            the names of the bundled trained testbed (llava_testbed*): short forms and
                                --vanilla mean its names, and --dymu low / mid / high its shipped thresholds

Methods at matched budgets (each method's own budget rule: A, tokens entering the LLM, for the
methods before it; B, kept after FASTV_LAYER, for fastv and random; the table shows all three counts):

    --methods fastv visionzip vispruner divprune random pool --budgets 192 128 64
                                one run per method x VISUAL_BUDGET, on the family's names
                                (<family>_<method>); with --model llava_tiny, the bundled tiny model's

Ablations (each also takes --fastv-k / --fastv-layer / --dymu / --dymu-split / --positions to change its grid):

    --ablation fastv-layer      FastV at layers 1, 2, 3 (FASTV_K 0.5 unless --fastv-k)
    --ablation fastv-k          FASTV_K 576 288 144 72 36 (unless --fastv-k)
    --ablation dymu-level       DyMU alone per --dymu file (e.g. low.json mid.json high.json)
    --ablation hybrid-vs-alone  FastV alone, DyMU alone and DyMU+FastV with the same --dymu file and K
    --ablation positions        HYBRID_POSITIONS logical vs renumbered (FastV, and the hybrid with --dymu)
    --ablation dymu-split       DyMU alone with DYMU_SPLIT official vs slot, per --dymu file
Every ablation also runs the vanilla model (the reference); `--ablation scoring` (row vs eager
scoring layer) is a speed-only ablation: `python -m hybrid_tools.bench --scoring row eager`.

The grid: for each --model (plugin names or the short forms vanilla / fastv / dymu / hybrid) the
product of the settings that model reads (the plugin's settings_read): FastV models FASTV_K
(--fastv-k) x FASTV_LAYER (--fastv-layer) x HYBRID_POSITIONS (--positions); DyMU models
DYMU_THRESHOLDS (--dymu) x DYMU_SPLIT (--dymu-split) x HYBRID_POSITIONS; the hybrid all of them;
random also FASTV_K and FASTV_LAYER, dart FASTV_LAYER; vanilla nothing. An axis that none of the
models reads is refused (it names the models that read it). Default
--model: fastv; with --dymu: hybrid if --fastv-k is given, else dymu. An axis not given keeps the
environment's value (else the plugin's default: FASTV_K 0.5, FASTV_LAYER 2, DYMU_SPLIT official,
logical positions). A threshold file records the split it was calibrated with; run under the other
split it still works (with a warning) but its token counts drift from the calibrated ones, which is
part of what the dymu-split ablation shows; for matched counts, calibrate one file per split
(`python -m hybrid_vlm.calibrate --split slot`).

--dymu takes threshold files; with --calibrate-images DIR an entry that is no file but a target
(low / mid / high / a token count) is calibrated first (`python -m hybrid_vlm.calibrate`, on the
checkpoint given by --model-path or the plugin's default, with the official split) into
<work-dir>/dymu/<target>.json, unless that file exists. Targets are DyMU's: low / mid / high,
config names such as 72out or 192out-linear, or an integer (tokens after the tower's last block).

Each setting is one `run.py` process (`python -m vlmeval_plugin`) with its environment, so it lands
in its own results folder (<work-dir>/<model>__<setting>/) and settings never share predictions; a
setting whose folder is complete is not recomputed (VLMEvalKit's reuse). Two settings that map to
the same folder (an axis the model ignores, one threshold file given twice) run once; two different
threshold files with one name are refused (rename one). Flags this command does not know
(--model-path, --judge, --limit, --batch-size, ...) go to every run unchanged; --work-dir is the
sweep's own (after `--` it is refused).

At the end: one table (metric, Δ vs vanilla when the vanilla folder exists, mean tokens in / kept,
median prefill ms per row; a setting x dataset without a result keeps an empty row saying why),
the same as CSV in <work-dir>/sweep_<tag>.csv, and the record of what
ran (commands, environments, exit statuses, versions, git commit) in <work-dir>/sweep_<tag>.json
(<tag>-2, -3, ... where an earlier sweep's record has that name: no record is overwritten),
which `python -m hybrid_tools.report` reads for provenance. --report NAME (letters, digits, '.',
'_', '-'; checked before any run) then writes reports/NAME/report.md from this sweep's folders.

The equivalent shell loop of the first example:
    for k in 576 288 144 72 36 0.5 0.75; do FASTV_K=$k python run.py --data MMBench_DEV_EN --model llava_v1.5_7b_fastv; done

The runs are subprocesses; this module imports vlmeval only to check the --data names before the first.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hybrid_tools.report.markdown import REPORT_NAME
from hybrid_vlm.config import DYMU_SPLITS, POSITION_MODES, SELECTIONS, parse_fastv_k, parse_fastv_layer, parse_visual_budget, parse_visual_pool
from hybrid_vlm.dymu import OFFICIAL_NAME
from hybrid_vlm.methods import methods_with_defaults
from hybrid_vlm.provenance import git_state, package_versions, portable, replace_file, shell_join
from vlmeval_plugin import settings
from vlmeval_plugin.cli import variant_checkpoint
from vlmeval_plugin.results import metric_text, number_text, read_json, read_run_info, record_time, rows_text, text_table

from . import configs as comparison

ABLATIONS = {
    # name: (models, default axes)
    "fastv-layer": (["fastv"], dict(fastv_layer=["1", "2", "3"], fastv_k=["0.5"])),
    "fastv-k": (["fastv"], dict(fastv_k=["576", "288", "144", "72", "36"])),
    "dymu-level": (["dymu"], {}),
    "hybrid-vs-alone": (["fastv", "dymu", "hybrid"], {}),
    "positions": (["fastv"], dict(positions=list(POSITION_MODES))),
    "dymu-split": (["dymu"], dict(dymu_split=list(DYMU_SPLITS))),
    "scoring": (None, {}),
}
SCORING_HINT = (
    "the row vs eager scoring-layer ablation is about speed only (both score the same tokens): run\n"
    "    python -m hybrid_tools.bench --preset llava-1.5-7b --device cuda --fastv-k 0.5 --scoring row eager --out runs/bench-scoring\n"
    "(or --preset tiny / mid on CPU, or --model DIR for a checkpoint)"
)
ENV_KEYS = ("FASTV_K", "FASTV_LAYER", "FASTV_SELECT", "VISUAL_POOL", "VISUAL_BUDGET", "DYMU_THRESHOLDS", "DYMU_SPLIT", "HYBRID_POSITIONS", "DART_QUOTA", "DART_PIVOTS")
SWEEP_METHODS = ("fastv", "random", "pool", *methods_with_defaults("llava"))
DYMU_TARGETS = ("low", "mid", "high")
# each swept setting and the argument that gives its values (the flag: --fastv-k, --select, ...)
AXES = {
    "FASTV_K": "fastv_k", "FASTV_LAYER": "fastv_layer", "FASTV_SELECT": "select", "VISUAL_POOL": "pool",
    "VISUAL_BUDGET": "budgets", "DYMU_THRESHOLDS": "dymu", "DYMU_SPLIT": "dymu_split", "HYBRID_POSITIONS": "positions",
}


@dataclass
class Run:
    label: str  # what the table calls it
    model: str  # name given to run.py
    folder: str  # effective name = results folder
    env: dict  # the full environment of the run
    settings: dict  # the settings its name reads that its environment sets, swept or inherited


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_tools.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--data", nargs="+", required=True, help="VLMEvalKit dataset names")
    parser.add_argument("--model", nargs="+", default=None, help="plugin names or vanilla / fastv / dymu / hybrid (default: see above)")
    parser.add_argument("--fastv-k", nargs="+", default=None, help="FASTV_K values: integers keep top-n, decimals prune a fraction")
    parser.add_argument("--fastv-layer", nargs="+", default=None, help="FASTV_LAYER values (default: the environment's, else 2)")
    parser.add_argument("--dymu", nargs="+", default=None, metavar="FILE", help="DYMU_THRESHOLDS files (or targets with --calibrate-images)")
    parser.add_argument("--dymu-split", nargs="+", default=None, choices=DYMU_SPLITS, help="DYMU_SPLIT values (DyMU models only)")
    parser.add_argument("--positions", nargs="+", default=None, choices=POSITION_MODES, help="HYBRID_POSITIONS values")
    parser.add_argument("--select", nargs="+", default=None, choices=SELECTIONS, help="FASTV_SELECT values (FastV and pool models)")
    parser.add_argument("--pool", nargs="+", default=None, help="VISUAL_POOL values (pool models)")
    parser.add_argument("--methods", nargs="+", default=None, choices=SWEEP_METHODS, help="methods to compare (their <family>_<method> names)")
    parser.add_argument("--budgets", nargs="+", default=None, help="VISUAL_BUDGET values: visual tokens per image, by each method's rule, or fractions in (0, 1) of each image's tokens")
    parser.add_argument("--family", default=None, choices=sorted(settings.FAMILY_VANILLA),
                        help="whose names the short forms and --vanilla mean (default: the family of the full names given to --model, else llava_v1.5_7b)")
    parser.add_argument("--ablation", choices=sorted(ABLATIONS), default=None, help="a preset grid (see above); adds the vanilla run")
    parser.add_argument("--vanilla", action="store_true", help="also run the family's vanilla model (nothing patched: llava_v1.5_7b, llava_tiny, ...) as the reference")
    parser.add_argument("--calibrate-images", default=None, metavar="DIR", help="calibrate --dymu targets (low/mid/high/N) on these images first")
    parser.add_argument("--launcher", default=None, help='e.g. "torchrun --nproc-per-node=8" (default: this Python)')
    parser.add_argument("--work-dir", default="./outputs", help="VLMEvalKit --work-dir (default ./outputs; $MMEVAL_ROOT, when set, "
                        "overrides it, as VLMEvalKit does)")
    parser.add_argument("--report", default=None, metavar="NAME", help="then write reports/NAME/report.md from this sweep's folders")
    parser.add_argument("--report-out", default=None, metavar="DIR", help="parent folder for --report (default reports)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    return parser


def run_command(launcher: str | None, run_args: list[str]) -> list[str]:
    if launcher:
        return shlex.split(launcher) + ["-m", "vlmeval_plugin"] + run_args
    return [sys.executable, "-m", "vlmeval_plugin"] + run_args


def fail(message: str) -> int:
    print(f"hybrid_tools.sweep: error: {message}", file=sys.stderr, flush=True)
    return 2


def passthrough_value(passthrough: list[str], flag: str) -> str | None:
    for index, item in enumerate(passthrough):
        if item == flag and index + 1 < len(passthrough):
            return passthrough[index + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def calibrate_targets(entries: list[str], images: str | None, work_dir: str, passthrough: list[str], dry_run=False, family="llava_v1.5_7b") -> list[str]:
    """--dymu entries as files: existing files stay, targets are calibrated (or reused) with --calibrate-images;
    the testbed's low / mid / high stay names (the plugin resolves them to its shipped thresholds)."""
    files = []
    for entry in entries:
        if Path(entry).is_file() or (family == "testbed" and entry in settings.TESTBED_LEVELS):
            files.append(entry)
            continue
        is_target = entry in DYMU_TARGETS or entry.isdigit() or OFFICIAL_NAME.fullmatch(entry) is not None
        if not is_target:
            raise settings.PluginError(
                f"--dymu {entry}: no such file (a target such as low / mid / high / 192out needs --calibrate-images DIR)"
            )
        out = Path(work_dir) / "dymu" / f"{entry}.json"
        if out.is_file():
            print(f"hybrid_tools.sweep: DyMU target {entry}: reusing {out}", flush=True)
            files.append(str(out))
            continue
        if not images:
            raise settings.PluginError(f"--dymu {entry}: a calibration target needs --calibrate-images DIR (or give a threshold file)")
        if dry_run:
            raise settings.PluginError(f"--dymu {entry}: not calibrated yet ({out} does not exist); --dry-run calibrates nothing")
        checkpoint = settings.resolve_checkpoint(passthrough_value(passthrough, "--model-path"), settings.FAMILY_CHECKPOINTS.get(family, settings.CHECKPOINT_ID))
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "hybrid_vlm.calibrate", "--model", str(checkpoint), "--images", images, "--target", entry,
                   "--out", str(out), "--no-progress"]
        print(f"\n=== calibrating DyMU target {entry} ===\n$ {shlex.join(command)}", flush=True)
        if subprocess.run(command).returncode != 0 or not out.is_file():
            raise settings.PluginError(f"calibrating DyMU target {entry} failed (command above)")
        files.append(str(out))
    return files


def plan_runs(args, base_env: dict, models: list[str]) -> tuple[list[Run], list[str]]:
    """Every run of the grid of `models` (`checked_models`), in order, deduplicated by results folder;
    and notes on what was merged."""
    runs: list[Run] = []
    notes: list[str] = []
    seen: dict[str, tuple[Run, str | None]] = {}  # folder -> its run, and the threshold file it resolved to
    for model in models:
        variant = settings.VARIANTS[model]
        reads = settings.settings_read(variant)  # the plugin's own list: an axis the name reads is never dropped
        axes = {key: (getattr(args, attr) if key in reads else None) or [None] for key, attr in AXES.items()}
        if variant.dymu and variant.family != "testbed" and axes["DYMU_THRESHOLDS"] == [None] and not base_env.get("DYMU_THRESHOLDS"):
            raise settings.PluginError(f"{model} needs DyMU thresholds: pass --dymu FILE... (or set DYMU_THRESHOLDS)")
        for values in itertools.product(*axes.values()):
            chosen = dict(zip(axes, values))
            env = dict(base_env)
            env.pop("VISUAL_METHOD", None)  # the name decides the method
            if "VISUAL_BUDGET" not in reads:
                env.pop("VISUAL_BUDGET", None)
            env.update({key: value for key, value in chosen.items() if value is not None})
            config = settings.hybrid_config_for(model, env)
            folder = settings.effective_name(model, config)
            label = "vanilla" if not variant.patched else f"{_short(model, args.family)}: {settings.setting_tag(folder) or folder}"
            dymu = config.dymu if config is not None else None
            if folder in seen:
                earlier, earlier_dymu = seen[folder]
                check_same_thresholds(earlier_dymu, dymu, folder)
                given = ", ".join(f"{k}={v}" for k, v in chosen.items() if v is not None)
                notes.append(f"{model} with {given} is the same setting as {earlier.label} ({folder}): run once")
                continue
            # every setting the name reads that this run's environment sets, swept or inherited: the
            # recorded command then makes this very folder again
            recorded = {key: env[key] for key in dict.fromkeys([*ENV_KEYS, *reads]) if key in reads and env.get(key)}
            run = Run(label, model, folder, env, recorded)
            seen[folder] = run, dymu
            runs.append(run)
    return runs, notes


def check_depths(runs: list[Run], model_path: str | None, build: bool = True) -> None:
    """FASTV_LAYER and the stage layers of every run within its checkpoint's LLM, before the first
    run (run.py checks each as it starts, after the earlier runs took their time). A checkpoint not
    found here is left to run.py, which says where it looked; without `build` (a dry run, which
    writes nothing) the tiny model is checked only if it was built before."""
    checkpoints = {}
    for run in runs:
        variant = settings.VARIANTS[run.model]
        key = (variant.tiny, variant.family)
        if key not in checkpoints:
            try:
                checkpoints[key] = variant_checkpoint(variant, None if variant.tiny else model_path, build)
            except settings.PluginError:
                checkpoints[key] = None
        if checkpoints[key] is not None:
            settings.check_llm_depth(checkpoints[key], settings.hybrid_config_for(run.model, run.env))


def checked_models(args) -> list[str]:
    """The plugin names of --model, once every name and value is known to be valid and every axis
    given is read by at least one of them (a PluginError says which is not)."""
    short = settings.short_names(args.family)
    models = [short.get(name, name) for name in args.model]
    for model in models:
        if model in settings.VARIANTS and settings.VARIANTS[model].tiny and args.family != "tiny":
            raise settings.PluginError(f"--model {model}: the llava_tiny names run with --family tiny (given alone, they set it)")
        if model not in settings.VARIANTS:
            usable = [n for n, v in settings.VARIANTS.items() if not v.tiny or args.family == "tiny"]
            close = difflib.get_close_matches(model, usable + list(short), n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise settings.PluginError(f"--model {model}: not a plugin name; {hint}the short forms of --family {args.family} are "
                                       f"{', '.join(short)}, and `python run.py --help` lists every name")
    for text in args.budgets or []:
        try:
            parse_visual_budget(text)
        except ValueError as error:
            raise settings.PluginError(f"--budgets {text}: {error}") from None
    for flag, values, parse in (("--fastv-k", args.fastv_k, parse_fastv_k), ("--fastv-layer", args.fastv_layer, parse_fastv_layer),
                                ("--pool", args.pool, parse_visual_pool)):
        for text in values or []:
            try:
                parse(text)
            except ValueError as error:
                raise settings.PluginError(f"{flag} {text}: {error}") from None
    check_axes_read(args, models)
    return models


def check_axes_read(args, models: list[str]) -> None:
    """An axis no planned name reads would plan one run per name with its values silently
    dropped (run.py only notes an ignored setting): refuse it, naming the names that read it."""
    for key, attr in AXES.items():
        values = getattr(args, attr)
        if not values or any(key in settings.settings_read(settings.VARIANTS[model]) for model in models):
            continue
        readers = [_short(name, args.family) for name, variant in settings.VARIANTS.items()
                   if variant.family == args.family and key in settings.settings_read(variant)]
        flag = "--" + attr.replace("_", "-")
        raise settings.PluginError(
            f"{flag} {' '.join(values)}: none of the planned names ({', '.join(models)}) reads {key}; "
            f"the names that read it: {', '.join(readers) or 'none'} (choose them with --model or --methods)"
        )


def check_same_thresholds(first: str | None, second: str | None, folder: str) -> None:
    """Two threshold files (as the plugin resolved them: a testbed level is its shipped file) whose
    names map to one folder: the same file (or the same content) is one setting, run once; different
    thresholds would write their results over each other."""
    if not first or not second or first == second or not (Path(first).is_file() and Path(second).is_file()):
        return
    if Path(first).read_bytes() != Path(second).read_bytes():
        raise settings.PluginError(
            f"--dymu {first} and {second}: different contents, same name: the output folders would collide "
            f"({folder}); rename one"
        )


def method_models(methods: list[str], family: str) -> list[str]:
    """--methods as the family's names: fastv -> llava_v1.5_7b_fastv, visionzip -> llava_v1.5_7b_visionzip, ..."""
    names = settings.short_names(family)
    missing = [method for method in methods if method not in names]
    if missing:
        raise settings.PluginError(f"--methods {' '.join(missing)}: the {family} family has no such names ({', '.join(names)})")
    return [names[method] for method in methods]


def _short(model: str, family: str = "llava_v1.5_7b") -> str:
    return next((short for short, name in settings.short_names(family).items() if name == model), model)


def main(argv: list[str] | None = None) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    passthrough = [item for item in passthrough if item != "--"]
    problem = argument_problem(args, passthrough)
    if problem:
        return fail(problem)
    args.report_out = args.report_out or "reports"
    if args.ablation == "scoring":
        print(f"hybrid_tools.sweep: {SCORING_HINT}", file=sys.stderr)
        return 2
    work_dir = os.environ.get("MMEVAL_ROOT", args.work_dir)
    # Every setting is checked (and DyMU targets calibrated) before the first long run starts.
    try:
        resolve_models(args)
        runs, notes = planned_runs(args, passthrough, work_dir)
    except (ValueError, settings.PluginError) as error:
        return fail(str(error))
    for note in notes:
        print(f"hybrid_tools.sweep: note: {note}", flush=True)
    commands = announced_commands(runs, args, passthrough, work_dir)
    if args.dry_run:
        return 0

    tag = unused_tag(work_dir, sweep_tag(args))
    manifest_path = Path(work_dir) / f"sweep_{tag}.json"
    try:
        records = run_all(runs, commands, args, argv, work_dir, manifest_path)
    except KeyboardInterrupt:
        print(f"\nhybrid_tools.sweep: interrupted. Finished runs and the rows written so far are kept (record: {manifest_path}); "
              "rerun the same command to resume without redoing them", file=sys.stderr, flush=True)
        return 130
    return summarize(runs, records, work_dir, tag, manifest_path, args.report, args.report_out, args.data)


def argument_problem(args, passthrough: list[str]) -> str | None:
    """Flags refused before anything is planned, else None."""
    # checked before any run: hybrid_tools.report refuses a bad NAME only after the whole sweep, whose
    # record sweep_NAME.json then lies where no reader looks for it
    if args.report is not None and not re.fullmatch(REPORT_NAME, args.report):
        return f"--report {args.report!r}: use letters, digits, '.', '_' and '-' (it names reports/NAME/ and sweep_NAME.json)"
    if args.report_out is not None and args.report is None:
        return f"--report-out {args.report_out} is the parent folder of --report NAME, which is not given"
    if args.calibrate_images is not None and not args.dymu:
        return f"--calibrate-images {args.calibrate_images} calibrates the --dymu targets, and no --dymu is given"
    if any(item == "--work-dir" or item.startswith("--work-dir=") for item in passthrough):
        # every run would get two --work-dir flags, and the table would read the sweep's own one
        return "--work-dir after '--': pass the sweep's own --work-dir DIR (before '--'); the sweep gives it to every run"
    return None


def resolve_models(args) -> None:
    """Sets `args.family` and `args.model`: the names to run."""
    families = {settings.VARIANTS[m].family for m in args.model or [] if m in settings.VARIANTS}
    if args.family is None:  # --model llava_tiny_fastv, or llava_tiny --methods ...: that family's names
        args.family = families.pop() if len(families) == 1 else "llava_v1.5_7b"
    args.model = swept_models(args, args.model, settings.short_names(args.family), settings.FAMILY_VANILLA[args.family])


def sweep_tag(args) -> str:
    """What names sweep_<tag>.csv / .json: the report name, else the ablation, else the model swept, else the models."""
    short, vanilla_name = settings.short_names(args.family), settings.FAMILY_VANILLA[args.family]
    swept = [short.get(m, m) for m in args.model if short.get(m, m) != vanilla_name] or [vanilla_name]
    return args.report or args.ablation or (swept[0] if len(swept) == 1 else "-".join(_short(m, args.family) for m in swept))


def planned_runs(args, passthrough: list[str], work_dir: str) -> tuple[list, list[str]]:
    """Every run, checked, with DyMU targets calibrated (after the cheap checks: calibration takes
    minutes), and the notes to print."""
    planned = checked_models(args)
    data_note = data_problem(args.data, planned)
    if data_note and not args.dry_run:
        raise settings.PluginError(data_note)
    if args.dymu:
        args.dymu = calibrate_targets(args.dymu, args.calibrate_images, work_dir, passthrough, args.dry_run, args.family)
    runs, notes = plan_runs(args, dict(os.environ), planned)
    check_depths(runs, passthrough_value(passthrough, "--model-path"), build=not args.dry_run)
    return runs, notes + ([data_note] if data_note else [])


def announced_commands(runs: list, args, passthrough: list[str], work_dir: str) -> list[list[str]]:
    """Each run's run.py command, printed with its folder and settings."""
    print(f"hybrid_tools.sweep: {len(runs)} run(s) into {work_dir}:", flush=True)
    commands = []
    for run in runs:
        command = run_command(args.launcher, ["--data", *args.data, "--model", run.model, "--work-dir", work_dir, *passthrough])
        commands.append(command)
        setting = " ".join(f"{k}={shell_join([v])}" for k, v in run.settings.items())
        print(f"  {run.folder}\n      {setting + ' ' if setting else ''}{shlex.join(command)}", flush=True)
    return commands


def data_problem(names: list[str], models: list[str]) -> str | None:
    """run.py's checks of the --data names, made once before the first run (each run would refuse them)."""
    from vlmeval_plugin.robust import import_vlmeval_quietly

    import_vlmeval_quietly()  # before vlmeval.smp: its missing-.env ERROR line reads as a failure
    from vlmeval.smp import LMUDataRoot

    from vlmeval_plugin.cli import unknown_set_problem, video_problem

    return unknown_set_problem(names, LMUDataRoot()) or video_problem(models, names)


def unused_tag(work_dir: str, tag: str) -> str:
    """`tag`, or `tag-2`, `tag-3`, ... when an earlier sweep's record already has that name (two
    sweeps of one model, e.g. random selection under two seeds, kept only the last record). The
    record is reserved by creating it, so that two sweeps started together take two names."""
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    candidate, number = tag, 1
    while True:
        try:
            with open(Path(work_dir) / f"sweep_{candidate}.json", "x") as reserved:
                reserved.write(json.dumps({"record_number": number}) + "\n")  # the order of records started in one second
            return candidate
        except FileExistsError:
            number += 1
            candidate = f"{tag}-{number}"


def swept_models(args, models: list[str] | None, short: dict, vanilla_name: str) -> list[str]:
    """The model names to run: an ablation's (with its defaults filled into `args`), the methods',
    or the one the settings imply; the family's vanilla first where --vanilla asks for it. A
    ValueError (or the plugin's PluginError) says what a setting lacks."""
    if args.ablation:
        preset_models, defaults = ABLATIONS[args.ablation]
        for key, values in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, list(values))
        if args.ablation == "positions" and args.dymu and models is None:
            models = ["fastv", "hybrid"]
        if args.ablation == "dymu-split" and not args.dymu:
            raise ValueError("--ablation dymu-split needs --dymu FILE... (the thresholds both splits run with)")
        if args.ablation == "dymu-level" and not args.dymu:
            raise ValueError("--ablation dymu-level needs --dymu FILE... (e.g. low.json mid.json high.json, or low mid high with --calibrate-images DIR)")
        if args.ablation == "hybrid-vs-alone" and (not args.dymu or len(args.dymu) != 1):
            raise ValueError("--ablation hybrid-vs-alone needs exactly one --dymu FILE (the DyMU setting of the hybrid)")
        models = ["vanilla"] + [m for m in (models or preset_models) if short.get(m, m) != vanilla_name]
    elif args.methods:
        models = list(models or []) + method_models(args.methods, args.family)  # a PluginError names a bad method
    elif models is None:
        if args.dymu_split and not args.dymu:
            raise ValueError("--dymu-split needs --dymu FILE... (DyMU's split order only matters with DyMU thresholds)")
        models = ["hybrid" if args.fastv_k else "dymu"] if args.dymu else ["pool"] if args.pool else ["fastv"]
        if models == ["fastv"] and not (args.fastv_k or args.fastv_layer or args.positions or args.select):
            raise ValueError("nothing to sweep: give --fastv-k, --fastv-layer, --select, --pool, --dymu, --positions or --ablation")
    if args.vanilla and vanilla_name not in [short.get(m, m) for m in models]:
        models = ["vanilla"] + list(models)
    return models


def summarize(runs: list[Run], records: list[dict], work_dir: str, tag: str, manifest_path: Path, report: str | None, report_out,
              datasets: list[str]) -> int:
    """The sweep's table (printed and as sweep_<tag>.csv) and, with --report, its report; 1 if any
    run failed (or the report did), else 0. `records` are the sweep record's runs (`run_all`).
    A failed run that left no run.py record in its folder since it started (run.py refused it before
    any work, or it stopped before that) made nothing: the folder's earlier outputs are not this
    sweep's, and are left out of the table and the report. (Read off the folder, not the exit
    status, which a launcher such as torchrun replaces.) Every planned run x dataset without a
    result keeps an empty row saying why; the report covers the runs that left results."""
    failed = {record["folder"]: record["returncode"] for record in records if record["returncode"] != 0}
    started = {record["folder"]: record["started"] for record in records}
    refused = {folder for folder in failed if not recorded_since(Path(work_dir) / folder, started[folder])}
    runs_shown = [run for run in runs if run.folder not in refused]
    configs = comparison.collect(work_dir, [run.folder for run in runs_shown], datasets) if runs_shown else []
    order = {run.folder: index for index, run in enumerate(runs)}
    configs = sorted(configs, key=lambda c: order.get(c.name, -1))  # any vanilla found first, then the runs in order
    labels = {run.folder: run.label for run in runs}
    statuses = run_statuses(runs, records, refused)
    missing = missing_results(runs, configs, datasets, statuses)
    print("\n" + sweep_table(configs, labels, missing), flush=True)
    write_csv(Path(work_dir) / f"sweep_{tag}.csv", configs, labels, statuses, missing)
    print(f"\nSweep table: {Path(work_dir) / f'sweep_{tag}.csv'}\nSweep record: {manifest_path}", flush=True)
    status = 0
    if failed:
        labels_failed = [f"{run.label} (exit status {failed[run.folder]}{', made nothing' if run.folder in refused else ''})"
                         for run in runs if run.folder in failed]
        print("hybrid_tools.sweep: these runs failed: " + ", ".join(labels_failed), file=sys.stderr)
        status = 1
    if missing:  # a run that exited 0 without a set's result is a miss too
        status = 1
    reported = [config.name for config in configs if config.name in labels]  # the runs that left results
    if report and not reported:
        print(f"hybrid_tools.sweep: no report {report}: no run of this sweep left results", file=sys.stderr)
        return 1
    if report:
        from .report.cli import main as report_main

        if missing:
            print(f"hybrid_tools.sweep: report {report} leaves out what has no results: "
                  + ", ".join(f"{label} on {dataset} ({why})" for label, _, dataset, why in missing), file=sys.stderr)
        held = [dataset for dataset in datasets if any(dataset in config.entries for config in configs if config.name in reported)]
        code = report_main([work_dir, "--name", report, "--out", report_out, "--models", *reported, "--data", *held])
        status = status or code
    return status


def run_statuses(runs: list[Run], records: list[dict], refused: set[str]) -> dict[str, str]:
    """Each run's outcome, for its table rows: ok, its exit status, or why it made nothing."""
    codes = {record["folder"]: record["returncode"] for record in records}
    statuses = {}
    for run in runs:
        code = codes.get(run.folder)
        statuses[run.folder] = ("not run (the sweep stopped first)" if code is None else "ok" if code == 0
                                else f"refused before any work (exit status {code})" if run.folder in refused else f"exit status {code}")
    return statuses


def missing_results(runs: list[Run], configs: list, datasets: list[str], statuses: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(label, folder, dataset, why) for every planned run x dataset with no result: a failed or
    refused setting keeps its row, empty, rather than vanishing from the table."""
    held = {(config.name, dataset) for config in configs for dataset in config.entries}
    why = {folder: "the run exited 0 without it" if status == "ok" else status for folder, status in statuses.items()}
    return [(run.label, run.folder, dataset, f"no result: {why[run.folder]}")
            for run in runs for dataset in datasets if (run.folder, dataset) not in held]


def recorded_since(folder: Path, started: str) -> bool:
    """Whether run.py recorded a run in `folder` (run_info.json, written once its checks pass) at or
    after `started` (ISO time, to the second)."""
    since = record_time(started)
    return any(record_time(record.get("time")) >= since for record in read_run_info(folder / "run_info.json"))


def run_all(runs: list[Run], commands: list[list[str]], args, argv, work_dir: str, manifest_path: Path) -> list[dict]:
    """Run every setting in turn, recording each in the sweep record as it ends; the record's runs
    (folder, exit status, start time, ...)."""
    commit, dirty = git_state()
    manifest = {
        "command": shell_join(["python", "-m", "hybrid_tools.sweep", *portable(sys.argv[1:] if argv is None else argv)]),
        "work_dir": portable(work_dir),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": package_versions(),
        "git_commit": commit,
        "git_dirty": dirty,
        "record_number": (read_json(manifest_path) or {}).get("record_number", 1),  # as unused_tag reserved it
        "runs": [],
    }
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    write_record(manifest_path, manifest)
    for run, command in zip(runs, commands):
        print(f"\n=== {run.label}: {run.folder} ===\n$ {shlex.join(command)}", flush=True)
        started, clock = datetime.datetime.now().astimezone().isoformat(timespec="seconds"), time.monotonic()
        entry = {"label": run.label, "model": run.model, "folder": run.folder, "command": command if args.launcher else ["python", *command[1:]],
                 "env": run.settings, "started": started}
        try:
            returncode = subprocess.run(command, env=run.env).returncode
        except OSError as error:  # a --launcher that is not a program: 127, as a shell says
            print(f"hybrid_tools.sweep: cannot start {command[0]!r}: {error}", file=sys.stderr, flush=True)
            returncode = 127
        except KeyboardInterrupt:  # the run in flight made rows too (the plugin keeps them): its folder's provenance
            record_run(manifest, manifest_path, entry, clock, 130, interrupted=True)
            raise
        record_run(manifest, manifest_path, entry, clock, returncode)
    return manifest["runs"]


def record_run(manifest: dict, manifest_path: Path, entry: dict, clock: float, returncode: int, **extra) -> None:
    """Add a finished (or interrupted) run to the sweep record and write it: after every run, so an
    interrupted sweep keeps its record."""
    manifest["runs"].append(portable({**entry, "seconds": round(time.monotonic() - clock, 1), "returncode": returncode, **extra}))
    write_record(manifest_path, manifest)


def write_record(path: Path, manifest: dict) -> None:
    """The sweep record, replaced whole (a kill mid-write leaves the previous one)."""
    replace_file(path, json.dumps(manifest, indent=2) + "\n")


SWEEP_HEADER = (
    "setting", "model folder", "dataset", "rows", "metric", "Δ vs vanilla", "visual in (A)", "visual kept (B)", "visual layer-avg (C)",
    "prefill GMACs", "prefill ms (median)",
)


def sweep_table(configs: list, labels: dict[str, str], missing: list[tuple[str, str, str, str]] = ()) -> str:
    """The plain-text table at the end of a sweep: one line per setting x dataset, those without a
    result last, saying why."""
    rows = []
    for config in configs:
        for dataset, entry in config.entries.items():
            main = entry.main_metric
            change = "ref" if config.vanilla else number_text(comparison.delta(entry, main), "+.1f") if main else "-"
            rows.append((
                labels.get(config.name, config.tag), config.name, dataset, rows_text(entry), metric_text(entry), change,
                number_text(entry.visual_in_mean), number_text(entry.visual_kept_mean), number_text(entry.visual_layer_mean),
                number_text(entry.prefill_gmacs_mean, ".2f"), number_text(entry.prefill_ms_median, ".2f"),
            ))
    rows += [(label, folder, dataset, "0", why, *["-"] * (len(SWEEP_HEADER) - 5)) for label, folder, dataset, why in missing]
    return text_table(SWEEP_HEADER, rows)


def write_csv(path: Path, configs: list, labels: dict[str, str], statuses: dict[str, str] | None = None,
              missing: list[tuple[str, str, str, str]] = ()) -> None:
    """The sweep table as CSV: every metric and its delta, tokens (means) and prefill ms (the median
    only), and each row's `status` (a run x dataset without a result keeps a row saying why)."""
    import pandas as pd

    statuses = statuses or {}
    rows = []
    for config in configs:
        for dataset, entry in config.entries.items():
            reference = comparison.comparison_reference(entry)
            deltas = {f"delta_{k}": comparison.delta(entry, k) for k in entry.metrics} if reference is not None else {}
            rows.append({
                "setting": labels.get(config.name, config.tag), "model": config.name, "dataset": dataset,
                "status": statuses.get(config.name, "ok"), "rows": entry.rows, "failed_rows": len(entry.failed_rows), **entry.metrics, **deltas,
                "tokens_in_mean": entry.tokens_in_mean, "tokens_kept_mean": entry.tokens_kept_mean,
                "visual_in_mean": entry.visual_in_mean, "visual_kept_mean": entry.visual_kept_mean,
                "visual_layer_mean": entry.visual_layer_mean, "prefill_gmacs_mean": entry.prefill_gmacs_mean,
                "prefill_ms_median": entry.prefill_ms_median,
                "folder": portable(str(config.folder.resolve())),
            })
    rows += [{"setting": label, "model": folder, "dataset": dataset, "status": why, "rows": 0} for label, folder, dataset, why in missing]
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = None if rows else ["setting", "model", "dataset", "status", "rows", "failed_rows", "prefill_ms_median", "folder"]  # a header, readable
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


if __name__ == "__main__":
    sys.exit(main())
