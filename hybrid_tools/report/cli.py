"""`python -m hybrid_tools.report`: arguments, which files to read, and where the report goes."""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

from .. import report as report_package
from ..configs import assign_references, configurations, is_vanilla, keep_datasets, label_configurations, order_configurations
from .bench import read_bench, resolve_bench
from .device_checks import read_pytest, read_steps
from .floors import read_floors
from .markdown import REPORT_NAME, Linker, display_path
from .parity import read_parity
from .render import ReportInput, render
from .snapshot import read_file_inputs, snapshot, snapshot_file_inputs

DEFAULT_OUT = "reports"
report_doc = report_package.__doc__



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_tools.report", description=report_doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work_dirs", nargs="*", metavar="WORK_DIR", help="VLMEvalKit work dirs (run.py --work-dir, whose own default is ./outputs), or bench output dirs; one of these or --bench is needed")
    parser.add_argument("--bench", nargs="+", default=[], metavar="DIR_OR_JSON", help="hybrid_tools.bench --out dirs or bench.json files")
    parser.add_argument("--name", default=None, help="report name: reports/<name>/ (default: the first work dir's name)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"parent folder of the report (default {DEFAULT_OUT})")
    parser.add_argument("--models", nargs="+", default=None, metavar="PATTERN", help="only model folders matching these glob patterns (vanilla references are kept)")
    parser.add_argument("--data", nargs="+", default=None, metavar="NAME", help="only these datasets (default: every one the folders hold)")
    parser.add_argument("--vanilla", default=None, metavar="NAME", help="the reference folder name (default: detected)")
    parser.add_argument("--snapshot", action="store_true", help="copy the raw files read into reports/<name>/raw/ and read them from there "
                        "(the single-file inputs below into raw/inputs/, unless already in reports/<name>/)")
    parser.add_argument("--recipe", default=None, metavar="FILE", help="shell script that made the raw outputs: shown verbatim at the top")
    parser.add_argument("--title", default=None, help="report title (default: Report: <name>)")
    parser.add_argument("--parity", default=None, metavar="JSON", help="a `python -m hybrid_tools.parity --out` file: adds its table")
    parser.add_argument("--steps", default=None, metavar="LOG", help="a device run's log (checks.sh): adds each step's exit status")
    parser.add_argument("--pytest", default=None, metavar="XML", help="a device run's JUnit XML (pytest --junitxml): adds its test results")
    parser.add_argument("--floors", nargs="+", default=[], metavar="JSON", help="hybrid_tools.blind_baselines / caption_baseline files: "
                        "each dataset's floors (what needs no image), and the configurations at or below them")
    parser.add_argument("--targets", action="store_true", help="check the benches against the GPU speed targets (hybrid_tools.report.targets)")
    return parser


def canonical_command(args, work_dirs: list[Path], benches: list[Path]) -> str:
    """The command that regenerates this very report from the files it read."""
    parts = ["python", "-m", "hybrid_tools.report", *[display_path(p) for p in work_dirs]]
    if benches:
        parts += ["--bench", *[display_path(p.parent if p.name == "bench.json" else p) for p in benches]]
    parts += ["--name", args.name]
    if args.out != DEFAULT_OUT:
        parts += ["--out", display_path(Path(args.out))]
    if args.models:
        parts += ["--models", *args.models]
    if args.data:
        parts += ["--data", *args.data]
    if args.vanilla:
        parts += ["--vanilla", args.vanilla]
    if args.recipe:
        parts += ["--recipe", display_path(Path(args.recipe))]
    if args.title:
        parts += ["--title", args.title]
    if args.parity:
        parts += ["--parity", display_path(Path(args.parity))]
    for flag in ("steps", "pytest"):
        if getattr(args, flag):
            parts += [f"--{flag}", display_path(Path(getattr(args, flag)))]
    if args.floors:
        parts += ["--floors", *[display_path(Path(p)) for p in args.floors]]
    if args.targets:
        parts += ["--targets"]
    return shlex.join(parts)


def parse_sources(parser, args) -> tuple[list[Path], list[Path]]:
    """(work dirs, bench.json files) named on the command line; a parser error for a bad one."""
    if not args.work_dirs and not args.bench:
        parser.error("give a WORK_DIR (VLMEvalKit's --work-dir, or a bench --out dir) or --bench DIR")
    work_dirs, benches = [], []
    for text in args.work_dirs:
        path = Path(text)
        if not path.is_dir():
            parser.error(f"{text} is not a directory")
        if (path / "bench.json").exists() and not any(p.is_dir() and p.name != "logs" for p in path.iterdir()):
            benches.append(path / "bench.json")  # a bench --out dir given as a work dir
        else:
            work_dirs.append(path)
    for text in args.bench:
        path = resolve_bench(Path(text))
        if path is None:
            parser.error(f"--bench {text}: no bench.json there (python -m hybrid_tools.bench ... --out DIR writes one)")
        benches.append(path)
    return work_dirs, benches


def select(configs, patterns: list[str] | None, vanilla: str | None):
    """The configurations matching `patterns` (all without), and the references they need."""
    if not patterns:
        return configs
    chosen = [c for c in configs if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    references = [c for c in configs if c not in chosen and (c.name == vanilla or (not vanilla and is_vanilla(c)))]
    return references + chosen


def device_checks(args, linker: Linker) -> tuple | None:
    """(steps, test results, their sources) from --steps and --pytest; None without either."""
    if not (args.steps or args.pytest):
        return None
    for flag in ("steps", "pytest"):
        if getattr(args, flag) and not Path(getattr(args, flag)).is_file():
            raise ValueError(f"--{flag} {getattr(args, flag)}: no such file")
    steps = read_steps(Path(args.steps)) if args.steps else None
    tests = read_pytest(Path(args.pytest)) if args.pytest else None
    sources = {"steps": linker.rel(args.steps)} if args.steps else {}
    return steps, tests, sources | ({"tests": linker.rel(args.pytest)} if args.pytest else {})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    work_dirs, benches = parse_sources(parser, args)
    args.name = args.name or (work_dirs[0] if work_dirs else benches[0].parent).resolve().name
    if not re.fullmatch(REPORT_NAME, args.name):
        parser.error(f"--name {args.name!r}: use letters, digits, '.', '_' and '-'")
    report_dir = Path(args.out) / args.name
    recipe = read_recipe(parser, args.recipe)
    configs = chosen_configurations(parser, args, work_dirs)
    if args.snapshot:
        file_inputs = read_file_inputs(args, report_dir)
        try:
            work_dirs, benches = snapshot(work_dirs, configs, benches, report_dir / "raw")
        except ValueError as error:
            parser.error(str(error))
        snapshot_file_inputs(args, file_inputs, report_dir / "raw")
        configs = keep_datasets([c for w in work_dirs for c in select(configurations(w), args.models, args.vanilla)], args.data)
    if not configs and not benches:
        return fail(f"no results in {', '.join(args.work_dirs)} (expected <work_dir>/<model>/<model>_<dataset>_*)")
    try:
        bench_data = [read_bench(path) for path in benches]
        parity = (read_parity(Path(args.parity)), Linker(report_dir).rel(args.parity)) if args.parity else None
        checks = device_checks(args, Linker(report_dir))
        floors = read_floors([Path(p) for p in args.floors])
    except ValueError as error:
        return fail(str(error))
    if args.vanilla and not any(c.name == args.vanilla for c in configs):
        return fail(f"--vanilla {args.vanilla}: no such model folder")
    assign_references(configs, args.vanilla)
    configs = order_configurations(configs)
    label_configurations(configs, {w: display_path(w) for w in work_dirs})
    report = ReportInput(
        name=args.name, title=args.title or f"Report: {args.name}", command=canonical_command(args, work_dirs, benches),
        configs=configs, benches=bench_data, linker=Linker(report_dir), figures=report_dir / "figures",
        recipe_path=display_path(Path(args.recipe)) if args.recipe else None, recipe=recipe, targets=args.targets, parity=parity, checks=checks,
        floors=floors,
    )
    write(report, report_dir)
    print(f"hybrid_tools.report: wrote {report_dir / 'report.md'}")
    return 0


def read_recipe(parser, path: str | None) -> str | None:
    """The --recipe script's text (the report quotes the command that made its inputs), or None."""
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        parser.error(f"--recipe: {error}")


def chosen_configurations(parser, args, work_dirs: list[Path]) -> list:
    """The configurations --models and --data choose (with their references); a usage error for a
    --data no folder holds or a --models pattern no folder matches."""
    configs = [c for w in work_dirs for c in select(configurations(w), args.models, args.vanilla)]
    absent = [name for name in args.data or [] if not any(name in c.entries for c in configs)]
    if absent and configs:
        parser.error(f"--data {' '.join(absent)}: no model folder holds results of it")
    configs = keep_datasets(configs, args.data)
    unmatched = [p for p in args.models or [] if work_dirs and not any(fnmatch.fnmatchcase(c.name, p) for c in configs)]
    if unmatched:
        parser.error(f"--models {' '.join(unmatched)}: no model folder matches (a pattern matches whole folder names, "
                     f"e.g. 'llava_v1.5_7b_fastv*')")
    return configs


def fail(message: str) -> int:
    print(f"hybrid_tools.report: error: {message}", file=sys.stderr)
    return 2


def write(report: ReportInput, report_dir: Path) -> None:
    """report.md, report.json and figures/ (made afresh) in report_dir."""
    report_dir.mkdir(parents=True, exist_ok=True)
    if report.figures.exists():
        shutil.rmtree(report.figures)
    markdown, summary = render(report)
    (report_dir / "report.md").write_text(markdown, encoding="utf-8")
    with open(report_dir / "report.json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, default=str)
        handle.write("\n")
