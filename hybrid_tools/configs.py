"""Configurations compared against their vanilla reference: the data model of the sweep table and the report.

A configuration is one model folder of a work dir (model name + setting), read by
`vlmeval_plugin.results`; each of its datasets is an Entry, which is that dataset's result plus
the vanilla result it is compared with. The vanilla configuration of a configuration is an
unpatched plugin name (`llava_v1.5_7b`, `llava_tiny`), or any folder without a setting tag whose
sidecars say `stock`, whose name prefixes the configuration's base name, preferably in the same
work dir. Deltas are differences in the shown units (accuracy in percentage points); ratios are
configuration / vanilla.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from vlmeval_plugin.results import DatasetResult, ModelFolder, read_sweep_runs, read_work_dir, rows_text
from vlmeval_plugin.settings import VANILLA_NAMES, base_name, setting_tag

TINY_PREFIX = "llava_tiny"


@dataclass(eq=False)
class Entry(DatasetResult):
    """One configuration x dataset: its result, and the vanilla result it is compared with
    (itself for a vanilla configuration; None when there is none)."""

    reference: Entry | None = None
    config: Configuration | None = None
    unpaired: str = ""  # why it has no reference although its vanilla ran (other rows)

    @classmethod
    def of(cls, result: DatasetResult, config: Configuration) -> Entry:
        values = {f.name: getattr(result, f.name) for f in dataclasses.fields(DatasetResult)}
        return cls(**values, config=config)


@dataclass(eq=False)
class Configuration(ModelFolder):
    """One model folder compared with its vanilla reference."""

    entries: dict = field(default_factory=dict)  # dataset -> Entry
    label: str = ""
    vanilla: bool = False
    reference: Configuration | None = None
    sweep_runs: list = field(default_factory=list)  # (sweep record path, run)

    @property
    def base(self) -> str:
        return base_name(self.name)

    @property
    def tag(self) -> str:
        """The setting part of the name ("vanilla" for a vanilla folder)."""
        return "vanilla" if self.vanilla else (setting_tag(self.name) or self.name)

    @property
    def method(self) -> str:
        """What a plot draws one line for: the setting without its budget ('FastV L2', 'random L2 seed 1',
        'DyMU', 'DyMU + FastV L2', 'pooling', 'visionzip-per-crop', 'vanilla'), so each line varies only
        the budget."""
        if self.vanilla:
            return "vanilla"
        names = []
        for part in self.tag.split("_"):
            if part.startswith("pool-"):
                names.append("pooling")
            elif part.startswith("dymu-"):
                names.append("DyMU")
            elif part.startswith(("fastv-", "random-")):
                layer, seed = re.search(r"-l(\d+)", part), re.search(r"-s(\d+)$", part)
                names.append(("FastV" if part.startswith("fastv-") else "random") + (f" L{layer.group(1)}" if layer else "")
                             + (f" seed {seed.group(1)}" if seed else ""))
            else:  # a method's part without its budget (visionzip-b64 -> visionzip); renumbered, split-slot, scoring-eager
                names.append(re.sub(r"-b\d+(\.\d+)?(?=-|$)", "", part))
        return " + ".join(names) or self.tag

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint recorded by run.py (run_info.json), else the --model-path a sweep passed."""
        for record in reversed(self.run_info):
            if record.get("checkpoint"):
                return str(record["checkpoint"])
        for _, run in reversed(self.sweep_runs):
            command = run.get("command") if isinstance(run.get("command"), list) else []
            for flag, value in zip(command, command[1:]):
                if flag == "--model-path":
                    return str(value)
        return None

    @property
    def tiny(self) -> bool:
        return self.name.startswith(TINY_PREFIX) or "tiny-llava" in (self.checkpoint or "")


def configurations(work_dir: Path) -> list[Configuration]:
    """Every model folder with results in a work dir, with the sweep runs that made it."""
    sweeps = read_sweep_runs(work_dir)
    found = []
    for folder in read_work_dir(work_dir):
        values = {f.name: getattr(folder, f.name) for f in dataclasses.fields(ModelFolder)}
        config = Configuration(**values, sweep_runs=[(m, run) for m, run in sweeps if run.get("folder") == folder.name])
        config.entries = {dataset: Entry.of(result, config) for dataset, result in folder.results.items()}
        found.append(config)
    return found


def is_vanilla(config: Configuration) -> bool:
    if setting_tag(config.name) is not None:
        return False
    if config.name in VANILLA_NAMES:
        return True
    return {s for entry in config.entries.values() for s in entry.settings} == {"stock"}


