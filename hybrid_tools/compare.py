"""python -m hybrid_tools.compare WORK_DIR --bench BENCH_DIR --out reports/method-comparison [--recipe COMMAND]

The method comparison: every method at each budget, with bootstrap 95% intervals over questions
(MCQ) or images (captions) and paired intervals against FastV and against random selection at the
same budget.

Two steps, the second a pure function of the first's files, so a test can regenerate the table:
1. `collect`: from a VLMEvalKit work dir (made by `hybrid_tools.sweep`), per-question hits of each
   run's MCQ predictions into OUT/raw/hits.csv, per-image CIDEr of its caption predictions into
   OUT/raw/captions.csv, and per-run token counts into OUT/raw/runs.csv; the bench's bench.json is
   copied to OUT/raw/bench.json.
2. `render`: OUT/report.md, OUT/table.md (the main table), OUT/speed.md, OUT/figures/*.png, from OUT/raw only.
   `python -m hybrid_tools.compare --render --out OUT` reruns this step alone.

Hits: a circular MMBench question counts as answered when every rotation of it is (VLMEvalKit's
rule); a rotation is right when the prediction, stripped, starts with the answer's letter (as a
word) or equals the answer's option text. CIDEr: pycocoevalcap's Cider (VLMEvalKit's scorer) over
the whole run, x 100; its per-image scores, whose mean is the run's CIDEr, are what the bootstrap
resamples (document frequencies stay those of the whole set). A run whose score from these items
differs from VLMEvalKit's own `Overall` or `CIDEr` is flagged in the table. Intervals: percentile
bootstrap, 2000 draws of the items with replacement, NumPy seed 0; a paired interval resamples the
same items for both runs. A method is called better or worse only where its paired interval
excludes 0.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from hybrid_vlm.methods import methods_at_a_layer
from vlmeval_plugin import settings
from vlmeval_plugin.results import load_table, prediction_file, read_sweep_runs, read_work_dir

from .report.bench import bench_baseline
from .report.markdown import display_path, fmt

DRAWS = 2000
SEED = 0
CIRCULAR_STRIDE = 1_000_000  # VLMEvalKit's circular copies: index + k * 1e6
RUN_COLUMNS = ("run", "method", "budget", "positions", "seed", "dataset", "metric", "status", "items", "vlmeval_score",
               "visual_in", "visual_kept", "visual_layer_mean", "prefill_gmacs", "setting", "failed_rows")
METRICS = {"mcq": "circular accuracy %", "caption": "CIDEr"}


# ----------------------------------------------------------------------------------- collect


def run_identity(folder: str) -> dict:
    """method, budget, positions and seed of a model folder, from its registered name and tag."""
    model, tag = folder.split(settings.NAME_SEPARATOR, 1) if settings.NAME_SEPARATOR in folder else (folder, "")
    variant = settings.VARIANTS.get(model)
    if variant is None or not variant.patched:
        method = "vanilla"
    elif variant.fixed_setting or (variant.dymu and variant.fastv):
        method = "hybrid"
    else:
        method = variant.method or ("dymu" if variant.dymu else "pool" if variant.pool else "fastv")
        if method == "fastv" and tag.startswith("random-"):  # a FastV name run with FASTV_SELECT=random
            method = "random"
    seed = re.search(r"-s(\d+)(?:_|$)", tag)
    return dict(method=method, budget=tag_budget(tag, method),
                positions="renumbered" if "renumbered" in tag else "logical",
                seed=int(seed.group(1)) if seed else 0 if method == "random" else None)


def tag_budget(tag: str, method: str) -> int | float | None:
    """The visual tokens a run keeps per image, from its tag: a count (`-k64`, `-b64`), or a fraction
    of each image's tokens (`-b0.098` kept; FastV's and random's `-r0.902` pruned, so 0.098 kept),
    as the NeXT and Qwen2.5-VL names take them. A hybrid's fraction is of DyMU's merged count, which
    varies: no budget; so is a per-crop budget (`-per-crop`), which counts tokens in each LLaVA-NeXT
    crop and so matches no per-image budget."""
    if "-per-crop" in tag:
        return None
    count = re.search(r"-[bk](\d+)(?:-|_|$)", tag)
    if count:
        return int(count.group(1))
    kept = re.search(r"-b(0\.\d+)(?:-|_|$)", tag)
    pruned = re.search(r"-r(0\.\d+)(?:-|_|$)", tag)  # -r0 prunes nothing: no budget
    if method == "hybrid" or not (kept or pruned):
        return None
    return float(kept.group(1)) if kept else round(1 - float(pruned.group(1)), 6)


def rotation_correct(row: pd.Series) -> bool:
    prediction, answer = str(row["prediction"]).strip(), str(row["answer"]).strip()
    if re.match(rf"\(?{re.escape(answer)}(?:[\W_]|$)", prediction):
        return True
    option = row.get(answer)
    return isinstance(option, str) and prediction.lower() == option.strip().lower()


def question_hits(predictions: pd.DataFrame) -> pd.Series:
    """Per base question, 1 when every circular rotation is answered right, else 0."""
    correct = predictions.apply(rotation_correct, axis=1)
    base = predictions["index"].astype(int) % CIRCULAR_STRIDE
    return correct.groupby(base).all().astype(int)


def image_ciders(predictions: pd.DataFrame, failed: set[int] = frozenset()) -> pd.Series:
    """Per image (the `index` column), its CIDEr x 100 within the whole run's Cider; a failed row
    (`failed`: its index) 0, as an empty caption scores, not its failure text (CIDEr's document
    frequencies come from the references alone, so the other images' scores do not move)."""
    from hybrid_tools.caption_baseline import cider_per_image

    references = [list(ast.literal_eval(str(text))) for text in predictions["answer"]]
    scores = pd.Series(cider_per_image([str(text) for text in predictions["prediction"]], references),
                       index=predictions["index"].astype(int).to_numpy())
    return scores.where(~scores.index.isin(list(failed)), 0.0)


def collect(work_dir: Path, bench_dir: Path | None, out: Path, recipe: str | None = None) -> None:
    """Writes OUT/raw/ afresh from WORK_DIR's runs (and --bench's bench.json), with the command that
    did and the script that made the runs (`recipe`), when given."""
    runs, hits, captions = [], [], []
    folders = {folder.name: folder for folder in read_work_dir(work_dir)}
    planned = {run.get("folder"): run for _, run in read_sweep_runs(work_dir)}
    for name in sorted(set(folders) | set(planned)):
        identity = run_identity(name)
        results = folders[name].results if name in folders else {}
        scored = [(dataset, result) for dataset, result in results.items() if result.kind in METRICS]
        if not scored:
            what = "no MCQ or caption result" if results else "did not run"
            runs.append(dict(run=name, **identity, dataset="", status=f"{what} (exit status {planned.get(name, {}).get('returncode')})"))
        for dataset, result in scored:
            path = prediction_file(work_dir / name, name, dataset)
            run, items = scored_run(name, dataset, result, path)
            runs.append(dict(run=name, **identity, **run))
            if result.kind == "mcq" and items is not None:
                hits += [dict(run=name, dataset=dataset, question=int(q), hit=int(h)) for q, h in items.items()]
            elif items is not None:
                captions += [dict(run=name, dataset=dataset, image=int(i), cider=float(c)) for i, c in items.items()]
    runs += unscored_sets(runs, planned)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(runs, columns=list(RUN_COLUMNS)).to_csv(raw / "runs.csv", index=False)
    pd.DataFrame(hits, columns=["run", "dataset", "question", "hit"]).to_csv(raw / "hits.csv", index=False)
    pd.DataFrame(captions, columns=["run", "dataset", "image", "cider"]).to_csv(raw / "captions.csv", index=False)
    if bench_dir is not None:
        shutil.copy(bench_dir / "bench.json", raw / "bench.json")
    elif (raw / "bench.json").is_file():  # an earlier collect's speed table must not stand beside these runs
        (raw / "bench.json").unlink()
        print(f"hybrid_tools.compare: no --bench: removed the earlier collect's {raw / 'bench.json'} (its speed table went with it)")
    command = ["python", "-m", "hybrid_tools.compare", display_path(work_dir), *(["--bench", display_path(bench_dir)] if bench_dir else []),
               "--out", display_path(out)]
    (raw / "collect.json").write_text(json.dumps({"command": shlex.join(command), "recipe": recipe}, indent=1) + "\n")


def scored_run(name: str, dataset: str, result, path: Path | None) -> tuple[dict, pd.Series | None]:
    """runs.csv's columns for one scored (run, dataset), and its per-item scores (None without a
    prediction file)."""
    metric = METRICS[result.kind]
    if path is None:
        return dict(dataset=dataset, metric=metric, status="no prediction file"), None
    failed = {int(index) for index, _ in result.failed_rows}
    items = question_hits(load_table(path)) if result.kind == "mcq" else image_ciders(load_table(path), failed)
    return dict(dataset=dataset, metric=metric, status="ok", items=len(items), vlmeval_score=result.main_value,
                visual_in=result.visual_in_mean, visual_kept=result.visual_kept_mean, visual_layer_mean=result.visual_layer_mean,
                prefill_gmacs=result.prefill_gmacs_mean, setting=";".join(result.settings),
                failed_rows=len(result.failed_rows)), items


def unscored_sets(runs: list[dict], planned: dict) -> list[dict]:
    """A line for every dataset some run scored and another run, which scored others, did not (it
    failed there): without it that run would be missing from the dataset's table, unnamed."""
    metrics = {run["dataset"]: run["metric"] for run in runs if run.get("dataset")}
    seen: dict[str, set] = {}
    for run in runs:
        if run.get("dataset"):
            seen.setdefault(run["run"], set()).add(run["dataset"])
    return [dict(run=name, **run_identity(name), dataset=dataset, metric=metrics[dataset],
                 status=f"no result on {dataset} (exit status {planned.get(name, {}).get('returncode')})")
            for name, datasets in seen.items() for dataset in sorted(set(metrics) - datasets)]


# ------------------------------------------------------------------------------- intervals


def bootstrap_interval(values: np.ndarray, draws: int = DRAWS, seed: int = SEED) -> tuple[float, float]:
    """Percentile 95% interval of the mean of `values` [n] over questions resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_interval(values: np.ndarray, reference: np.ndarray, draws: int = DRAWS, seed: int = SEED) -> tuple[float, float]:
    """95% interval of mean(values - reference), the same questions drawn for both."""
    return bootstrap_interval(values - reference, draws, seed)


def verdict(interval: tuple[float, float]) -> str:
    low, high = interval
    return "better" if low > 0 else "worse" if high < 0 else "no difference shown"


# ---------------------------------------------------------------------------------- render


def points(value: float) -> str:
    return f"{value:.1f}"


def signed_points(value: float) -> str:
    """+0.0 for a difference that rounds to zero from either side (never "-0.0")."""
    return f"{round(value, 1) + 0.0:+.1f}"


def interval_text(interval: tuple[float, float], signed: bool = False) -> str:
    low, high = (signed_points(v) if signed else points(v) for v in interval)
    return f"[{low}, {high}]"


def item_vectors(raw: Path, dataset: str) -> dict[str, np.ndarray]:
    """Per run, its items' scores in the table's units: hits as 0 / 100 (percent), CIDEr x 100."""
    hits = pd.read_csv(raw / "hits.csv").rename(columns={"question": "item", "hit": "value"})
    hits["value"] *= 100
    captions_path = raw / "captions.csv"
    captions = pd.read_csv(captions_path).rename(columns={"image": "item", "cider": "value"}) if captions_path.is_file() else hits[:0]
    items = pd.concat([hits, captions])
    table = items[items["dataset"] == dataset].pivot(index="item", columns="run", values="value").sort_index()
    partial = {run: int(table[run].notna().sum()) for run in table.columns if table[run].isna().any()}
    if partial:  # paired intervals need every run on the same items
        listed = ", ".join(f"{run} ({count})" for run, count in partial.items())
        raise SystemExit(f"{dataset}: {len(table)} items in all, but these runs hold fewer: {listed}. "
                         "Rerun them on the whole set (without --limit), or move their folders out of the work dir.")
    return {run: table[run].to_numpy(dtype=float) for run in table.columns}


def pruning_layer(run: str) -> int:
    """The LLM layer a run prunes at, from its tag's `-lN` (FastV, random, DART, a hybrid's FastV);
    FastV's default layer 2 for a run that names none (methods before the LLM, PyramidDrop's stages)."""
    for part in (settings.setting_tag(run) or "").split("_"):  # dymu-<file stem>_fastv-k64-l2: the FastV part's
        found = re.search(r"-l(\d+)(?=-|$)", part) if part.startswith(tuple(f"{name}-" for name in methods_at_a_layer())) else None
        if found:
            return int(found.group(1))
    return 2


def references(runs: pd.DataFrame, vectors: dict, budget, positions: str, layer: int = 2) -> dict[str, np.ndarray]:
    """FastV's items at this budget, positions and pruning layer, and random's mean over its seeds
    there: a work dir holding FastV at layers 1, 2 and 3 compares each run with the one at its own
    layer, not the first by name. Of several FastV runs there (a MASK_READ or scoring variant beside
    it), the plain one, tagged `fastv-k<B>-l<L>` alone; none where no run is."""
    same = runs[(runs["budget"] == budget) & (runs["positions"] == positions) & (runs["status"] == "ok")]
    same = same[same["run"].map(pruning_layer) == layer]
    found = {}
    fastv = [r for r in same[same["method"] == "fastv"]["run"] if r in vectors]
    plain = [r for r in fastv if re.fullmatch(r"fastv-[kr][\d.]+-l\d+", settings.setting_tag(r) or "")]
    if len(fastv) == 1 or len(plain) == 1:
        found["fastv"] = vectors[(plain or fastv)[0]]
    seeds = [vectors[r] for r in same[same["method"] == "random"]["run"] if r in vectors]
    if seeds:
        found["random"] = np.mean(seeds, axis=0)
    return found


def table_header(metric: str) -> str:
    return (f"| budget | method | tag | positions | seed | visual layer-avg (C) | prefill GMACs | {metric} [95% CI] "
            "| vs FastV, points [95% CI] | vs random, points [95% CI] | note |\n|---|---|---|---|---|---|---|---|---|---|---|")


# The table shows VLMEvalKit's score, the one every other table shows; the intervals and paired
# differences come from our per-item rescoring, so any disagreement beyond float noise is named.
RESCORE_TOLERANCE = 1e-6


def run_row(run: pd.Series, vectors: dict, refs: dict) -> str:
    if run["status"] != "ok":
        return (f"| {budget_text(run)} | {run['method']} | {tag_text(run)} | {run['positions']} | {seed_text(run)} | | "
                f"| unreachable or failed | | | {run['status']} |")
    values = vectors[run["run"]]
    cells = []
    for name in ("fastv", "random"):
        if name not in refs or run["method"] == name:
            cells.append("")
            continue
        interval = paired_interval(values, refs[name])
        cells.append(f"{signed_points(values.mean() - refs[name].mean())} {interval_text(interval, signed=True)} {verdict(interval)}")
    score = float(run["vlmeval_score"])
    note = "" if abs(values.mean() - score) <= RESCORE_TOLERANCE else f"the per-item rescoring behind the intervals gives {values.mean():.2f}"
    return (f"| {budget_text(run)} | {run['method']} | {tag_text(run)} | {run['positions']} | {seed_text(run)} | {number(run['visual_layer_mean'])} "
            f"| {number(run['prefill_gmacs'], '.2f')} | {points(score)} {interval_text(bootstrap_interval(values))} "
            f"| {cells[0]} | {cells[1]} | {note} |")


def number(value, spec: str = ".1f") -> str:
    return "" if pd.isna(value) else format(float(value), spec)


def budget_text(run: pd.Series) -> str:
    """A count as itself, a fraction of each image's tokens as such."""
    budget = run["budget"]
    if pd.isna(budget):
        return ""
    return str(int(budget)) if float(budget).is_integer() else f"{budget:g} of each image"


