"""The Markdown and JSON of a report, one function per section: banner, regenerate, metrics, speed, provenance."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hybrid_vlm import __version__
from vlmeval_plugin.results import rows_text

from ..configs import Configuration, Entry, comparison_reference, delta, prefill_ratio, ratio
from .bench import IDEAL_THEORY_FOOTNOTE, RESOURCES_NOTE, bench_baseline, bench_command, bench_setup, bench_table, prefill_theory_text, resources_table
from .device_checks import device_check_lines
from .floors import floor_lines
from .markdown import Linker, display_path, fmt, md_table
from .parity import parity_lines
from .plots import plot_dataset
from .provenance import provenance_block, run_commands, status_argv
from .targets import TARGETS_NOTE, targets_table

CAPTION_KEYS = ("CIDEr", "BLEU-4", "ROUGE_L", "BLEU-1", "METEOR", "PTB CIDEr", "PTB BLEU-4", "PTB METEOR", "PTB SPICE")
TINY_BANNER = (
    "> [!WARNING]\n"
    "> **Tiny random-weight model, not LLaVA-1.5-7B or LLaVA-NeXT-7B.** {what} a bundled tiny LLaVA "
    "(`hybrid_vlm/tiny.py`: LLaVA-1.5's 336 px / 576-token geometry, or LLaVA-NeXT's anyres on small grids; "
    "toy widths, a 4-layer LLM, **random weights**). Its accuracies and caption scores are noise and say "
    "nothing about the real models; its timings are those of a toy model on this machine. This report shows "
    "what the pipeline produces, end to end."
)
METRICS_INTRO = (
    "Per configuration (one VLMEvalKit model folder) and dataset: the metric from VLMEvalKit's evaluation file, its "
    "difference from the vanilla configuration (Δ), mean tokens entering the LLM per row (text + visual) and "
    "mean tokens kept after pruning, the median prefill time per row (vision tower + LLM prefill, from the "
    "plugin's stats sidecar), and ratios to vanilla. `raw files` links each row's sources."
)
BASELINE_MEANINGS = {"vanilla": "the hybrid engine with no reduction", "stock": "unpatched transformers, SDPA"}
SPEED_NOTE = (
    "{ratios}; `theory` is the same ratio of theoretical MACs (`hybrid_vlm/flops.py`: {conventions}); "
    "`ratio − theory` > 0 means less speed-up than the MACs promise. Peak memory: activations + KV cache "
    "above the weights (CUDA), or the sampled RSS increase (CPU: approximate)."
)


def speed_note(meta: dict, rows: list[dict]) -> str:
    """What a bench's ratios divide by (`bench_baseline`; said to be unrecorded, not guessed) and how
    its theory and memory columns read."""
    baseline = bench_baseline(meta, rows)
    ratios = (f"Ratios divide by the `{baseline}` row ({BASELINE_MEANINGS.get(baseline, 'a configuration of this bench')}), measured in one process"
              if baseline else "What the ratios divide by is not recorded in this bench")
    return SPEED_NOTE.format(ratios=ratios, conventions=meta.get("conventions", "see hybrid_vlm.flops"))


@dataclass
class ReportInput:
    """Everything one report is made of."""

    name: str
    title: str
    command: str  # the command that regenerates this report
    configs: list  # [Configuration], referenced, ordered and labelled
    benches: list  # [Bench]
    linker: Linker
    figures: Path
    recipe_path: str | None = None
    recipe: str | None = None
    targets: bool = False  # check the benches against hybrid_tools.report.targets
    parity: tuple[dict, str] | None = None  # (a hybrid_tools.parity file's data, its path from the report)
    checks: tuple | None = None  # (steps, test results, their sources): a device run's own checks
    floors: dict | None = None  # {dataset: [Floor]}: what needs no image (`hybrid_tools.report.floors`)

    @property
    def eval_tiny(self) -> bool:
        return any(c.tiny for c in self.configs)

    @property
    def bench_tiny(self) -> bool:
        return any(b.meta.get("preset") == "tiny" for b in self.benches)

    @property
    def datasets(self) -> list[str]:
        names: list[str] = []
        for config in self.configs:
            names += [d for d in config.entries if d not in names]
        return names


def render(report: ReportInput) -> tuple[str, dict]:
    """(report.md, report.json's content)."""
    datasets_md, datasets_json = metrics_section(report)
    speed_md, bench_json = speed_section(report)
    lines = [
        f"# {report.title}", "",
        *banner_section(report), *regenerate_section(report), *datasets_md, *speed_md, *provenance_section(report),
    ]
    summary = {
        "name": report.name, "tiny": report.eval_tiny or report.bench_tiny, "command": report.command,
        "datasets": datasets_json, "bench": bench_json, "configurations": [configuration_json(c, report.linker) for c in report.configs],
    }
    return "\n".join(lines), summary


FAMILY_LABELS = {
    "llava_v1.5_7b": "LLaVA-1.5-7B",
    "llava_next_vicuna_7b": "LLaVA-NeXT-Vicuna-7B",
    "llava_next_mistral_7b": "LLaVA-NeXT-Mistral-7B",
}


def banner_section(report: ReportInput) -> list[str]:
    """Which model the numbers are about: the tiny-model warning, or the checkpoint and bench notes."""
    lines = []
    if report.eval_tiny or report.bench_tiny:
        what = {
            (True, True): "Every evaluation run and the speed benchmark use",
            (True, False): "The evaluation runs use",
            (False, True): "The speed benchmark uses",
        }[(report.eval_tiny, report.bench_tiny)]
        lines += [TINY_BANNER.format(what=what), ""]
    notes = []
    if report.configs and not report.eval_tiny:
        checkpoints = sorted({c.checkpoint for c in report.configs if c.checkpoint})
        families = {next((label for prefix, label in FAMILY_LABELS.items() if c.name.startswith(prefix)), None) for c in report.configs}
        family = families.pop() if len(families) == 1 and None not in families else "see the configuration names"
        recorded = ", ".join(f"`{p}`" for p in checkpoints) if checkpoints else "not recorded (no run_info.json)"
        notes.append(f"Evaluation model: {family}; checkpoint: {recorded}.")
    for bench in report.benches:
        meta, source = bench.meta, report.linker.rel(bench.path)
        if meta.get("preset") and meta["preset"] != "tiny":
            notes.append(
                f"Speed benchmark `{source}`: preset `{meta['preset']}` has **random weights** with that preset's "
                "shapes: its timings and MACs are meaningful, it has no accuracy."
            )
        elif meta.get("model"):
            notes.append(f"Speed benchmark `{source}`: checkpoint `{meta['model']}`.")
    if notes:
        lines += ["> [!NOTE]", *[f"> {note}" for note in notes], ""]
    return lines


def recorded_commands(report: ReportInput) -> list[tuple[str, str]]:
    """(command, where it was recorded) that made the raw outputs, without repeats."""
    recorded = []
    for config in report.configs:
        argv = status_argv(config)
        for command, source in run_commands(config) or ([(argv, "status.json argv")] if argv else []):
            if command and (command, source) not in recorded:
                recorded.append((command, source))
    for bench in report.benches:
        command = bench_command(bench.meta)
        if command and (command, "bench.json") not in recorded:
            recorded.append((command, "bench.json"))
    return recorded


def regenerate_section(report: ReportInput) -> list[str]:
    lines = ["## Regenerate", ""]
    if report.recipe is not None:
        lines += [f"The raw outputs were made with `{report.recipe_path}`:", "", "```bash", report.recipe.rstrip("\n"), "```", ""]
    recorded = recorded_commands(report)
    if recorded:
        lines += ["Commands recorded with the raw outputs (per configuration below):", "", "```bash"]
        lines += [f"{command}    # {source}" for command, source in recorded] + ["```", ""]
    return lines + ["This report, from the raw files it read:", "", "```bash", report.command, "```", ""]


def metrics_section(report: ReportInput) -> tuple[list[str], dict]:
    """One table (plus figure and details) per dataset; and report.json's "datasets"."""
    lines = ["## Accuracy and caption metrics", "", METRICS_INTRO, ""] if report.configs else []
    summary = {}
    for dataset in report.datasets:
        entries = [c.entries[dataset] for c in report.configs if dataset in c.entries]
        lines += dataset_section(report, dataset, entries)
        summary[dataset] = [entry_json(e, report.linker) for e in entries]
    return lines, summary


def sizes_text(entry: Entry) -> str:
    return "batch " + ("/".join(map(str, entry.batch_sizes)) or "unknown")


def dataset_section(report: ReportInput, dataset: str, entries: list[Entry]) -> list[str]:
    kinds = sorted({e.kind for e in entries if e.kind != "none"})
    kind = kinds[0] if len(kinds) == 1 else "other"
    table, keys = dataset_table(dataset, entries, report.linker)
    label = {"mcq": "multiple choice", "caption": "captions"}.get(kind, "")
    splits = sorted({e.split for e in entries if e.split})
    unit = metric_unit(kind) + (f"; split {', '.join(splits)}" if splits else "")
    lines = [f"### {dataset}" + (f" ({label})" if label else ""), ""]
    lines += [f"Metric: {', '.join(keys) or 'none (no metric file: run with --mode all or eval)'} — {unit}.", "", table, ""]
    lines += floor_lines((report.floors or {}).get(dataset, []), entries, report.linker)
    lines += caption_notes(entries) if kind == "caption" else entry_notes(entries)
    batched = sorted({b for e in entries for b in e.batch_sizes if b > 1})
    if batched:
        lines += [f"Rows were generated in batches ({', '.join(map(str, batched))}): prefill times are per batch.", ""]
    other_size = [f"`{e.config.label}` ({sizes_text(e)} vs {sizes_text(e.reference)})" for e in entries
                  if comparison_reference(e) is not None and not e.unpaired and prefill_ratio(e, e.reference) is None
                  and e.prefill_ms_median is not None]
    mixed = [f"`{e.config.label}` ({sizes_text(e)})" for e in entries if len(e.batch_sizes) > 1]
    if mixed:
        lines += [f"Rows generated at several batch sizes (a folder resumed at another --batch-size), whose prefill times "
                  f"are not comparable, so no median is given: {', '.join(mixed)}.", ""]
    if other_size:
        lines += [f"Prefill not compared with vanilla at another batch size (ratio shown as –): {', '.join(other_size)}.", ""]
    missing = [e.config.label for e in entries if e.reference is None and not e.unpaired]
    if missing and any(not e.config.vanilla for e in entries):
        lines += [f"No vanilla reference for: {', '.join(f'`{m}`' for m in missing)} (Δ and ratios shown as –).", ""]
    unpaired = [f"`{e.config.label}` ({e.unpaired})" for e in entries if e.unpaired]
    if unpaired:
        lines += [f"Not compared with vanilla, whose rows, checkpoint or device differ (Δ and ratios shown as –): {', '.join(unpaired)}.", ""]
    failed = [f"`{e.config.label}` row {index} ({reason})" for e in entries for index, reason in e.failed_rows]
    if failed:
        scored = ("scored by VLMEvalKit on their failure text as the caption (a miss for CIDEr; BLEU, ROUGE-L and METEOR can "
                  "credit its common words)" if kind == "caption" else "scored as wrong")
        lines += [f"Failed rows, {scored}, and left out of the token and time means: {'; '.join(failed)}.", ""]
    figure = report.figures / (re.sub(r"[^A-Za-z0-9._-]+", "_", dataset) + ".png")
    main = main_metric_of(entries)
    if plot_dataset(dataset, entries, main, figure, tiny=report.eval_tiny):
        lines += [f"![{dataset}: {main} vs tokens kept and prefill time]({report.linker.rel(figure)})", ""]
    details = details_table(entries)
    if details:
        lines += ["<details><summary>All metrics (Δ vs vanilla in parentheses)</summary>", "", details, "", "</details>", ""]
    return lines


def speed_section(report: ReportInput) -> tuple[list[str], list]:
    """The bench tables; and report.json's "bench"."""
    lines = ["## Speed and FLOPs (`python -m hybrid_tools.bench`)", ""]
    if not report.benches:
        lines += ["No bench results given (`--bench DIR`): make them with `python -m hybrid_tools.bench --out DIR`.", ""]
    summary = []
    for bench in report.benches:
        meta, linker = bench.meta, report.linker
        csv_link = f" ({linker.link('csv', bench.csv_path)})" if bench.csv_path else ""
        lines += [f"From {linker.link(display_path(bench.path), bench.path)}{csv_link}:", "", bench_setup(meta) + ".", ""]
        lines += ["```bash", bench_command(meta) or "# bench command not recorded", "```", "", bench_table(bench), ""]
        resources = resources_table(bench)
        if resources:
            lines += ["Memory, KV cache, throughput, host syncs and the SDPA backend each layer ran:", "", resources, "", RESOURCES_NOTE, ""]
        lines += [speed_note(meta, bench.rows), ""]
        if any(prefill_theory_text(row).endswith("*") for row in bench.rows if row.get("status") == "ok"):
            lines += [IDEAL_THEORY_FOOTNOTE, ""]
        rows = [{k: v for k, v in row.items() if k not in ("runs", "per_sample_counts")} for row in bench.rows]
        summary.append({"source": linker.rel(bench.path), "meta": meta, "rows": rows})
    if report.targets and report.benches:
        lines += ["### Targets", "", TARGETS_NOTE, "", targets_table(report.benches), ""]
    if report.parity:
        lines += parity_lines(*report.parity)
    if report.checks:
        lines += device_check_lines(*report.checks)
    return lines, summary


def provenance_section(report: ReportInput) -> list[str]:
    lines = ["## Provenance", ""]
    lines += [
        "Every number above is read by the command under *Regenerate* from the files linked in its row. "
        "What each configuration's files record about how they were made:",
        "",
    ]
    for config in report.configs:
        lines += [provenance_block(config, report.linker), ""]
    for bench in report.benches:
        command = bench_command(bench.meta) or "not recorded"
        lines += [f"#### bench {display_path(bench.path)}", "", f"- command: `{command}`", f"- {bench_setup(bench.meta)}", ""]
    return lines + [f"Written by `hybrid_tools.report` (hybrid_vlm {__version__}); machine-readable: [report.json](report.json).", ""]


# ------------------------------------------------------------------------------------- tables


def metric_unit(kind: str) -> str:
    return {"mcq": "accuracy, % (Δ in percentage points)", "caption": "VLMEvalKit's COCO scorer, ×100"}.get(kind, "as in the metric file")


def caption_notes(entries: list[Entry]) -> list[str]:
    """Which caption metrics are VLMEvalKit's and which were not computed (from the score files).
    Score files written before the plugin added METEOR have neither: nothing to say then."""
    notes = sorted({note for entry in entries for note in entry.notes})
    if not notes and not any("METEOR" in entry.metrics for entry in entries):
        return []
    lines = ["BLEU, ROUGE_L and CIDEr are VLMEvalKit's (untokenized captions, comparable with its leaderboards); "
             "METEOR is METEOR 1.5 on the same captions; PTB columns are COCO-standard, after PTB tokenization.", ""]
    for note in notes:
        lines += [f"- {note}"]
    return lines + ([""] if notes else [])


def entry_notes(entries: list[Entry]) -> list[str]:
    """What the reader noted of each configuration's files (a metric file it could not read, stats
    rows it left out of the means), named by configuration."""
    notes = [f"- `{entry.config.label}`: {note}" for entry in entries for note in entry.notes]
    return notes + [""] if notes else []


def sources_cell(entry: Entry, linker: Linker) -> str:
    parts = [linker.link("metric", path) for path in entry.metric_files]
    if entry.stats_file:
        parts.append(linker.link("stats", entry.stats_file))
    if entry.prediction_file:
        parts.append(linker.link("pred", entry.prediction_file))
    return " · ".join(parts) or "–"


def main_metric_of(entries: list[Entry]) -> str | None:
    """The one metric a dataset's table and plot show: the first entry's main metric that has one."""
    return next((e.main_metric for e in entries if e.main_metric), None)


def dataset_table(dataset: str, entries: list[Entry], linker: Linker) -> tuple[str, list[str]]:
    """(markdown, metric keys shown) for one dataset."""
    kinds = {e.kind for e in entries if e.kind != "none"}
    kind = kinds.pop() if len(kinds) == 1 else ("other" if kinds else "none")
    if kind == "caption":
        keys = [k for k in CAPTION_KEYS if any(k in e.metrics for e in entries)]
    else:
        keys = [main_metric_of(entries)] if main_metric_of(entries) else []
    header = ["configuration"]
    for key in keys:
        header += [key, "Δ"]
    header += ["tokens in", "tokens kept", "kept vs vanilla", "prefill ms (median)", "prefill vs vanilla", "rows", "raw files"]
    rows = []
    for entry in entries:
        config = entry.config
        ref = comparison_reference(entry)
        row = [f"`{config.label}`" + (" (vanilla)" if config.vanilla else "")]
        for key in keys:
            row += [fmt(entry.metrics.get(key)), "ref" if config.vanilla and key in entry.metrics else fmt(delta(entry, key), "+.1f")]
        row += [
            fmt(entry.tokens_in_mean),
            fmt(entry.tokens_kept_mean),
            fmt(ratio(entry.tokens_kept_mean, ref.tokens_kept_mean if ref else None), ".3f", "×") if not config.vanilla
            else ("1×" if entry.tokens_kept_mean is not None else "–"),
            fmt(entry.prefill_ms_median, ".2f"),
            fmt(prefill_ratio(entry, ref), ".3f", "×") if not config.vanilla else ("1×" if entry.prefill_ms_median is not None else "–"),
            rows_text(entry),
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


# --------------------------------------------------------------------------------------- JSON


def entry_json(entry: Entry, linker: Linker) -> dict:
    ref = comparison_reference(entry)
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
        "failed_rows": [{"index": index, "reason": reason} for index, reason in entry.failed_rows],
        "unpaired": entry.unpaired or None,
        "tokens_in_mean": entry.tokens_in_mean,
        "tokens_kept_mean": entry.tokens_kept_mean,
        "prefill_ms_median": entry.prefill_ms_median,
        "new_tokens_mean": entry.new_tokens_mean,
        "tokens_kept_ratio": ratio(entry.tokens_kept_mean, ref.tokens_kept_mean) if ref else None,
        "prefill_ratio": prefill_ratio(entry, ref),
        "batch_sizes": entry.batch_sizes,
        "settings": entry.settings,
        "sources": {
            "metrics": [linker.rel(p) for p in entry.metric_files],
            "stats": linker.rel(entry.stats_file) if entry.stats_file else None,
            "predictions": linker.rel(entry.prediction_file) if entry.prediction_file else None,
        },
    }


def configuration_json(config: Configuration, linker: Linker) -> dict:
    return {
        "label": config.label, "name": config.name, "work_dir": linker.rel(config.work_dir), "vanilla": config.vanilla,
        "reference": config.reference.label if config.reference else None, "tiny": config.tiny,
        "run_info": config.run_info[-1] if config.run_info else None, "commands": [cmd for cmd, _ in run_commands(config)],
        "status_argv": status_argv(config),
    }
