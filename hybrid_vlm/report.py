"""Reports from raw outputs: VLMEvalKit work dirs and `hybrid_vlm.bench` results -> reports/<name>/.

    python -m hybrid_vlm.report outputs --name my-sweep
    python -m hybrid_vlm.report outputs runs/other --bench runs/bench-mid --name main --snapshot

Writes reports/<name>/report.md (GitHub-readable), report.json (every number, with its source
file) and figures/<dataset>.png (the dataset's main metric vs mean tokens kept and vs median
prefill time, one PNG per dataset). Every number is read from the raw files each time this runs;
nothing is typed by hand.

What it reads
- Every model folder of every WORK_DIR (`<work_dir>/<model>/`, VLMEvalKit's layout) and every
  dataset in it: datasets are found from VLMEvalKit's status.json, the plugin's stats sidecars
  (`<model>_<dataset>_stats.jsonl`) and metric files that sit beside a prediction file.
- Metrics from VLMEvalKit's own evaluation files: MCQ `<model>_<dataset>_acc.csv` (Overall and
  categories, shown in %; the `dev` split when there are several) and caption
  `<model>_<dataset>_score.json` (BLEU-1..4, ROUGE_L, CIDEr, as VLMEvalKit writes them, x100).
  Other `_acc` / `_score` files: their numeric fields, first one as the main metric.
- Per-row statistics from the sidecars: mean tokens entering the LLM, mean tokens kept after
  pruning, median (and mean) prefill ms per row.
- The vanilla configuration (the unpatched name: `llava_v1.5_7b`, `llava_tiny`, or any folder
  without a `__<setting>` tag whose sidecar says `stock`) is each configuration's reference:
  the one whose name prefixes the configuration's base name, in the same work dir if possible.
  `--vanilla NAME` forces one. Deltas are absolute differences in the shown units (accuracy in
  percentage points), ratios are configuration / vanilla.
- Bench results (`--bench DIR_OR_JSON`, or a WORK_DIR that holds a bench.json): the FLOPs/latency
  table, the measured time ratio beside the theoretical MAC ratio.
- Provenance: the command, environment settings and versions recorded beside each raw output:
  `run_info.json` (written by run.py, when it records one), `sweep_*.json` (written by
  `python -m hybrid_vlm.sweep`), VLMEvalKit's `status.json` and bench.json's `meta`. What no
  file records is reported as "not recorded".

--snapshot copies the raw files the report reads (metric files, sidecars, prediction files,
status / run_info / sweep records, bench.json / bench.csv; no pickles, no logs) into
reports/<name>/raw/ and reads them from there, so the report can be committed together with its
sources and regenerated exactly from them. --recipe FILE puts a shell script (how the raw outputs
were made) verbatim at the top of the report.

This module does not import vlmeval (the VLMEvalKit runs are long finished); it needs matplotlib
(the `report` extra: pip install -e .[report]).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

NAME_SEPARATOR = "__"  # vlmeval_plugin.settings.NAME_SEPARATOR (not imported: keep this module light)
VANILLA_NAMES = ("llava_v1.5_7b", "llava_tiny")  # the plugin's unpatched names
TINY_PREFIX = "llava_tiny"
PREDICTION_SUFFIXES = ("xlsx", "tsv", "json")
TABLE_SUFFIXES = ("csv", "xlsx", "tsv", "json")
CAPTION_KEYS = ("CIDEr", "BLEU-4", "ROUGE_L", "BLEU-1")
RUN_ENV_KEYS = ("FASTV_K", "FASTV_LAYER", "DYMU_THRESHOLDS", "HYBRID_POSITIONS", "HYBRID_VLM_MODEL_PATH", "MMEVAL_ROOT")
DEFAULT_OUT = "reports"

TINY_BANNER = (
    "> [!WARNING]\n"
    "> **Tiny random-weight model, not LLaVA-1.5-7B.** {what} the bundled tiny LLaVA "
    "(`hybrid_vlm/tiny.py`: LLaVA-1.5's 336 px / 576-token geometry, toy widths, a 4-layer LLM, "
    "**random weights**). Its accuracies and caption scores are noise and say nothing about "
    "LLaVA-1.5-7B; its timings are those of a toy model on this machine. This report shows what the "
    "pipeline produces, end to end."
)


# ------------------------------------------------------------------------------------ reading


def load_table(path: Path):
    from vlmeval_plugin.stats import load_table as load_vlmeval_table  # xlsx / tsv / csv / json

    return load_vlmeval_table(path)


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def read_stats(path: Path) -> dict[str, dict]:
    """The plugin's per-row sidecar: index -> record (its own reader; it imports no vlmeval)."""
    from vlmeval_plugin.stats import read_records

    return read_records(path)


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def read_mcq_metrics(path: Path) -> tuple[dict, str | None]:
    """VLMEvalKit's report_acc table: one row per split, Overall then categories, fractions in
    [0, 1]. Returns ({name: percent}, split) for the `dev` split if there are several."""
    table = load_table(path)
    if len(table) == 0:
        return {}, None
    row = table.iloc[0]
    split = None
    if "split" in table.columns:
        splits = [str(value) for value in table["split"]]
        if "dev" in splits:
            row = table.iloc[splits.index("dev")]
        split = str(row["split"])
    metrics = {}
    for column in table.columns:
        if column == "split" or not _is_number(row[column]):
            continue
        metrics[str(column)] = 100.0 * float(row[column])
    return metrics, split