def tag_text(run: pd.Series) -> str:
    """The setting the rows ran (pdrop's names its stage layers), else the folder's tag."""
    if isinstance(run.get("setting"), str) and run["setting"]:
        return run["setting"]
    return run["run"].split(settings.NAME_SEPARATOR, 1)[1] if settings.NAME_SEPARATOR in run["run"] else "vanilla"


def seed_text(run: pd.Series) -> str:
    return "" if pd.isna(run["seed"]) else str(int(run["seed"]))


def main_table(raw: Path) -> str:
    """The main table, one section per dataset, from raw/ only (byte-stable)."""
    runs = pd.read_csv(raw / "runs.csv")
    runs = runs.sort_values(["budget", "positions", "method", "seed", "run"], na_position="first", kind="stable")
    sections = []
    for dataset in sorted(d for d in runs["dataset"].dropna().unique() if d):
        vectors = item_vectors(raw, dataset)
        mine = runs[runs["dataset"] == dataset]
        metric = mine["metric"].iloc[0]
        unit = "questions, circular" if metric.startswith("circular") else "images"
        failed = runs[(runs["status"] != "ok") & (runs["dataset"].isna() | (runs["dataset"] == ""))]
        lines = [f"### {dataset} ({len(next(iter(vectors.values()), []))} {unit})\n", table_header(metric)]
        for _, run in pd.concat([mine, failed]).sort_values(["budget", "positions", "method", "seed", "run"],
                                                            na_position="first", kind="stable").iterrows():
            lines.append(run_row(run, vectors, references(mine, vectors, run["budget"], run["positions"], pruning_layer(run["run"]))))
        sections.append("\n".join(lines + failed_rows_lines(mine)))
    return "\n\n".join(sections) + "\n"


