"""--snapshot: copy the raw files a report reads into reports/<name>/raw/, so they are committed with it.

The single-file inputs (--recipe, --parity, --steps, --pytest, --floors) are copied into raw/inputs/
unless they already lie in reports/<name>/, which is committed with the report anyway."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from hybrid_vlm.provenance import portable

from ..configs import Configuration


def _unique_label(path: Path, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name) or "dir"
    label, number = base, 2
    while label in taken:
        label, number = f"{base}-{number}", number + 1
    taken.add(label)
    return label


def copy_portable(path: Path, target: Path) -> None:
    """Copy a raw file to be committed; a JSON record's absolute paths made portable (VLMEvalKit's
    status.json names its prediction files under the --work-dir as given, often absolute)."""
    if path.suffix == ".json":  # path may be target itself: a copy made portable in place
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if data is not None and portable(data) != data:
            target.write_text(json.dumps(portable(data), indent=2) + "\n", encoding="utf-8")
            return
    if path != target:
        shutil.copy2(path, target)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def snapshot(work_dirs: list[Path], configs: list[Configuration], benches: list[Path], raw_dir: Path) -> tuple[list[Path], list[Path]]:
    """Copy what the report reads into raw_dir; return the work dirs and bench files to read instead."""
    sources = work_dirs + benches
    if all(_inside(p, raw_dir) for p in sources):
        return work_dirs, benches  # regenerating from a snapshot: read it as it is
    if any(_inside(p, raw_dir) for p in sources):
        raise ValueError(f"--snapshot: mix of sources inside and outside {raw_dir}; give either")
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    taken: set[str] = set()
    new_work_dirs = []
    for work_dir in work_dirs:
        target = raw_dir / _unique_label(work_dir, taken)
        target.mkdir(parents=True)
        for config in [c for c in configs if c.work_dir == work_dir]:
            files = [config.status_file, config.run_info_file]
            for entry in config.entries.values():
                files += [*entry.metric_files, entry.stats_file, entry.prediction_file]
            (target / config.name).mkdir()
            for path in files:
                if path is not None:
                    copy_portable(path, target / config.name / path.name)
        manifests = {m for c in configs if c.work_dir == work_dir for m, _ in c.sweep_runs}
        for manifest in manifests:
            copy_portable(manifest, target / manifest.name)
            csv_path = manifest.with_suffix(".csv")
            if csv_path.exists():
                shutil.copy2(csv_path, target / csv_path.name)
        new_work_dirs.append(target)
    new_benches = []
    for bench in benches:
        target = raw_dir / _unique_label(bench.parent, taken)
        target.mkdir(parents=True)
        shutil.copy2(bench, target / "bench.json")
        if bench.with_name("bench.csv").exists():
            shutil.copy2(bench.with_name("bench.csv"), target / "bench.csv")
        new_benches.append(target / "bench.json")
    return new_work_dirs, new_benches


FILE_INPUTS = ("recipe", "parity", "steps", "pytest")  # one path each; --floors takes several


def read_file_inputs(args, report_dir: Path) -> list[tuple[Path, bytes]]:
    """The single-file inputs to copy, read before snapshot() may clear raw/: those outside
    report_dir, and those in its raw/ (which a snapshot from new sources starts afresh)."""
    paths = [Path(getattr(args, flag)) for flag in FILE_INPUTS if getattr(args, flag)] + [Path(p) for p in args.floors]
    raw_dir = report_dir / "raw"
    to_copy = [p for p in paths if _inside(p, raw_dir) or not _inside(p, report_dir)]
    return [(path, path.read_bytes()) for path in dict.fromkeys(to_copy) if path.is_file()]  # a missing one: its reader says so


def snapshot_file_inputs(args, inputs: list[tuple[Path, bytes]], raw_dir: Path) -> None:
    """Write read_file_inputs' files into raw_dir/inputs/ and point args at the copies; one still
    in raw_dir (a report regenerated from its own snapshot) stays where it is."""
    staying = [path for path, _ in inputs if _inside(path, raw_dir) and path.is_file()]
    taken = {path.name for path in staying}  # a new copy must not overwrite one of them
    copies: dict[Path, Path] = {}
    for path, content in [(path, content) for path, content in inputs if path not in staying]:
        target = raw_dir / "inputs" / _unique_label(path, taken)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        copy_portable(target, target)
        copies[path] = target
    for flag in FILE_INPUTS:
        if getattr(args, flag) and Path(getattr(args, flag)) in copies:
            setattr(args, flag, str(copies[Path(getattr(args, flag))]))
    args.floors = [str(copies.get(Path(p), p)) for p in args.floors]