def read_score_metrics(path: Path) -> tuple[dict, str]:
    """A `_score.json` (captions: {"Bleu": [4 values], "ROUGE_L", "CIDEr"}, x100 by VLMEvalKit) or
    another score file's numeric fields. Returns (metrics, kind)."""
    if path.suffix != ".json":
        table = load_table(path)
        if len(table) == 0:
            return {}, "other"
        row = table.iloc[0]
        return {str(c): float(row[c]) for c in table.columns if _is_number(row[c])}, "other"
    scores = read_json(path)
    if not isinstance(scores, dict):
        return {}, "other"
    metrics = {}
    if isinstance(scores.get("Bleu"), list):
        for order, value in enumerate(scores["Bleu"], start=1):
            if _is_number(value):
                metrics[f"BLEU-{order}"] = float(value)
    for key, value in scores.items():
        if key != "Bleu" and _is_number(value):
            metrics[str(key)] = float(value)
    kind = "caption" if "CIDEr" in metrics or "BLEU-4" in metrics else "other"
    return metrics, kind


# ---------------------------------------------------------------------------------- model


@dataclass(eq=False)
class Entry:
    """One configuration x dataset."""

    dataset: str
    kind: str = "none"  # mcq | caption | other | none (no metric file yet)
    metrics: dict = field(default_factory=dict)  # display units: % for MCQ, VLMEvalKit's x100 for captions
    main_metric: str | None = None
    split: str | None = None
    metric_files: list = field(default_factory=list)
    prediction_file: Path | None = None
    rows: int | None = None
    stats_file: Path | None = None
    stats_rows: int = 0
    tokens_in: float | None = None
    tokens_kept: float | None = None
    prefill_ms: float | None = None  # median per row
    prefill_ms_mean: float | None = None
    new_tokens: float | None = None
    batch_sizes: list = field(default_factory=list)
    settings: list = field(default_factory=list)  # the sidecar's "setting" values
    reference: Entry | None = None
    config: Config | None = None

    @property
    def main_value(self) -> float | None:
        return self.metrics.get(self.main_metric) if self.main_metric else None


@dataclass(eq=False)
class Config:
    """One model folder: a configuration (model name + setting) in one work dir."""

    work_dir: Path
    name: str
    entries: dict = field(default_factory=dict)  # dataset -> Entry
    label: str = ""
    vanilla: bool = False
    reference: Config | None = None
    status: dict | None = None
    status_file: Path | None = None
    run_info: list = field(default_factory=list)
    run_info_file: Path | None = None
    sweep_runs: list = field(default_factory=list)  # (manifest path, run record)

    @property
    def folder(self) -> Path:
        return self.work_dir / self.name

    @property
    def base(self) -> str:
        return self.name.split(NAME_SEPARATOR)[0]

    @property
    def tag(self) -> str:
        """The setting part of the name ("vanilla" for a vanilla folder)."""
        if self.vanilla:
            return "vanilla"
        return self.name.split(NAME_SEPARATOR, 1)[1] if NAME_SEPARATOR in self.name else self.name

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
        checkpoint = self.checkpoint or ""
        return self.name.startswith(TINY_PREFIX) or "tiny-llava" in checkpoint


def _datasets_in(folder: Path, model: str, status: dict | None) -> list[str]:
    """Dataset names of a model folder, in a stable order (status.json's, then sorted)."""
    names: list[str] = []
    if status and isinstance(status.get("datasets"), dict):
        names += [str(name) for name in status["datasets"]]
    prefix = model + "_"
    found = set()
    for path in folder.iterdir():
        filename = path.name
        if not filename.startswith(prefix):
            continue
        rest = filename[len(prefix):]
        if rest.endswith("_stats.jsonl"):
            found.add(rest[: -len("_stats.jsonl")])
            continue
        match = re.fullmatch(r"(.+)_(acc|score)\.(csv|xlsx|tsv|json)", rest)
        # a metric file counts only beside its prediction file (so "<dataset>_<group>_acc.csv" is not a dataset)
        if match and any((folder / f"{model}_{match.group(1)}.{s}").exists() for s in PREDICTION_SUFFIXES):
            found.add(match.group(1))
    names += sorted(found - set(names))
    return names


def read_entry(folder: Path, model: str, dataset: str) -> Entry:
    entry = Entry(dataset=dataset)
    stem = f"{model}_{dataset}"
    for suffix in PREDICTION_SUFFIXES:
        path = folder / f"{stem}.{suffix}"
        if path.exists():
            entry.prediction_file = path
            try:
                entry.rows = len(load_table(path))
            except Exception:  # unreadable prediction file: the row count stays unknown
                entry.rows = None
            break
    for suffix in TABLE_SUFFIXES:
        path = folder / f"{stem}_acc.{suffix}"
        if path.exists():
            metrics, split = read_mcq_metrics(path)
            entry.metrics.update(metrics)
            entry.split, entry.kind = split, "mcq"
            entry.metric_files.append(path)
            entry.main_metric = "Overall" if "Overall" in metrics else next(iter(metrics), None)
            break
    if entry.kind == "none":
        for suffix in ("json", *TABLE_SUFFIXES):
            path = folder / f"{stem}_score.{suffix}"
            if path.exists():
                metrics, kind = read_score_metrics(path)
                entry.metrics.update(metrics)
                entry.kind = kind
                entry.metric_files.append(path)
                entry.main_metric = "CIDEr" if "CIDEr" in metrics else next(iter(metrics), None)
                break
    stats_path = folder / f"{stem}_stats.jsonl"
    records = read_stats(stats_path)
    if records:
        entry.stats_file, entry.stats_rows = stats_path, len(records)
        values = list(records.values())

        def column(key):
            return [float(r[key]) for r in values if _is_number(r.get(key))]

        tokens_in, tokens_kept, prefill = column("tokens_in"), column("tokens_kept"), column("prefill_s")
        new_tokens = column("new_tokens")
        entry.tokens_in = statistics.fmean(tokens_in) if tokens_in else None
        entry.tokens_kept = statistics.fmean(tokens_kept) if tokens_kept else None
        entry.prefill_ms = 1000.0 * statistics.median(prefill) if prefill else None
        entry.prefill_ms_mean = 1000.0 * statistics.fmean(prefill) if prefill else None
        entry.new_tokens = statistics.fmean(new_tokens) if new_tokens else None
        entry.batch_sizes = sorted({int(r["batch_size"]) for r in values if _is_number(r.get("batch_size"))})
        entry.settings = sorted({str(r["setting"]) for r in values if r.get("setting") is not None})
    return entry