def failed_rows_lines(runs: pd.DataFrame) -> list[str]:
    """A line naming the runs with failed rows, which are scored as wrong: a miss, or a caption's
    CIDEr 0 (runs.csv written before the column existed has none to name)."""
    if "failed_rows" not in runs.columns:
        return []
    failed = [f"`{run['run']}` ({int(run['failed_rows'])})" for _, run in runs.iterrows() if run["failed_rows"] > 0]
    return ["", f"Failed rows (the plugin's failure marker, scored as wrong): {', '.join(failed)}."] if failed else []


SPEED_HEADER = ("| config | visual in → kept | prefill ms (median) | prefill ratio vs {baseline} | theory ratio | decode ms/token (median) "
                "| KV cache MiB (theory) |\n|---|---|---|---|---|---|---|")


def speed_table(bench: dict) -> str:
    """The speed table of a bench (raw/bench.json's content)."""
    lines = [SPEED_HEADER.format(baseline=baseline_of(bench) or "a baseline not recorded")]
    for row in bench["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row.get('config')} | | {row.get('status')} | | | | |")
            continue
        lines.append(f"| {row['config']} | {fmt(row.get('visual_in'), '.0f')} → {fmt(row.get('visual_kept'), '.0f')} | {fmt(row.get('prefill_ms'))} "
                     f"| {fmt(row.get('prefill_ratio'), '.3f')} | {fmt(row.get('prefill_theory_ratio'), '.3f')} "
                     f"| {fmt(row.get('decode_ms_per_token'), '.2f')} | {fmt(row.get('kv_cache_mb_theory'))} |")
    return "\n".join(lines) + "\n"