def assign_references(configs: list[Configuration], forced: str | None = None) -> None:
    """Mark the vanilla configurations (`forced`: that name only) and give every other one its reference."""
    for config in configs:
        config.vanilla = (config.name == forced) if forced else is_vanilla(config)
    vanillas = [c for c in configs if c.vanilla]
    for config in configs:
        if config.vanilla:
            continue
        candidates = [v for v in vanillas if forced or config.base.startswith(v.name)]
        candidates.sort(key=lambda v: (bool(run_mismatch(config, v)), v.work_dir != config.work_dir, -len(v.name)))
        config.reference = candidates[0] if candidates else None
    for config in configs:
        reference = config if config.vanilla else config.reference
        mismatch = run_mismatch(config, reference) if reference is not None else ""
        for dataset, entry in config.entries.items():
            entry.reference = reference.entries.get(dataset) if reference is not None else None
            if entry.reference is not None and mismatch:
                entry.unpaired, entry.reference = mismatch, None
            elif entry.reference is not None and entry.reference.row_indices != entry.row_indices:  # not the same questions
                entry.unpaired = (f"{rows_text(entry)} rows, vanilla {rows_text(entry.reference)}" if entry.rows != entry.reference.rows
                                  else f"{entry.rows} rows, other ones than vanilla's")
                entry.reference = None


def latest_generating_run(config: Configuration) -> dict:
    """run.py's last record of a run that generated (`--mode eval` generates nothing); {} if none."""
    return next((r for r in reversed(config.run_info) if r.get("mode") != "eval"), {})


def run_mismatch(config: Configuration, reference: Configuration) -> str:
    """Why `config`'s outputs cannot be set against its vanilla `reference`'s: another checkpoint
    (content signature) or another device, by both folders' last generating runs ("" where they
    agree or a record does not say). Names alone pair folders of two work dirs."""
    ours, theirs = latest_generating_run(config), latest_generating_run(reference)
    reasons = []
    for key, what in (("checkpoint_signature", "checkpoint"), ("device", "device")):
        if ours.get(key) is not None and theirs.get(key) is not None and ours[key] != theirs[key]:
            reasons.append(f"{what} {ours[key]}, vanilla's {theirs[key]}")
    return "; ".join(reasons)


def order_configurations(configs: list[Configuration]) -> list[Configuration]:
    """Vanilla first, then by base name, then by how much reaches the LLM (most first)."""

    def kept(config):
        values = [e.tokens_kept_mean for e in config.entries.values() if e.tokens_kept_mean is not None]
        return -statistics.fmean(values) if values else 0.0

    return sorted(configs, key=lambda c: (not c.vanilla, c.base, kept(c), c.name, str(c.work_dir)))


def label_configurations(configs: list[Configuration], work_dir_labels: dict[Path, str]) -> None:
    """Each configuration's label: its name, plus its work dir where two work dirs share a name."""
    counts: dict[str, int] = {}
    for config in configs:
        counts[config.name] = counts.get(config.name, 0) + 1
    for config in configs:
        config.label = config.name if counts[config.name] == 1 else f"{config.name} ({work_dir_labels[config.work_dir]})"


def collect(work_dir: str | Path, folders: list[str], datasets: list[str] | None = None) -> list[Configuration]:
    """The configurations of `folders` in `work_dir` (plus any vanilla folder there), referenced and
    ordered; with `datasets`, their results on those sets only."""
    work_dir = Path(work_dir)
    found = [c for c in configurations(work_dir) if c.name in folders or is_vanilla(c)] if work_dir.is_dir() else []
    found = keep_datasets(found, datasets)
    assign_references(found)
    return order_configurations(found)


def keep_datasets(configs: list[Configuration], datasets: list[str] | None) -> list[Configuration]:
    """`configs` with their results on `datasets` only (all without): a folder also holds the sets of
    other runs, which a sweep's table or report must not show as its own."""
    if not datasets:
        return configs
    for config in configs:
        config.entries = {name: entry for name, entry in config.entries.items() if name in datasets}
    return [config for config in configs if config.entries]  # a folder without those sets is not in the table


def delta(entry: Entry, key: str) -> float | None:
    reference = entry.reference
    if reference is None or reference is entry or key not in entry.metrics or key not in reference.metrics:
        return None
    return entry.metrics[key] - reference.metrics[key]


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not reference:
        return None
    return value / reference


def prefill_ratio(entry: Entry, reference: Entry | None) -> float | None:
    """The median prefill time over the reference's, only where both ran at one and the same batch
    size: a row records its whole batch's prefill, so times at other sizes are not comparable."""
    if reference is None or len(entry.batch_sizes) > 1 or entry.batch_sizes != reference.batch_sizes:
        return None
    return ratio(entry.prefill_ms_median, reference.prefill_ms_median)


def comparison_reference(entry: Entry) -> Entry | None:
    """The vanilla entry a non-vanilla entry is compared with (None for vanilla itself)."""
    return entry.reference if entry.reference is not entry else None