def _read_run_info(path: Path) -> list[dict]:
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return [r for r in data["runs"] if isinstance(r, dict)]
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    return []


def discover(work_dir: Path) -> list[Config]:
    """Every model folder of a VLMEvalKit work dir that holds results, sidecars or a status."""
    configs = []
    sweeps = []
    for manifest in sorted(work_dir.glob("sweep_*.json")):
        data = read_json(manifest)
        if isinstance(data, dict):
            sweeps += [(manifest, run) for run in data.get("runs", []) if isinstance(run, dict)]
    for folder in sorted(p for p in work_dir.iterdir() if p.is_dir()):
        model = folder.name
        status_file = folder / "status.json"
        status = read_json(status_file) if status_file.exists() else None
        datasets = _datasets_in(folder, model, status if isinstance(status, dict) else None)
        if not datasets:
            continue
        config = Config(work_dir=work_dir, name=model)
        if isinstance(status, dict):
            config.status, config.status_file = status, status_file
        if (folder / "run_info.json").exists():
            config.run_info_file = folder / "run_info.json"
            config.run_info = _read_run_info(config.run_info_file)
        config.sweep_runs = [(m, run) for m, run in sweeps if run.get("folder") == model]
        for dataset in datasets:
            entry = read_entry(folder, model, dataset)
            entry.config = config
            config.entries[dataset] = entry
        configs.append(config)
    return configs


def is_vanilla(config: Config) -> bool:
    if NAME_SEPARATOR in config.name:
        return False
    if config.name in VANILLA_NAMES:
        return True
    settings = {s for entry in config.entries.values() for s in entry.settings}
    return settings == {"stock"}


def assign_references(configs: list[Config], forced: str | None = None) -> None:
    for config in configs:
        config.vanilla = (config.name == forced) if forced else is_vanilla(config)
    vanillas = [c for c in configs if c.vanilla]
    for config in configs:
        if config.vanilla:
            continue
        candidates = [v for v in vanillas if forced or config.base.startswith(v.name)]
        candidates.sort(key=lambda v: (v.work_dir != config.work_dir, -len(v.name)))
        config.reference = candidates[0] if candidates else None
    for config in configs:
        reference = config if config.vanilla else config.reference
        for dataset, entry in config.entries.items():
            entry.reference = reference.entries.get(dataset) if reference is not None else None


def order_configs(configs: list[Config]) -> list[Config]:
    """Vanilla first, then by base name, then by how much reaches the LLM (most first)."""

    def kept(config):
        values = [e.tokens_kept for e in config.entries.values() if e.tokens_kept is not None]
        return -statistics.fmean(values) if values else 0.0

    return sorted(configs, key=lambda c: (not c.vanilla, c.base, kept(c), c.name, str(c.work_dir)))


def label_configs(configs: list[Config], work_dir_labels: dict[Path, str]) -> None:
    counts: dict[str, int] = {}
    for config in configs:
        counts[config.name] = counts.get(config.name, 0) + 1
    for config in configs:
        config.label = config.name if counts[config.name] == 1 else f"{config.name} ({work_dir_labels[config.work_dir]})"


# ----------------------------------------------------------------------------------- bench


@dataclass
class Bench:
    path: Path
    meta: dict
    rows: list
    csv_path: Path | None = None


def resolve_bench(path: Path) -> Path | None:
    if path.is_dir():
        return path / "bench.json" if (path / "bench.json").exists() else None
    return path if path.is_file() else None


def read_bench(path: Path) -> Bench:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not a hybrid_vlm.bench bench.json (no 'rows')")
    csv_path = path.with_name("bench.csv")
    return Bench(path=path, meta=data.get("meta") or {}, rows=data["rows"], csv_path=csv_path if csv_path.exists() else None)


# ------------------------------------------------------------------------------- formatting


def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    text = format(value, spec)
    if re.fullmatch(r"-0(\.0*)?", text):  # a tiny negative rounds to zero: no sign
        text = ("+" if spec.startswith("+") else "") + text[1:]
    return text + suffix


def delta(entry: Entry, key: str) -> float | None:
    reference = entry.reference
    if reference is None or reference is entry or key not in entry.metrics or key not in reference.metrics:
        return None
    return entry.metrics[key] - reference.metrics[key]


def ratio(value, reference) -> float | None:
    if value is None or reference is None or not reference:
        return None
    return value / reference


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Linker:
    """Markdown links to raw files, relative to the report's folder (they work on GitHub)."""

    def __init__(self, report_dir: Path):
        self.report_dir = report_dir.resolve()

    def rel(self, path: Path | str) -> str:
        return Path(os.path.relpath(Path(path).resolve(), self.report_dir)).as_posix()

    def link(self, text: str, path: Path | str | None) -> str:
        return f"[{text}]({self.rel(path)})" if path else "–"


def display_path(path: Path | str) -> str:
    """A path as the user would type it: relative to the current directory when below it."""
    path = Path(path)
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix() if path.resolve().is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)