def plots(raw: Path, figures: Path) -> list[Path]:
    """Accuracy and CIDEr against prefill GMACs and against the layer-averaged count, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = pd.read_csv(raw / "runs.csv")
    runs = runs[(runs["status"] == "ok") & (runs["positions"] == "logical")]
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in sorted(runs["dataset"].unique()):
        vectors = item_vectors(raw, dataset)
        mine = runs[runs["dataset"] == dataset].copy()
        mine["score"] = [vectors[run].mean() for run in mine["run"]]
        metric = mine["metric"].iloc[0]
        for column, label in (("prefill_gmacs", "prefill GMACs (theory)"), ("visual_layer_mean", "visual tokens, layer-averaged")):
            figure, axes = plt.subplots(figsize=(6, 4))
            for number, (method, group) in enumerate(mine.groupby("method")):  # 12 methods: more than one colour cycle
                group = group.groupby(column, as_index=False)["score"].mean().sort_values(column)
                axes.plot(group[column], group["score"], marker="os^vD<>"[number % 7], color=plt.cm.tab20(number % 20), label=method)
            axes.set_xlabel(label)
            axes.set_ylabel(f"{dataset} {metric}")
            axes.legend(fontsize=7)
            path = figures / f"{dataset}_{'accuracy' if metric.startswith('circular') else 'cider'}_vs_{column}.png"
            figure.tight_layout()
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written.append(path)
    return written


REPORT_TITLE = "# Method comparison: every method at matched budgets, with intervals"

WHAT_THIS_IS = {
    "tiny": """**What this is.** A check of the harness, not a ranking. The model is the bundled tiny random-weight
LLaVA (4 LLM layers): its accuracies and CIDEr rank nothing and need not match real checkpoints.
The same command with `FAMILY=llava_testbed` (the trained testbed: `reports/method-comparison-testbed/`)
or `FAMILY=llava_v1.5_7b` gives a table that means something.""",
    "testbed": """**What this is.** The methods compared on the trained testbed (`hybrid_vlm/testbed/`: LLaVA-1.5's
geometry where token reduction acts, 576 visual tokens from a CLIP-layout tower at 336 px, an
8-layer Llama of width 128, trained from scratch on generated scenes; `reports/testbed/` describes
it). TinyMMBench and TinyCOCO are its held-out sets. The differences below are measured on this
model and these sets; they say nothing directly about LLaVA-1.5-7B or real benchmarks, where the
same command runs with `FAMILY=llava_v1.5_7b`. Differences the paired intervals do not separate from
0 are not differences.""",
}
OTHER_FAMILY = """**What this is.** The methods compared on the checkpoints the runs name ({family})."""

DEPTH_NOTES = {
    "tiny": """PyramidDrop's stages on 4 layers start at layer 1, so every budget below 144 is unreachable there
(its runs end with exit status 1 and the error naming that range); SparseVLM runs its published
schedules only (192 / 128 / 64; 32 and 16 are refused), at stages from layers 1 / 2 / 3 on 4 layers,
so its layer-average is far above its name here.""",
    "testbed": """PyramidDrop's and SparseVLM's stage layers are scaled to the testbed's 8 layers (the tag column