def metric_unit(kind: str) -> str:
    return {"mcq": "accuracy, % (Δ in percentage points)", "caption": "VLMEvalKit's COCO scorer, ×100"}.get(kind, "as in the metric file")


def sources_cell(entry: Entry, linker: Linker) -> str:
    parts = [linker.link("metric", path) for path in entry.metric_files]
    if entry.stats_file:
        parts.append(linker.link("stats", entry.stats_file))
    if entry.prediction_file:
        parts.append(linker.link("pred", entry.prediction_file))
    return " · ".join(parts) or "–"


def dataset_table(dataset: str, entries: list[Entry], linker: Linker) -> tuple[str, list[str]]:
    """(markdown, metric keys shown) for one dataset."""
    kinds = {e.kind for e in entries if e.kind != "none"}
    kind = kinds.pop() if len(kinds) == 1 else ("other" if kinds else "none")
    if kind == "caption":
        keys = [k for k in CAPTION_KEYS if any(k in e.metrics for e in entries)]
    else:
        mains = [e.main_metric for e in entries if e.main_metric]
        keys = [mains[0]] if mains else []
    header = ["configuration"]
    for key in keys:
        header += [key, "Δ"]
    header += ["tokens in", "tokens kept", "kept vs vanilla", "prefill ms (median)", "prefill vs vanilla", "rows", "raw files"]
    rows = []
    for entry in entries:
        config = entry.config
        ref = entry.reference if entry.reference is not entry else None
        row = [f"`{config.label}`" + (" (vanilla)" if config.vanilla else "")]
        for key in keys:
            row += [fmt(entry.metrics.get(key)), "ref" if config.vanilla and key in entry.metrics else fmt(delta(entry, key), "+.1f")]
        rows_text = str(entry.rows) if entry.rows is not None else (f"{entry.stats_rows} (stats only)" if entry.stats_rows else "–")
        row += [
            fmt(entry.tokens_in),
            fmt(entry.tokens_kept),
            fmt(ratio(entry.tokens_kept, ref.tokens_kept if ref else None), ".3f", "×") if not config.vanilla else "1×",
            fmt(entry.prefill_ms, ".2f"),
            fmt(ratio(entry.prefill_ms, ref.prefill_ms if ref else None), ".3f", "×") if not config.vanilla else "1×",
            rows_text,
            sources_cell(entry, linker),
        ]
        rows.append(row)
    return md_table(header, rows, align="l" + "r" * (len(header) - 2) + "l"), keys


def details_table(entries: list[Entry]) -> str | None:
    """Every metric of every configuration (MCQ categories, all BLEU orders), value and Δ."""
    keys: list[str] = []
    for entry in entries:
        keys += [k for k in entry.metrics if k not in keys]
    if len(keys) <= 1:
        return None
    header = ["metric"] + [f"`{e.config.label}`" for e in entries]
    rows = []
    for key in keys:
        row = [key]
        for entry in entries:
            value = entry.metrics.get(key)
            change = delta(entry, key)
            row.append(fmt(value) + (f" ({fmt(change, '+.1f')})" if change is not None else ""))
        rows.append(row)
    return md_table(header, rows)


BENCH_HEADER = [
    "config", "method", "visual in→kept", "vision ms", "LLM prefill ms", "prefill ms", "prefill GMACs",
    "prefill ratio", "theory", "ratio − theory", "LLM prefill ratio", "theory", "decode ms/token",
    "decode ratio", "theory", "peak MB",
]  # fmt: skip


def bench_table(bench: Bench) -> str:
    rows = []
    for r in bench.rows:
        if r.get("status") != "ok":
            rows.append([f"`{r.get('config')}`", str(r.get("method") or ""), f"{r.get('status')}: {(r.get('note') or '')[:120]}"] + [""] * (len(BENCH_HEADER) - 3))
            continue
        rows.append([
            f"`{r.get('config')}`", str(r.get("method") or ""),
            f"{fmt(r.get('visual_in'), '.0f')}→{fmt(r.get('visual_kept'), '.0f')}",
            fmt(r.get("vision_ms"), ".2f"), fmt(r.get("llm_prefill_ms"), ".2f"), fmt(r.get("prefill_ms"), ".2f"),
            fmt(r.get("prefill_gmacs"), ".3f"),
            fmt(r.get("prefill_ratio"), ".3f"), fmt(r.get("prefill_theory_ratio"), ".3f"),
            fmt(r.get("prefill_ratio_minus_theory"), "+.3f"),
            fmt(r.get("llm_prefill_ratio"), ".3f"), fmt(r.get("llm_prefill_theory_ratio"), ".3f"),
            fmt(r.get("decode_ms_per_token"), ".2f"), fmt(r.get("decode_ratio"), ".3f"), fmt(r.get("decode_theory_ratio"), ".3f"),
            fmt(r.get("peak_mem_mb"), ".0f"),
        ])  # fmt: skip
    return md_table(BENCH_HEADER, rows, align="ll" + "r" * (len(BENCH_HEADER) - 2))


def bench_command(meta: dict) -> str | None:
    argv = meta.get("argv")
    if not isinstance(argv, list):
        return None
    return "python -m hybrid_vlm.bench " + shlex.join(str(a) for a in argv)