names them); budgets they cannot reach there, and SparseVLM's unpublished 32 and 16, are listed with
their exit status.""",
}
DYMU_NOTES = {
    "tiny": """DyMU alone and the hybrid run at the tiny model's mid thresholds (the hybrid: then FastV halving at layer 2).""",
    "testbed": """DyMU alone and the hybrid run at the testbed's shipped mid thresholds; the hybrid then keeps 64 or 32
visual tokens with FastV at layer 2, and sits in the rows of that budget.""",
}
OTHER_DEPTH = """Budgets a method cannot reach on this model are listed with their exit status."""

COMMON_RULES = """Sets: TinyMMBench (circular accuracy: a question counts when every rotation is right) and TinyCOCO
(CIDEr x 100, pycocoevalcap's scorer as VLMEvalKit uses it; its per-image scores, whose mean is the
set's CIDEr, are what the intervals resample). Budgets are each method's own rule: A (entering the
LLM) for pool, VisionZip, VisPruner and DivPrune; B (kept after the layer) for FastV, random and
DART (`DART_QUOTA=official`: 4 + 8 * (budget // 8)); C (layer-averaged) for PyramidDrop; SparseVLM
by its published schedules. Compare methods by the layer-average column, not by the budget's name.
{depth}
{dymu}The tag column is the setting the rows ran, with a
multi-stage method's stage layers. {random}Intervals: percentile bootstrap over items (2000 draws, seed 0); paired
intervals resample the same items for both runs; "better"/"worse" only where the paired interval
excludes 0. Runs that did not run are listed with their exit status."""