def bench_setup(meta: dict) -> str:
    source = f"preset `{meta['preset']}` (random weights)" if meta.get("preset") else f"checkpoint `{meta.get('model')}`"
    device = meta.get("gpu") or meta.get("cpu") or "?"
    commit = meta.get("git_commit") or "not recorded"
    if meta.get("git_dirty"):
        commit += " (uncommitted changes)"
    return (
        f"{source}, {meta.get('dtype', '?')}, batch {meta.get('batch_size', '?')}, {meta.get('text_tokens', '?')} text tokens, "
        f"{meta.get('decode_tokens', '?')} decode steps; {meta.get('device', '?')} ({device}), "
        f"{meta.get('torch_threads', '?')} torch threads; median of {meta.get('repeats', '?')} interleaved rounds after "
        f"{meta.get('warmup', '?')} warm-up; torch {meta.get('torch', '?')}, transformers {meta.get('transformers', '?')}, "
        f"hybrid_vlm {meta.get('hybrid_vlm', '?')}, Python {meta.get('python', '?')}; git commit {commit}; at {meta.get('time', '?')}"
    )


# ------------------------------------------------------------------------------------ plots


def plot_dataset(dataset: str, entries: list[Entry], path: Path, tiny: bool) -> bool:
    """main metric vs mean tokens kept (left) and vs median prefill ms (right). False: nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [e for e in entries if e.main_value is not None]
    if not points:
        return False
    metric = points[0].main_metric
    unit = " (%)" if points[0].kind == "mcq" else ""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    bases = sorted({e.config.base for e in points})
    colours = {base: plt.cm.tab10(i % 10) for i, base in enumerate(bases)}
    for ax, attribute, xlabel in (
        (axes[0], "tokens_kept", "mean tokens kept after pruning (text + visual)"),
        (axes[1], "prefill_ms", "median prefill ms per row (vision + LLM)"),
    ):
        for base in bases:
            series = sorted(
                ((getattr(e, attribute), e.main_value, e) for e in points if e.config.base == base and getattr(e, attribute) is not None),
                key=lambda item: item[0],
            )
            if not series:
                continue
            xs, ys = [s[0] for s in series], [s[1] for s in series]
            vanilla = all(s[2].config.vanilla for s in series)
            ax.plot(xs, ys, marker="*" if vanilla else "o", markersize=11 if vanilla else 6, linestyle="-" if len(xs) > 1 else "",
                    color=colours[base], label=base, alpha=0.85)  # fmt: skip
            for x, y, entry in series:
                ax.annotate(entry.config.tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for entry in points:
            if entry.config.vanilla:
                ax.axhline(entry.main_value, color=colours[entry.config.base], linestyle="--", linewidth=0.8, alpha=0.6)
        ax.margins(x=0.18, y=0.12)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"{metric}{unit}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    title = f"{dataset}: {metric} vs tokens kept and vs prefill time"
    if tiny:
        title += "\n(tiny random-weight model: metric values are noise)"
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)
    return True


# ------------------------------------------------------------------------------ provenance


def versions_text(versions: dict | None) -> str:
    if not isinstance(versions, dict) or not versions:
        return "not recorded"
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


def git_text(record: dict) -> str:
    git = record.get("git")
    if isinstance(git, dict):
        commit, dirty = git.get("commit"), git.get("dirty")
    else:
        commit, dirty = record.get("git_commit"), record.get("git_dirty")
    if not commit:
        return "not recorded"
    return f"{commit}{' (uncommitted changes)' if dirty else ''}"


def env_text(env: dict | None) -> str:
    if not isinstance(env, dict):
        return "not recorded"
    shown = [f"{k}={v}" for k, v in env.items() if v not in (None, "")]
    return " ".join(shown) if shown else "none set"


def run_commands(config: Config) -> list[tuple[str, str]]:
    """(command, where it was recorded) for a configuration, best record first."""
    commands = []
    for record in config.run_info:
        command = record.get("command") or (shlex.join(record["argv"]) if isinstance(record.get("argv"), list) else None)
        if command:
            env = record.get("env") if isinstance(record.get("env"), dict) else {}
            prefix = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items() if k in RUN_ENV_KEYS and v not in (None, ""))
            commands.append(((prefix + " " if prefix else "") + command, "run_info.json"))
    for manifest, run in config.sweep_runs:
        command = run.get("command")
        if isinstance(command, list):
            command = shlex.join(str(part) for part in command)
        if command:
            env = run.get("env") if isinstance(run.get("env"), dict) else {}
            prefix = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items() if v not in (None, ""))
            commands.append(((prefix + " " if prefix else "") + command, manifest.name))
    return commands


def status_argv(config: Config) -> str | None:
    argv = (config.status or {}).get("argv")
    if isinstance(argv, list) and argv:
        return "python " + shlex.join(str(a) for a in argv)
    return None


def provenance_block(config: Config, linker: Linker) -> str:
    lines = [f"#### `{config.label}`", ""]
    lines.append(f"- folder: {linker.link(display_path(config.folder), config.folder)}")
    if config.run_info:
        record = config.run_info[-1]
        runs = f" (latest of {len(config.run_info)} recorded runs)" if len(config.run_info) > 1 else ""
        command = record.get("command") or (shlex.join(record["argv"]) if isinstance(record.get("argv"), list) else "not recorded")
        lines.append(f"- command ({linker.link('run_info.json', config.run_info_file)}{runs}): `{command}`")
        lines.append(f"  - environment: `{env_text(record.get('env'))}`")
        if record.get("checkpoint"):
            lines.append(f"  - checkpoint: `{record['checkpoint']}`")
        if record.get("setting") is not None:
            lines.append(f"  - setting: `{record['setting']}`")
        lines.append(f"  - versions: {versions_text(record.get('versions'))}; git commit {git_text(record)}; at {record.get('time', 'not recorded')}")
    else:
        lines.append("- run.py command, environment and versions: not recorded (no `run_info.json` in the folder)")
    for manifest, run in config.sweep_runs:
        command = shlex.join(run["command"]) if isinstance(run.get("command"), list) else str(run.get("command"))
        lines.append(f"- run by a sweep ({linker.link(manifest.name, manifest)}): `{command}`")
        lines.append(f"  - environment: `{env_text(run.get('env'))}`; exit status {run.get('returncode', '?')}; started {run.get('started', '?')}")
        data = read_json(manifest) or {}
        lines.append(f"  - sweep: `{data.get('command', 'not recorded')}`; versions: {versions_text(data.get('versions'))}; git commit {git_text(data)}")
    if config.status:
        status = config.status
        argv = status_argv(config)
        lines.append(
            f"- VLMEvalKit {linker.link('status.json', config.status_file)}: eval id `{status.get('eval_id', '?')}`, created "
            f"{status.get('created_at', '?')}, mode `{status.get('mode', '?')}`, argv `{argv or 'not recorded'}` "
            "(VLMEvalKit's own argv: the plugin's flags such as --model-path / --batch-size and the FASTV_K / "
            "DYMU_THRESHOLDS / HYBRID_POSITIONS environment are not in it; its `commit` field is the git hash of "
            f"the directory vlmeval is installed in: `{status.get('commit', '?')}`)"
        )
    settings = sorted({s for e in config.entries.values() for s in e.settings})
    batches = sorted({b for e in config.entries.values() for b in e.batch_sizes})
    if settings:
        lines.append(f"- engine setting per the stats sidecars: {', '.join(f'`{s}`' for s in settings)}; batch size {', '.join(map(str, batches)) or '?'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- snapshot


def _unique_label(path: Path, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name) or "dir"
    label, number = base, 2
    while label in taken:
        label, number = f"{base}-{number}", number + 1
    taken.add(label)
    return label


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def snapshot(work_dirs: list[Path], configs: list[Config], benches: list[Path], raw_dir: Path) -> tuple[list[Path], list[Path]]:
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
                    shutil.copy2(path, target / config.name / path.name)
        manifests = {m for c in configs if c.work_dir == work_dir for m, _ in c.sweep_runs}
        for manifest in manifests:
            shutil.copy2(manifest, target / manifest.name)
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


# ----------------------------------------------------------------------------------- report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_vlm.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="VLMEvalKit work dirs (run.py --work-dir; default ./outputs), or bench output dirs")
    parser.add_argument("--bench", nargs="+", default=[], metavar="DIR_OR_JSON", help="hybrid_vlm.bench --out dirs or bench.json files")
    parser.add_argument("--name", default=None, help="report name: reports/<name>/ (default: the first work dir's name)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"parent folder of the report (default {DEFAULT_OUT})")
    parser.add_argument("--models", nargs="+", default=None, metavar="PATTERN", help="only model folders matching these glob patterns (vanilla references are kept)")
    parser.add_argument("--vanilla", default=None, metavar="NAME", help="the reference folder name (default: detected)")
    parser.add_argument("--snapshot", action="store_true", help="copy the raw files read into reports/<name>/raw/ and read them from there")
    parser.add_argument("--recipe", default=None, metavar="FILE", help="shell script that made the raw outputs: shown verbatim at the top")
    parser.add_argument("--title", default=None, help="report title (default: Report: <name>)")
    return parser


def canonical_command(args, work_dirs: list[Path], benches: list[Path]) -> str:
    """The command that regenerates this very report from the files it read."""
    parts = ["python", "-m", "hybrid_vlm.report", *[display_path(p) for p in work_dirs]]
    if benches:
        parts += ["--bench", *[display_path(p.parent if p.name == "bench.json" else p) for p in benches]]
    parts += ["--name", args.name]
    if args.out != DEFAULT_OUT:
        parts += ["--out", args.out]
    if args.models:
        parts += ["--models", *args.models]
    if args.vanilla:
        parts += ["--vanilla", args.vanilla]
    if args.recipe:
        parts += ["--recipe", display_path(Path(args.recipe))]
    if args.title:
        parts += ["--title", args.title]
    return shlex.join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
            parser.error(f"--bench {text}: no bench.json there (python -m hybrid_vlm.bench ... --out DIR writes one)")
        benches.append(path)
    args.name = args.name or (work_dirs[0] if work_dirs else benches[0].parent).resolve().name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        parser.error(f"--name {args.name!r}: use letters, digits, '.', '_' and '-'")
    report_dir = Path(args.out) / args.name
    recipe = None
    if args.recipe:
        try:
            recipe = Path(args.recipe).read_text(encoding="utf-8")
        except OSError as error:
            parser.error(f"--recipe: {error}")

    def select(configs):
        if not args.models:
            return configs
        chosen = [c for c in configs if any(fnmatch.fnmatchcase(c.name, p) for p in args.models)]
        references = [c for c in configs if c not in chosen and (c.name == args.vanilla or (not args.vanilla and is_vanilla(c)))]
        return references + chosen

    configs = [c for w in work_dirs for c in select(discover(w))]
    if args.snapshot:
        try:
            work_dirs, benches = snapshot(work_dirs, configs, benches, report_dir / "raw")
        except ValueError as error:
            parser.error(str(error))
        configs = [c for w in work_dirs for c in select(discover(w))]
    if not configs and not benches:
        print(f"hybrid_vlm.report: error: no results in {', '.join(args.work_dirs)} (expected <work_dir>/<model>/<model>_<dataset>_*)", file=sys.stderr)
        return 2
    bench_data = []
    for path in benches:
        try:
            bench_data.append(read_bench(path))
        except ValueError as error:
            print(f"hybrid_vlm.report: error: {error}", file=sys.stderr)
            return 2
    if args.vanilla and not any(c.name == args.vanilla for c in configs):
        print(f"hybrid_vlm.report: error: --vanilla {args.vanilla}: no such model folder", file=sys.stderr)
        return 2

    assign_references(configs, args.vanilla)
    configs = order_configs(configs)
    label_configs(configs, {w: display_path(w) for w in work_dirs})
    write_report(args, report_dir, configs, bench_data, work_dirs, benches, recipe)
    print(f"hybrid_vlm.report: wrote {report_dir / 'report.md'}")
    return 0


def write_report(args, report_dir: Path, configs: list[Config], benches: list[Bench], work_dirs, bench_paths, recipe) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = report_dir / "figures"
    if figures.exists():
        shutil.rmtree(figures)
    linker = Linker(report_dir)
    datasets: list[str] = []
    for config in configs:
        datasets += [d for d in config.entries if d not in datasets]
    eval_tiny = any(c.tiny for c in configs)
    bench_tiny = any(b.meta.get("preset") == "tiny" for b in benches)
    tiny = eval_tiny or bench_tiny
    title = args.title or f"Report: {args.name}"
    out: list[str] = [f"# {title}", ""]

    # --- banner: which model these numbers are about
    if tiny:
        what = {
            (True, True): "Every evaluation run and the speed benchmark use",
            (True, False): "The evaluation runs use",
            (False, True): "The speed benchmark uses",
        }[(eval_tiny, bench_tiny)]
        out += [TINY_BANNER.format(what=what), ""]
    notes = []
    if configs and not eval_tiny:
        checkpoints = sorted({c.checkpoint for c in configs if c.checkpoint})
        family = "LLaVA-1.5-7B" if all(c.name.startswith("llava_v1.5_7b") for c in configs) else "see the configuration names"
        notes.append(
            f"Evaluation model: {family}; checkpoint: "
            + (", ".join(f"`{p}`" for p in checkpoints) if checkpoints else "not recorded (no run_info.json)")
            + "."
        )
    for bench in benches:
        meta = bench.meta
        if meta.get("preset") and meta["preset"] != "tiny":
            notes.append(
                f"Speed benchmark `{linker.rel(bench.path)}`: preset `{meta['preset']}` has **random weights** with that preset's "
                "shapes: its timings and MACs are meaningful, it has no accuracy."
            )
        elif meta.get("model"):
            notes.append(f"Speed benchmark `{linker.rel(bench.path)}`: checkpoint `{meta['model']}`.")
    if notes:
        out += ["> [!NOTE]"] + [f"> {n}" for n in notes] + [""]

    # --- how to regenerate
    out += ["## Regenerate", ""]
    if recipe is not None:
        out += [f"The raw outputs were made with `{display_path(Path(args.recipe))}`:", "", "```bash", recipe.rstrip("\n"), "```", ""]
    recorded = []
    for config in configs:
        for command, source in run_commands(config) or ([(status_argv(config), "status.json argv")] if status_argv(config) else []):
            if command and (command, source) not in recorded:
                recorded.append((command, source))
    for bench in benches:
        command = bench_command(bench.meta)
        if command and (command, "bench.json") not in recorded:
            recorded.append((command, "bench.json"))
    if recorded:
        out += ["Commands recorded with the raw outputs (per configuration below):", "", "```bash"]
        out += [f"{command}    # {source}" for command, source in recorded]
        out += ["```", ""]
    out += ["This report, from the raw files it read:", "", "```bash", canonical_command(args, work_dirs, bench_paths), "```", ""]

    # --- metrics per dataset
    summary = {"name": args.name, "tiny": tiny, "command": canonical_command(args, work_dirs, bench_paths), "datasets": {}, "bench": []}
    if configs:
        out += ["## Accuracy and caption metrics", ""]
        out += [
            "Per configuration (one VLMEvalKit model folder) and dataset: the metric from VLMEvalKit's evaluation file, its "
            "difference from the vanilla configuration (Δ), mean tokens entering the LLM per row (text + visual) and "
            "mean tokens kept after pruning, the median prefill time per row (vision tower + LLM prefill, from the "
            "plugin's stats sidecar), and ratios to vanilla. `raw files` links each row's sources.",
            "",
        ]
    for dataset in datasets:
        entries = [c.entries[dataset] for c in configs if dataset in c.entries]
        kinds = sorted({e.kind for e in entries if e.kind != "none"})
        kind = kinds[0] if len(kinds) == 1 else "other"
        table, keys = dataset_table(dataset, entries, linker)
        label = {"mcq": "multiple choice", "caption": "captions"}.get(kind, "")
        out += [f"### {dataset}" + (f" ({label})" if label else ""), ""]
        splits = sorted({e.split for e in entries if e.split})
        unit = metric_unit(kind) + (f"; split {', '.join(splits)}" if splits else "")
        out += [f"Metric: {', '.join(keys) or 'none (no metric file: run with --mode all or eval)'} — {unit}.", "", table, ""]
        batched = sorted({b for e in entries for b in e.batch_sizes if b > 1})
        if batched:
            out += [f"Rows were generated in batches ({', '.join(map(str, batched))}): prefill times are per batch.", ""]
        missing = [e.config.label for e in entries if e.reference is None]
        if missing and any(not e.config.vanilla for e in entries):
            out += [f"No vanilla reference for: {', '.join(f'`{m}`' for m in missing)} (Δ and ratios shown as –).", ""]
        figure = figures / (re.sub(r"[^A-Za-z0-9._-]+", "_", dataset) + ".png")
        if plot_dataset(dataset, entries, figure, tiny=eval_tiny):
            out += [f"![{dataset}: {entries[0].main_metric if entries else ''} vs tokens kept and prefill time]({linker.rel(figure)})", ""]
        details = details_table(entries)
        if details:
            out += ["<details><summary>All metrics (Δ vs vanilla in parentheses)</summary>", "", details, "", "</details>", ""]
        summary["datasets"][dataset] = [entry_json(e, linker) for e in entries]

    # --- speed and FLOPs
    out += ["## Speed and FLOPs (`python -m hybrid_vlm.bench`)", ""]
    if not benches:
        out += ["No bench results given (`--bench DIR`): make them with `python -m hybrid_vlm.bench --out DIR`.", ""]
    for bench in benches:
        meta = bench.meta
        out += [f"From {linker.link(display_path(bench.path), bench.path)}" + (f" ({linker.link('csv', bench.csv_path)})" if bench.csv_path else "") + ":", ""]
        out += [bench_setup(meta) + ".", ""]
        command = bench_command(meta)
        out += ["```bash", command or "# bench command not recorded", "```", ""]
        out += [bench_table(bench), ""]
        out += [
            f"Ratios divide by the `{meta.get('baseline', 'vanilla')}` row (the hybrid engine with no reduction), measured in one "
            "process; `theory` is the same ratio of theoretical MACs (`hybrid_vlm/flops.py`: "
            f"{meta.get('conventions', 'see hybrid_vlm.flops')}); `ratio − theory` > 0 means less speed-up than the MACs promise. "
            "Peak memory: activations + KV cache above the weights (CUDA), or the sampled RSS increase (CPU: approximate).",
            "",
        ]
        summary["bench"].append({"source": linker.rel(bench.path), "meta": meta, "rows": [{k: v for k, v in r.items() if k not in ("runs", "per_sample_counts")} for r in bench.rows]})

    # --- provenance
    out += ["## Provenance", ""]
    out += [
        "Every number above is read by the command under *Regenerate* from the files linked in its row. "
        "What each configuration's files record about how they were made:",
        "",
    ]
    for config in configs:
        out += [provenance_block(config, linker), ""]
    for bench in benches:
        out += [f"#### bench {display_path(bench.path)}", "", f"- command: `{bench_command(bench.meta) or 'not recorded'}`", f"- {bench_setup(bench.meta)}", ""]
    from . import __version__

    out += [f"Written by `hybrid_vlm.report` (hybrid_vlm {__version__}); machine-readable: [report.json](report.json).", ""]

    (report_dir / "report.md").write_text("\n".join(out), encoding="utf-8")
    summary["configurations"] = [
        {
            "label": c.label, "name": c.name, "work_dir": linker.rel(c.work_dir), "vanilla": c.vanilla,
            "reference": c.reference.label if c.reference else None, "tiny": c.tiny,
            "run_info": c.run_info[-1] if c.run_info else None, "commands": [cmd for cmd, _ in run_commands(c)],
            "status_argv": status_argv(c),
        }
        for c in configs
    ]  # fmt: skip
    with open(report_dir / "report.json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, default=str)
        handle.write("\n")


def entry_json(entry: Entry, linker: Linker) -> dict:
    ref = entry.reference if entry.reference is not entry else None
    return {
        "configuration": entry.config.label,
        "model": entry.config.name,
        "vanilla": entry.config.vanilla,
        "reference": ref.config.label if ref else None,
        "kind": entry.kind,
        "main_metric": entry.main_metric,
        "split": entry.split,
        "metrics": entry.metrics,
        "delta": {k: delta(entry, k) for k in entry.metrics} if ref else {},
        "rows": entry.rows,
        "stats_rows": entry.stats_rows,
        "tokens_in_mean": entry.tokens_in,
        "tokens_kept_mean": entry.tokens_kept,
        "prefill_ms_median": entry.prefill_ms,
        "prefill_ms_mean": entry.prefill_ms_mean,
        "new_tokens_mean": entry.new_tokens,
        "tokens_kept_ratio": ratio(entry.tokens_kept, ref.tokens_kept) if ref else None,
        "prefill_ratio": ratio(entry.prefill_ms, ref.prefill_ms) if ref else None,
        "batch_sizes": entry.batch_sizes,
        "settings": entry.settings,
        "sources": {
            "metrics": [linker.rel(p) for p in entry.metric_files],
            "stats": linker.rel(entry.stats_file) if entry.stats_file else None,
            "predictions": linker.rel(entry.prediction_file) if entry.prediction_file else None,
        },
    }


# ------------------------------------------------------------------- text table (for sweep)


def collect(work_dir: str | Path, folders: list[str]) -> list[Config]:
    """The configurations of `folders` in `work_dir` (plus any vanilla folder there), referenced and ordered."""
    work_dir = Path(work_dir)
    configs = [c for c in discover(work_dir) if c.name in folders or is_vanilla(c)] if work_dir.is_dir() else []
    assign_references(configs)
    return order_configs(configs)


def text_table(configs: list[Config], labels: dict[str, str] | None = None) -> str:
    """A plain-text table (terminal): setting, dataset, main metric, Δ vs vanilla, tokens, prefill."""
    labels = labels or {}
    header = ("setting", "model folder", "dataset", "metric", "Δ vs vanilla", "tokens in", "tokens kept", "prefill ms (median)")
    lines = []
    for config in configs:
        for dataset, entry in config.entries.items():
            main = entry.main_metric
            metric = f"{main} {fmt(entry.main_value)}" if main else "-"
            change = "ref" if config.vanilla else fmt(delta(entry, main), "+.1f") if main else "-"
            lines.append((
                labels.get(config.name, config.tag), config.name, dataset, metric, change,
                fmt(entry.tokens_in), fmt(entry.tokens_kept), fmt(entry.prefill_ms, ".2f"),
            ))  # fmt: skip
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    rendered = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *lines]]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(rendered)


if __name__ == "__main__":
    sys.exit(main())