SPEED_ELSEWHERE = """Not measured with this family: the speed of every method at 64 on the mid shape, against stock
transformers in one process, is `reports/method-comparison/speed.md` (the token counts and MACs
above are this model's)."""


def family_of(raw: Path) -> str:
    """The checkpoint family every run of raw/runs.csv names (e.g. "tiny", "testbed"), else "mixed"."""
    runs = pd.read_csv(raw / "runs.csv")
    families = {settings.VARIANTS[model].family if model in settings.VARIANTS else "other"
                for model in (settings.base_name(str(run)) for run in runs["run"])}
    return families.pop() if len(families) == 1 else "mixed"


def report_intro(out: Path, family: str) -> str:
    """The report's opening: what made it, what the model is, and the rules of the table, each claim
    about the runs read from raw/runs.csv."""
    runs = pd.read_csv(out / "raw" / "runs.csv")
    record = out / "raw" / "collect.json"
    if record.is_file():
        collected = json.loads(record.read_text())
        made = f"`{collected['command']}`"
        if collected.get("recipe"):  # its work dir is scratch: the script is what remakes it
            made = f"`{collected['recipe']}`, whose last step is {made}"
    elif family == "tiny":  # comparisons collected before the command was recorded: the committed ones
        made = "`bash reports/method-comparison/regenerate.sh` (sweeps, bench, then `python -m hybrid_tools.compare`)"
    elif family in settings.FAMILY_VANILLA:
        made = f"`FAMILY={settings.FAMILY_VANILLA[family]} bash reports/method-comparison/regenerate.sh` (sweeps, then `python -m hybrid_tools.compare`)"
    else:
        made = "`python -m hybrid_tools.compare` over sweeps of several families"
    what = WHAT_THIS_IS.get(family, OTHER_FAMILY.format(family=family))
    methods = set(runs["method"])
    dymu = ""
    if methods & {"dymu", "hybrid"}:
        dymu = (DYMU_NOTES[family] + "\n" if family in DYMU_NOTES else "") + (
            "DyMU's per-row MACs are not recorded (its tower counts are data), so DyMU and the hybrid appear in\n"
            "the layer-averaged plots only. ")
    seeds = sorted({int(seed) for seed in runs.loc[runs["method"] == "random", "seed"].dropna()})
    random = (f"Random selection runs with seed{'s' if len(seeds) > 1 else ''} {_and(seeds)}; \"vs random\" is\n"
              f"against {'their mean' if len(seeds) > 1 else 'it'} per item. ") if seeds else ""
    rules = COMMON_RULES.format(depth=DEPTH_NOTES.get(family, OTHER_DEPTH), dymu=dymu, random=random)
    return (f"{REPORT_TITLE}\n\nMade by {made};\n"
            f"every number below comes from `raw/` through `python -m hybrid_tools.compare --render --out {out.as_posix()}`.\n\n"
            f"{what}\n\n{rules}\n")


def _and(values) -> str:
    words = [str(value) for value in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def bench_setting(bench: dict) -> str:
    """Where and at which budgets a bench ran, from its own record: 'at the mid shape on CPU, every method at 64'."""
    meta = bench.get("meta", {})
    shape = (f"the {meta['preset']} shape" if meta.get("preset") else f"checkpoint `{meta['model']}`" if meta.get("model")
             else "an unrecorded model")
    device = "CPU" if meta.get("device") == "cpu" else str(meta.get("device", "an unrecorded device"))
    rows = [row for row in bench.get("rows", []) if row.get("status") == "ok"]
    budgets = sorted({budget for row in rows if (budget := tag_budget(str(row.get("config", "")), str(row.get("method")))) is not None})
    budgets = [str(budget) if isinstance(budget, int) else f"{budget:g} of each image" for budget in budgets]
    methods = f"every method at {budgets[0]}" if len(budgets) == 1 else f"budgets {_and(budgets)}" if budgets else "no budgets"
    return f"at {shape} on {device}, {methods}"


def baseline_of(bench: dict) -> str | None:
    """The row a bench's ratios divide by, as the report reads it (None: not recorded)."""
    return bench_baseline(bench.get("meta", {}), bench.get("rows", []))


def render(out: Path) -> list[Path]:
    """Writes OUT's table, speed table (where raw/ holds a bench), figures and report; returns what it wrote."""
    raw = out / "raw"
    table, figures = main_table(raw), plots(raw, out / "figures")
    (out / "table.md").write_text(table)
    written = [out / "table.md"]
    if (raw / "bench.json").is_file():
        bench = json.loads((raw / "bench.json").read_text())
        speed = speed_table(bench)
        (out / "speed.md").write_text(speed)
        written.append(out / "speed.md")
        baseline = baseline_of(bench)
        against = ("stock transformers" if baseline == "stock" else f"the `{baseline}` row" if baseline
                   else "a baseline the bench does not record")
        speed_section = (f"## Speed {bench_setting(bench)} (median prefill; ratios against {against})"
                         f"\n\nThe \"kept\" of PyramidDrop and SparseVLM is their last stage's count.\n\n{speed}")
    else:
        (out / "speed.md").unlink(missing_ok=True)
        speed_section = f"## Speed\n\n{SPEED_ELSEWHERE}\n"
    links = "\n".join(f"![{path.stem}](figures/{path.name})" for path in figures)
    report = (f"{report_intro(out, family_of(raw))}\n## Accuracy (TinyMMBench, circular) and CIDEr (TinyCOCO)\n\n{table}\n"
              f"{speed_section}\n## Plots (logical positions)\n\n{links}\n")
    (out / "report.md").write_text(report)
    return [*written, out / "report.md", out / "figures"]


def checked_sources(parser, args) -> tuple[Path, Path | None]:
    """WORK_DIR and --bench, checked before collect overwrites OUT/raw: a usage error (exit 2)
    for a missing or empty work dir, or a --bench folder without bench.json."""
    if args.work_dir is None:
        parser.error("give WORK_DIR, or --render to re-render OUT from its raw files")
    work_dir = Path(args.work_dir)
    if not work_dir.is_dir():
        parser.error(f"WORK_DIR {work_dir}: not a directory")
    if not read_work_dir(work_dir) and not read_sweep_runs(work_dir):
        parser.error(f"WORK_DIR {work_dir}: no model folders and no sweep records in it (VLMEvalKit's --work-dir of the sweeps)")
    bench_dir = Path(args.bench) if args.bench else None
    if bench_dir is not None and not (bench_dir / "bench.json").is_file():
        parser.error(f"--bench {bench_dir}: no bench.json there (python -m hybrid_tools.bench ... --out DIR writes one)")
    return work_dir, bench_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_tools.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir", nargs="?", help="the VLMEvalKit work dir of the sweeps")
    parser.add_argument("--bench", default=None, help="a hybrid_tools.bench output folder (bench.json)")
    parser.add_argument("--out", required=True, help="the comparison's folder (reports/method-comparison for the committed one): "
                        "collect replaces its raw/ and everything rendered from it")
    parser.add_argument("--render", action="store_true", help="only re-render OUT from OUT/raw")
    parser.add_argument("--recipe", default=None, metavar="COMMAND", help="what made WORK_DIR's runs (e.g. 'bash reports/method-comparison/regenerate.sh'): "
                        "the report names it")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        if not (out / "raw" / "runs.csv").is_file():
            parser.error(f"--render: {out / 'raw' / 'runs.csv'} does not exist (collect first: give WORK_DIR)")
    else:
        work_dir, bench_dir = checked_sources(parser, args)
        collect(work_dir, bench_dir, out, args.recipe)
    print("wrote " + ", ".join(str(path) for path in render(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
