"""`python -m hybrid_tools.report` on work dirs written in VLMEvalKit's exact file formats.

The fake work dirs use the formats VLMEvalKit 0.0.20 writes (checked against a real `python run.py`
run; the committed reports/tiny-demo/raw/ holds such a run): `<model>_<dataset>_acc.csv` is
report_acc's table dumped with csv.QUOTE_ALL (fractions), `<model>_<dataset>_score.json` the COCO
scorer's dict (x100, indent 4), predictions as .xlsx, status.json as upsert_run_status writes it, and
the plugin's `<model>_<dataset>_stats.jsonl`. The expected numbers are read back from those raw
files here, with the csv/json modules, independently of the report's own readers.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from hybrid_tools.report import cli as report

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "reports" / "tiny-demo"
MMB, COCO = "MMBench_DEV_EN", "COCO_VAL"
TINY_BANNER = "Tiny random-weight model, not LLaVA-1.5-7B"

# model -> (MCQ accuracy per category (fractions; Overall first), caption scores, visual tokens kept, prefill seconds).
# Made-up round numbers under the plugin's real folder names: not results of any model.
SYNTHETIC_7B = {
    "llava_v1.5_7b": ({"Overall": 0.5, "AR": 0.6, "CP": 0.4}, {"Bleu": [40.0, 30.0, 20.0, 10.0], "ROUGE_L": 50.0, "CIDEr": 100.0}, 576, 0.5),
    "llava_v1.5_7b_fastv__fastv-k72-l2": ({"Overall": 0.4, "AR": 0.5, "CP": 0.3}, {"Bleu": [30.0, 20.0, 10.0, 5.0], "ROUGE_L": 40.0, "CIDEr": 80.0}, 72, 0.25),
    "llava_v1.5_7b_hybrid__dymu-mid_fastv-k64-l2": ({"Overall": 0.45, "AR": 0.55, "CP": 0.35}, {"Bleu": [35.0, 25.0, 15.0, 7.5], "ROUGE_L": 45.0, "CIDEr": 90.0}, 64, 0.2),
}
TINY = {
    "llava_tiny": ({"Overall": 0.25, "CP": 0.25}, {"Bleu": [1.0, 0.5, 0.2, 0.1], "ROUGE_L": 3.0, "CIDEr": 0.4}, 576, 0.030),
    "llava_tiny_hybrid__dymu-tiny-mid_fastv-r0.5-l2": ({"Overall": 0.125, "CP": 0.125}, {"Bleu": [0.9, 0.4, 0.1, 0.0], "ROUGE_L": 2.5, "CIDEr": 0.1}, 103, 0.024),
}
ROWS = 12


def write_config(work_dir: Path, model: str, acc: dict | None, scores: dict | None, visual_kept: int, prefill: float) -> None:
    folder = work_dir / model
    folder.mkdir(parents=True)
    setting = model.split("__", 1)[1] if "__" in model else "stock"
    datasets = {}
    for dataset in (MMB, COCO):
        records = []
        for row in range(ROWS):
            text = 60 + row % 5
            visual_in = 576 if "dymu" not in model else 190 + 7 * row
            kept = min(visual_kept, visual_in)
            records.append({
                "index": str(row), "prediction": "A", "tokens_in": text + visual_in, "tokens_kept": text + kept,
                "prefill_s": round(prefill * (1 + 0.03 * ((row * 7) % 5)), 6), "generate_s": prefill * 3,
                "new_tokens": 2, "batch_size": 1, "rank": 0, "setting": setting,
            })
        with open(folder / f"{model}_{dataset}_stats.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        table = pd.DataFrame({"index": range(ROWS), "question": "q", "answer": "A", "prediction": "A"})
        table.to_excel(folder / f"{model}_{dataset}.xlsx", index=False)
        datasets[dataset] = {"status": "done", "prediction_file": f"{folder}/{model}_{dataset}.xlsx"}
    if acc is not None:
        pd.DataFrame({"split": ["dev"], **{k: [v] for k, v in acc.items()}}).to_csv(
            folder / f"{model}_{MMB}_acc.csv", index=False, encoding="utf-8", quoting=csv.QUOTE_ALL
        )
    if scores is not None:
        with open(folder / f"{model}_{COCO}_score.json", "w") as handle:
            json.dump(scores, handle, indent=4)
    status = {
        "schema_version": "1.0", "eval_id": "T20260101-000000", "created_at": "2026-01-01T00:00:00+00:00",
        "datasets": datasets, "model_name": model, "commit": "f6a5b409",
        "argv": ["run.py", "--data", MMB, COCO, "--model", model.split("__")[0]], "mode": "all",
    }
    (folder / "status.json").write_text(json.dumps(status, indent=2))


def make_work_dir(root: Path, configs: dict, infer_only: str | None = None) -> Path:
    for model, (acc, scores, kept, prefill) in configs.items():
        write_config(root, model, acc, scores, kept, prefill)
    if infer_only:  # predictions and sidecars, no evaluation yet (run.py --mode infer)
        write_config(root, infer_only, None, None, 36, 0.090)
    return root


# ---- independent readers of the raw files ---------------------------------------------------------
def raw_overall_percent(work_dir: Path, model: str) -> float:
    with open(work_dir / model / f"{model}_{MMB}_acc.csv", newline="") as handle:
        return 100.0 * float(next(csv.DictReader(handle))["Overall"])


def raw_caption(work_dir: Path, model: str) -> dict:
    scores = json.loads((work_dir / model / f"{model}_{COCO}_score.json").read_text())
    return {"CIDEr": scores["CIDEr"], "BLEU-4": scores["Bleu"][3], "ROUGE_L": scores["ROUGE_L"], "BLEU-1": scores["Bleu"][0]}


def raw_stats(work_dir: Path, model: str, dataset: str) -> dict:
    lines = (work_dir / model / f"{model}_{dataset}_stats.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {
        "tokens_in": statistics.fmean(r["tokens_in"] for r in records),
        "tokens_kept": statistics.fmean(r["tokens_kept"] for r in records),
        "prefill_ms": 1000 * statistics.median(r["prefill_s"] for r in records),
    }


def table_row(markdown: str, section: str, label: str) -> list[str]:
    """Cells of the first table row for `label` after the heading that starts with `section`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(section))
    for line in lines[start:]:
        if line.startswith(f"| `{label}`"):
            return [cell.strip() for cell in line.strip().strip("|").split(" | ")]
    raise AssertionError(f"no row for {label} under {section}")


def row_text(markdown: str, section: str, label: str) -> str:
    return " | ".join(table_row(markdown, section, label))


def check_png(path: Path) -> None:
    assert path.is_file() and 0 < path.stat().st_size < 200_000, path
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"


def run_report(*args) -> int:
    return report.main([str(a) for a in args])


# ---- tests ------------------------------------------------------------------------------------------
def test_7b_report_deltas_equal_raw_differences_and_no_bench(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the checkout: raw files under it are linked
    work = make_work_dir(tmp_path / "outputs", SYNTHETIC_7B, infer_only="llava_v1.5_7b_fastv__fastv-k36-l2")
    assert run_report(work, "--name", "seven", "--out", tmp_path / "reports") == 0
    out = tmp_path / "reports" / "seven"
    markdown = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())

    models = [*SYNTHETIC_7B, "llava_v1.5_7b_fastv__fastv-k36-l2"]
    for model in models:  # every configuration, in every dataset table and in the provenance
        assert markdown.count(f"| `{model}`") >= 2 and f"#### `{model}`" in markdown
        assert {e["model"] for e in data["datasets"][MMB]} >= {model}
    vanilla = "llava_v1.5_7b"
    for model in SYNTHETIC_7B:
        mcq = next(e for e in data["datasets"][MMB] if e["model"] == model)
        caption = next(e for e in data["datasets"][COCO] if e["model"] == model)
        assert mcq["metrics"]["Overall"] == pytest.approx(raw_overall_percent(work, model))
        for key, value in raw_caption(work, model).items():
            assert caption["metrics"][key] == pytest.approx(value)
        for entry, dataset in ((mcq, MMB), (caption, COCO)):
            stats = raw_stats(work, model, dataset)
            assert entry["tokens_in_mean"] == pytest.approx(stats["tokens_in"])
            assert entry["tokens_kept_mean"] == pytest.approx(stats["tokens_kept"])
            assert entry["prefill_ms_median"] == pytest.approx(stats["prefill_ms"])
        if model == vanilla:
            assert mcq["vanilla"] and mcq["delta"] == {}
            assert table_row(markdown, f"### {MMB}", model)[2] == "ref"
            continue
        assert mcq["reference"] == vanilla and caption["reference"] == vanilla
        overall_delta = raw_overall_percent(work, model) - raw_overall_percent(work, vanilla)
        assert mcq["delta"]["Overall"] == pytest.approx(overall_delta)
        raw, raw_vanilla = raw_caption(work, model), raw_caption(work, vanilla)
        for key in raw:
            assert caption["delta"][key] == pytest.approx(raw[key] - raw_vanilla[key])
        kept_ratio = raw_stats(work, model, MMB)["tokens_kept"] / raw_stats(work, vanilla, MMB)["tokens_kept"]
        assert mcq["tokens_kept_ratio"] == pytest.approx(kept_ratio)
        # ... and the markdown shows those very numbers
        row = table_row(markdown, f"### {MMB}", model)
        assert row[1] == f"{raw_overall_percent(work, model):.1f}" and row[2] == f"{overall_delta:+.1f}"
        assert row[5] == f"{kept_ratio:.3f}×"
        row = table_row(markdown, f"### {COCO}", model)
        assert row[1] == f"{raw['CIDEr']:.1f}" and row[2] == f"{raw['CIDEr'] - raw_vanilla['CIDEr']:+.1f}"
        assert f"[metric](../../outputs/{model}/{model}_{MMB}_acc.csv)" in row_text(markdown, f"### {MMB}", model)

    infer_only = next(e for e in data["datasets"][MMB] if e["model"] == "llava_v1.5_7b_fastv__fastv-k36-l2")
    assert infer_only["metrics"] == {} and infer_only["tokens_kept_mean"] is not None  # listed, metric "–"
    assert table_row(markdown, f"### {MMB}", "llava_v1.5_7b_fastv__fastv-k36-l2")[1] == "–"

    for dataset in (MMB, COCO):
        check_png(out / "figures" / f"{dataset}.png")
        assert f"(figures/{dataset}.png)" in markdown
    assert TINY_BANNER not in markdown and "Evaluation model: LLaVA-1.5-7B" in markdown
    assert "No bench results given" in markdown and "| config | method |" not in markdown
    assert "not recorded (no `run_info.json`" in markdown  # provenance says what is missing
    assert "python run.py --data MMBench_DEV_EN COCO_VAL --model llava_v1.5_7b" in markdown  # status.json's argv


def test_tiny_banner_bench_table_and_run_info(tmp_path):
    work = make_work_dir(tmp_path / "tiny", TINY)
    record = {"command": "python run.py", "env": {"MMEVAL_ROOT": "/x"}, "checkpoint": "/c/tiny-llava-v1",
              "versions": {"torch": "2.14.1"}, "git": {"commit": "abc123", "dirty": False}}
    (work / "llava_tiny" / "run_info.json").write_text(json.dumps({"runs": [record]}))
    bench = DEMO / "raw" / "bench"
    assert run_report(work, "--bench", bench, "--name", "tiny", "--out", tmp_path / "reports") == 0
    markdown = (tmp_path / "reports" / "tiny" / "report.md").read_text()
    assert TINY_BANNER in markdown and markdown.index(TINY_BANNER) < markdown.index("## Regenerate")
    assert "MMEVAL_ROOT=/x python run.py    # run_info.json" in markdown  # the recorded command, top of the report
    assert "git commit abc123" in markdown
    rows = json.loads((bench / "bench.json").read_text())["rows"]
    for row in rows:
        if row["status"] != "ok":
            continue
        cells = table_row(markdown, "## Speed and FLOPs", row["config"])
        ideal = "*" if row.get("dymu") else ""  # DyMU's merged-count theory, which the static tower does not run at
        assert cells[7] == f"{row['prefill_ratio']:.3f}" and cells[8] == f"{row['prefill_theory_ratio']:.3f}{ideal}"
        assert cells[10] == f"{row['llm_prefill_ratio']:.3f}" and cells[11] == f"{row['llm_prefill_theory_ratio']:.3f}"
    assert "python -m hybrid_tools.bench --preset tiny" in markdown

    # LLaVA-1.5-7B evaluation runs with a tiny bench: the banner names the bench only
    seven = make_work_dir(tmp_path / "seven", SYNTHETIC_7B)
    assert run_report(seven, "--bench", bench / "bench.json", "--name", "mixed", "--out", tmp_path / "reports") == 0
    mixed = (tmp_path / "reports" / "mixed" / "report.md").read_text()
    assert TINY_BANNER in mixed and "The speed benchmark uses" in mixed and "Evaluation model: LLaVA-1.5-7B" in mixed


def test_selection_snapshot_and_bad_inputs(tmp_path):
    work = make_work_dir(tmp_path / "outputs", SYNTHETIC_7B)
    out = tmp_path / "reports"
    assert run_report(work, "--models", "*hybrid*", "--name", "sel", "--out", out, "--snapshot") == 0
    data = json.loads((out / "sel" / "report.json").read_text())
    assert {c["name"] for c in data["configurations"]} == {"llava_v1.5_7b", "llava_v1.5_7b_hybrid__dymu-mid_fastv-k64-l2"}
    raw = out / "sel" / "raw" / "outputs"
    assert sorted(p.name for p in raw.iterdir()) == ["llava_v1.5_7b", "llava_v1.5_7b_hybrid__dymu-mid_fastv-k64-l2"]
    assert all(e["sources"]["metrics"][0].startswith("raw/outputs/") for e in data["datasets"][MMB])

    assert run_report(work, "--vanilla", "llava_v1.5_7b_fastv__fastv-k72-l2", "--name", "ref", "--out", out) == 0
    forced = json.loads((out / "ref" / "report.json").read_text())
    hybrid = next(e for e in forced["datasets"][MMB] if e["model"].startswith("llava_v1.5_7b_hybrid"))
    assert hybrid["reference"] == "llava_v1.5_7b_fastv__fastv-k72-l2"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_report(empty, "--out", out) == 2
    with pytest.raises(SystemExit) as exit_info:
        run_report(tmp_path / "missing", "--out", out)
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        run_report(work, "--bench", tmp_path / "no-bench", "--out", out)


@pytest.mark.parametrize("name", ["tiny-demo", "testbed-demo", "testbed", "cpu-mid-bench", "cpu-mid-methods", "cpu-next-bench",
                                  "cpu-next-overhead", "cpu-qwen-bench", "cpu-next-methods"])
def test_committed_report_regenerates_from_its_raw_files(tmp_path, monkeypatch, name):
    """reports/<name>/report.md and report.json are exactly what its printed command makes from
    reports/<name>/raw/."""
    folder = REPO / "reports" / name
    committed = (folder / "report.md").read_text()
    if name == "tiny-demo":
        assert TINY_BANNER in committed.split("## Regenerate")[0]
    for png in (folder / "figures").glob("*.png"):
        check_png(png)
    block = committed.split("This report, from the raw files it read:", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    command = shlex.split(block)
    assert command[:3] == ["python", "-m", "hybrid_tools.report"]
    copy = tmp_path / "reports" / name
    shutil.copytree(folder / "raw", copy / "raw")
    shutil.copy2(folder / "regenerate.sh", copy / "regenerate.sh")
    for source in folder.glob("*.json"):  # floors the command may read (--floors)
        if source.name != "report.json":
            shutil.copy2(source, copy / source.name)
    monkeypatch.chdir(tmp_path)
    assert report.main(command[3:]) == 0
    assert (copy / "report.md").read_text() == committed
    assert (copy / "report.json").read_text() == (folder / "report.json").read_text()


@pytest.mark.parametrize("name", ["cpu-mid-bench", "cpu-next-bench", "cpu-next-overhead", "cpu-next-methods"])
def test_readme_speed_table_quotes_the_committed_cpu_bench(name):
    """Every number of the README's CPU speed tables is in reports/<name>/raw/bench/bench.json."""
    readme = (REPO / "README.md").read_text()
    table = readme.split(f"<!-- {name}:begin -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]
    rows = json.loads((REPO / "reports" / name / "raw" / "bench" / "bench.json").read_text())["rows"]
    by_config = {row["config"]: row for row in rows}
    quoted = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(quoted) >= 2
    for line in quoted:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        row = by_config[cells[0].strip("`")]
        assert cells[1] == f"{row['visual_in']:.0f} → {row['visual_kept']:.0f}"
        assert cells[2] == f"{row['prefill_ms']:.1f}"
        assert cells[3] == f"{row['prefill_ratio']:.3f}" and cells[4] == f"{row['prefill_theory_ratio']:.3f}"
        assert cells[5] == f"{row['prefill_ratio_minus_theory']:+.3f}"
        if len(cells) > 6:  # the NeXT table's decode and KV-cache columns
            assert cells[6:] == [f"{row['decode_ms_per_token']:.1f}", f"{row['decode_ratio']:.3f}", f"{row['decode_theory_ratio']:.3f}", f"{row['kv_cache_mb_theory']:.1f}"]


def test_readme_cpu_overhead_figures_quote_the_committed_mid_benches():
    """The engine's overhead and FastV K = 64 on the `mid` preset, as the README quotes them from its three
    committed CPU runs, are those runs' raw ratios, in the order the text names the runs."""
    readme = (REPO / "README.md").read_text()
    quoted = readme.split("<!-- cpu-mid-overhead:begin -->", 1)[1].split("<!-- cpu-mid-overhead:end -->", 1)[0]
    sources = [(REPO / "reports/cpu-mid-bench/raw/bench/bench.json", ["vanilla"]),
               (REPO / "reports/cpu-mid-methods/raw/bench/bench.json", ["vanilla", "fastv-k64-l2"]),
               (REPO / "reports/method-comparison/raw/bench.json", ["vanilla", "fastv-k64-l2"])]
    expected = []
    for path, configs in sources:
        by_config = {row["config"]: row for row in json.loads(path.read_text())["rows"]}
        expected += [f"{by_config[config]['prefill_ratio']:.3f}" for config in configs]
    assert re.findall(r"\b[01]\.\d{3}\b", quoted) == expected


def test_readme_method_comparison_cider_table_quotes_the_committed_testbed_comparison():
    """Every cell of the README's method table on the testbed is that comparison's raw TinyCOCO score
    at logical positions (random: the lowest-highest of its seeds), and a budget it marks
    unreachable or refused has no TinyCOCO result there."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- method-comparison-testbed-cider:begin -->", 1)[1].split("<!-- method-comparison-testbed-cider:end -->", 1)[0]
    runs = pd.read_csv(REPO / "reports/method-comparison-testbed/raw/runs.csv")
    scored = runs[(runs["positions"] == "logical") & (runs["dataset"] == "TinyCOCO") & (runs["status"] == "ok")]
    lines = [line for line in table.strip().splitlines() if not line.startswith("|---")]
    methods = [cell.strip().split(" (")[0].lower() for cell in lines[0].strip("|").split("|")[1:]]
    methods = [{"pooling": "pool", "pyramiddrop": "pdrop"}.get(name, name) for name in methods]
    assert len(lines) == 6 and len(methods) == 9
    for line in lines[1:]:
        budget, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(methods), line
        for method, cell in zip(methods, cells):
            scores = scored[(scored["method"] == method) & (scored["budget"] == int(budget))]["vlmeval_score"].tolist()
            if cell in ("unreachable", "refused"):
                assert scores == [], (method, budget)
            elif method == "random":
                assert len(scores) == 3 and cell == f"{min(scores):.1f}-{max(scores):.1f}", (budget, cell)
            else:
                assert len(scores) == 1 and cell == f"{scores[0]:.1f}", (method, budget, cell)


def test_readme_qwen_speed_figures_quote_the_committed_qwen_bench():
    """The README's Qwen2.5-VL CPU speed sentence, number by number, is reports/cpu-qwen-bench's raw bench.json."""
    readme = (REPO / "README.md").read_text()
    quoted = readme.split("<!-- cpu-qwen-bench-prose:begin -->", 1)[1].split("<!-- cpu-qwen-bench-prose:end -->", 1)[0]
    rows = {row["config"]: row for row in json.loads((REPO / "reports/cpu-qwen-bench/raw/bench/bench.json").read_text())["rows"]}
    fastv = [rows[f"fastv-k{k}-l2"] for k in (640, 320, 160)]
    stock, vanilla = rows["stock"], rows["vanilla"]
    expected = ([f"{row['prefill_ratio']:.3f}" for row in fastv] + [f"{row['visual_kept']:.0f}" for row in fastv]
                + [f"{row['prefill_theory_ratio']:.3f}" for row in fastv]
                + [f"{stock['vision_ms'] / 1e3:.1f}", f"{stock['prefill_ms'] / 1e3:.1f}", f"{vanilla['prefill_ratio']:.3f}",
                   f"{vanilla['decode_ratio']:.3f}", f"{vanilla['decode_ms_per_token']:.1f}", f"{stock['decode_ms_per_token']:.1f}"])
    assert re.findall(r"\d+(?:\.\d+)?", quoted) == expected


def test_readme_next_speed_prose_quotes_the_committed_next_bench():
    """The figures the README's LLaVA-NeXT speed text draws from reports/cpu-next-bench: the engine's
    prefill overhead, FastV's range of ratio − theory, and decode at K = 576 against its theory."""
    readme = (REPO / "README.md").read_text()
    rows = {row["config"]: row for row in json.loads((REPO / "reports/cpu-next-bench/raw/bench/bench.json").read_text())["rows"]}
    overhead = readme.split("<!-- cpu-next-prose:begin -->", 1)[1].split("<!-- cpu-next-prose:end -->", 1)[0]
    ratio = rows["vanilla"]["prefill_ratio"]
    assert overhead == f"{round(100 * (ratio - 1)):.0f}% slower than stock in prefill ({ratio:.3f})"
    fastv = readme.split("<!-- cpu-next-fastv-prose:begin -->", 1)[1].split("<!-- cpu-next-fastv-prose:end -->", 1)[0]
    gaps = [row["prefill_ratio_minus_theory"] for name, row in rows.items() if re.fullmatch(r"fastv-k\d+-l2", name)]
    k576 = rows["fastv-k576-l2"]
    assert len(gaps) == 3
    assert re.findall(r"[−+-]?\d+\.\d+", fastv) == [f"{min(gaps):+.2f}".replace("-", "−"), f"{max(gaps):+.2f}",
                                                      f"{k576['decode_ratio']:.2f}", f"{k576['decode_theory_ratio']:.2f}"]


def synthetic_bench_rows(vanilla: float, fastv: float, hybrid: float | None, hybrid_syncs: str) -> list[dict]:
    """Made-up prefill ratios under the bench's row names: not measurements of anything."""
    rows = [
        dict(config="stock", method="stock", status="ok", prefill_ratio=1.0, sync_debug="fail: stock reads a value"),
        dict(config="vanilla", method="vanilla", status="ok", prefill_ratio=vanilla, sync_debug="pass"),
        dict(config="fastv-k64-l2", method="fastv", fastv_k=64, status="ok", prefill_ratio=fastv, prefill_theory_ratio=0.25,
             llm_prefill_ratio=fastv - 0.04, llm_prefill_theory_ratio=0.20, sync_debug="pass"),
    ]
    if hybrid is not None:
        rows.append(dict(config="dymu-mid_fastv-k64-l2", method="hybrid", fastv_k=64, dymu="mid.json", status="ok",
                         prefill_ratio=hybrid, sync_debug=hybrid_syncs))
    return rows


def test_targets_are_met_missed_or_not_measured_by_their_thresholds():
    from hybrid_tools.report.targets import bench_targets

    verdicts = {(name, row): verdict for name, row, _, _, verdict in bench_targets(
        synthetic_bench_rows(1.02, 0.29, 0.25, "pass: 1 sync(s) in the prefill (1 allowed), 0 in 8 decode steps (none allowed)"))}
    assert verdicts[("engine overhead: prefill vs stock", "`vanilla`")] == "met"  # 1.02 <= 1.03
    assert verdicts[("FastV K=64 prefill vs stock", "`fastv-k64-l2`")] == "met"  # 0.29 <= 0.25 + 0.05
    assert verdicts[("FastV K=64 LLM prefill vs stock", "`fastv-k64-l2`")] == "met"  # 0.25 <= 0.20 + 0.05
    assert verdicts[("hybrid (DyMU + FastV K=64) prefill vs stock", "`dymu-mid_fastv-k64-l2`")] == "met"  # 0.25 <= 1 / 3.5
    assert verdicts[("host syncs (prefill + decode steps)", "`dymu-mid_fastv-k64-l2`")] == "met"
    assert not any(row == "`stock`" for _, row in verdicts)  # stock's own syncs are not ours to meet

    missed = bench_targets(synthetic_bench_rows(1.04, 0.31, 0.30, "fail: 2 sync(s) in the prefill (1 allowed), 0 in 8 decode steps (none allowed)"))
    assert [verdict for *_, verdict in missed] == ["missed (slower)", "missed", "missed", "missed", "met", "met", "missed"]
    llm_only = bench_targets(synthetic_bench_rows(1.0, 0.28, None, "")[:2] + [dict(
        config="fastv-k64-l2", method="fastv", fastv_k=64, status="ok", prefill_ratio=0.28, prefill_theory_ratio=0.25,
        llm_prefill_ratio=0.26, llm_prefill_theory_ratio=0.20, sync_debug="pass")])
    assert [(name, needed, verdict) for name, _, _, needed, verdict in llm_only[1:3]] == [
        ("FastV K=64 prefill vs stock", "≤ 0.300 (prefill theory + 0.05)", "met"),  # the whole prefill within its theory's slack
        ("FastV K=64 LLM prefill vs stock", "≤ 0.250 (LLM theory + 0.05)", "missed")]  # the LLM alone not
    assert bench_targets(synthetic_bench_rows(0.96, 0.2, 0.2, "pass"))[0][-1] == "missed (faster)"  # 3% either way
    at_the_limits = bench_targets(synthetic_bench_rows(1.03, 0.30, 1 / 3.5, "pass"))  # each exactly its limit: "at least", "at most"
    assert [verdict for *_, verdict in at_the_limits[:2]] + [at_the_limits[3][-1]] == ["met", "met", "met"]
    assert bench_targets(synthetic_bench_rows(0.98, 0.2, 0.2, "pass"))[0][-1] == "met"
    absent = bench_targets(synthetic_bench_rows(1.0, 0.2, None, ""))
    assert absent[3][0].startswith("hybrid") and absent[3][-1] == "not measured"
    # ratios that divide by the engine (--baseline vanilla) are not ratios vs stock: not judged as such
    engine_based = bench_targets(synthetic_bench_rows(1.0, 0.2, 0.2, "pass"), baseline="vanilla")
    assert [(name, verdict) for name, _, _, _, verdict in engine_based[:4]] == [
        ("engine overhead: prefill vs stock", "not measured"), ("FastV K=64 prefill vs stock", "not measured"),
        ("FastV K=64 LLM prefill vs stock", "not measured"), ("hybrid (DyMU + FastV K=64) prefill vs stock", "not measured")]
    assert "divide by `vanilla`" in engine_based[0][2] and engine_based[-1][-1] == "met"  # the sync checks still count


def test_a_bench_that_does_not_record_its_baseline_is_judged_by_no_guessed_one(tmp_path):
    """A bench.json without meta.baseline was described as dividing by `vanilla` (the speed note's
    default) while its targets judged the same ratios as ratios vs stock (the targets' default).
    The rows' own `ratios_divide_by` now decides, and without either nothing is guessed."""
    from hybrid_tools.report.bench import Bench
    from hybrid_tools.report.render import speed_note
    from hybrid_tools.report.targets import targets_table

    rows = synthetic_bench_rows(1.0, 0.2, 0.2, "pass")
    unrecorded = Bench(path=tmp_path / "bench.json", meta={"preset": "mid"}, rows=rows)
    assert "not recorded" in speed_note(unrecorded.meta, rows) and "Ratios divide by" not in speed_note(unrecorded.meta, rows)
    verdicts = [line.rstrip(" |").rsplit("| ", 1)[-1] for line in targets_table([unrecorded]).splitlines()[2:]]
    assert verdicts[:4] == ["not measured"] * 4
    from_rows = [dict(row, ratios_divide_by="stock") for row in rows]
    assert "Ratios divide by the `stock` row" in speed_note({}, from_rows)
    assert targets_table([Bench(path=tmp_path / "bench.json", meta={}, rows=from_rows)]).count("| met |") >= 4


def test_each_mask_read_row_gets_its_own_overhead_target_and_sync_allowance():
    from hybrid_tools.report.targets import bench_targets

    rows = synthetic_bench_rows(1.10, 0.2, None, "") + [
        dict(config="vanilla_mask-read-once", method="vanilla", mask_read="once", batch_size=16, status="ok",
             prefill_ratio=1.01, sync_debug="pass: 1 sync(s) in the prefill (1 allowed), 0 in 8 decode steps (none allowed)"),
        dict(config="fastv-k64-l2_mask-read-once", method="fastv", fastv_k=64, mask_read="once", batch_size=16, status="ok",
             prefill_ratio=0.35, prefill_theory_ratio=0.25, sync_debug="pass")]
    found = {(name, row): (needed, verdict) for name, row, _, needed, verdict in bench_targets(rows)}
    assert found[("FastV K=64 prefill vs stock", "`fastv-k64-l2`")][1] == "met"  # 0.2 <= 0.30
    assert found[("FastV K=64 prefill vs stock", "`fastv-k64-l2_mask-read-once`")][1] == "missed"  # each row judged
    assert found[("engine overhead: prefill vs stock", "`vanilla`")][1] == "missed (slower)"
    assert found[("engine overhead: prefill vs stock", "`vanilla_mask-read-once`")][1] == "met"
    assert found[("host syncs (prefill + decode steps)", "`vanilla_mask-read-once`")] == ("≤ 1 per prompt, 0 per step", "met")
    assert found[("host syncs (prefill + decode steps)", "`vanilla`")] == ("0", "met")


def test_sync_target_needs_what_the_verdict_was_judged_by():
    """A verdict that states no allowance holds the row to its designed reads alone; DyMU's on the CPU, where the
    check does not apply, still shows the one read per prompt the check would allow it."""
    from hybrid_tools.report.targets import bench_targets
    from hybrid_vlm.syncs import NOT_APPLICABLE_DYMU

    rows = [dict(config="dymu-mid", method="dymu", dymu="mid.json", status="ok", sync_debug="fail: Tensor.item() cannot be called on meta tensors"),
            dict(config="dymu-low", method="dymu", dymu="low.json", status="ok", sync_debug=NOT_APPLICABLE_DYMU)]
    found = {row: (needed, verdict) for name, row, _, needed, verdict in bench_targets(rows) if name.startswith("host syncs")}
    assert found == {"`dymu-mid`": ("none beyond the row's designed reads, 0 per step", "missed"),
                     "`dymu-low`": ("≤ 1 per prompt, 0 per step", "not measured")}


def test_readme_demo_figures_quote_the_committed_demo_run():
    """The README's `python run.py` figures are the committed demo run's, read from its raw metric files."""
    readme = (REPO / "README.md").read_text()
    quoted = readme.split("<!-- testbed-demo:begin -->", 1)[1].split("<!-- testbed-demo:end -->", 1)[0]
    raw = REPO / "reports" / "testbed-demo" / "raw" / "outputs"
    models = ["llava_testbed", "llava_testbed_fastv__fastv-r0.5-l2", "llava_testbed_hybrid__dymu-testbed-mid_fastv-r0.5-l2"]
    overall = []
    for model in models:
        with open(raw / model / f"{model}_TinyMMBench_acc.csv", newline="") as handle:
            overall.append(100 * float(next(csv.DictReader(handle))["Overall"]))
    cider = [json.loads((raw / model / f"{model}_TinyCOCO_score.json").read_text())["CIDEr"] for model in models]
    expected = "Overall " + " / ".join(f"{v:.1f}" for v in overall) + " and CIDEr " + " / ".join(f"{v:.1f}" for v in cider)
    assert quoted == expected


def test_cpu_batch_mask_readme_quotes_its_raw_result():
    """The table and the figures in the text of reports/cpu-batch-mask/README.md are the committed run's."""
    folder = REPO / "reports" / "cpu-batch-mask"
    medians = json.loads((folder / "raw" / "result.json").read_text())["median_prefill_ms"]
    readme = (folder / "README.md").read_text()
    table = readme.split("<!-- cpu-batch-mask:begin -->", 1)[1].split("<!-- cpu-batch-mask:end -->", 1)[0]
    quoted = [line.strip("| ").split(" | ") for line in table.strip().splitlines()[2:]]
    assert {name: float(value) for name, value in quoted} == {name: round(value, 1) for name, value in medians.items()}
    never, once = (medians[name] for name in medians if "MASK_READ=never" in name or "MASK_READ=once" in name)
    assert f"cost the engine {never - once:.1f} ms" in readme and f"about {(never - once) / once * 100:.0f}%" in readme
    assert f"within {abs(once / medians['stock'] - 1) * 100:.1f}% of stock" in readme


def test_the_targets_table_names_the_gpu_each_verdict_was_measured_on():
    """At batch 1 a prefill ratio depends on the card's memory bandwidth: each bench's line names it."""
    from pathlib import Path

    from hybrid_tools.report.bench import Bench
    from hybrid_tools.report.targets import targets_table

    rows = synthetic_bench_rows(1.0, 0.2, 0.2, "pass")
    table = targets_table([Bench(Path("a"), dict(preset="llava-1.5-7b", batch_size=1, gpu="NVIDIA H200"), rows),
                           Bench(Path("b"), dict(preset="tiny", batch_size=1, cpu="some CPU"), rows)])
    assert "| llava-1.5-7b, batch 1, NVIDIA H200 |" in table and "| tiny, batch 1 |" in table


def _set_batch_sizes(work: Path, model: str, dataset: str, requested, rows_in_call=None) -> None:
    """Each row's --batch-size (`requested(index)`) and the rows its generate call held (default: as many)."""
    path = work / model / f"{model}_{dataset}_stats.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    rows_in_call = rows_in_call or requested
    path.write_text("".join(json.dumps(dict(r, batch_requested=requested(int(r["index"])), batch_size=rows_in_call(int(r["index"]))))
                            + "\n" for r in records))


def test_prefill_times_at_other_batch_sizes_are_not_compared_or_pooled(tmp_path):
    """A row records its whole batch's prefill. A run at batch 8 beside vanilla at batch 1 showed a
    "prefill vs vanilla" ratio of 10.6x (a review put reports/testbed-demo's FastV beside
    reports/testbed's vanilla); a folder resumed at another --batch-size pooled both sizes into one
    median. Now the ratio is left out (–) with a line naming both sizes, and a mixed folder gets no
    median, with a line saying why; runs at vanilla's size keep their ratio."""
    work = make_work_dir(tmp_path / "outputs", SYNTHETIC_7B)
    batched, mixed = [m for m in SYNTHETIC_7B if m != "llava_v1.5_7b"][:2]
    _set_batch_sizes(work, batched, MMB, lambda index: 8)
    _set_batch_sizes(work, mixed, MMB, lambda index: 1 if index < ROWS // 2 else 8)
    # one run at --batch-size 8 whose last call held 4 rows (12 = 8 + 4) is one setting, not a mix
    _set_batch_sizes(work, batched, COCO, lambda index: 8, lambda index: 8 if index < 8 else 4)
    _set_batch_sizes(work, "llava_v1.5_7b", COCO, lambda index: 8, lambda index: 8 if index < 8 else 4)
    assert run_report(work, "--name", "sizes", "--out", tmp_path / "reports") == 0
    out = tmp_path / "reports" / "sizes"
    markdown = (out / "report.md").read_text()
    entries = {e["model"]: e for e in json.loads((out / "report.json").read_text())["datasets"][MMB]}
    assert entries[batched]["prefill_ratio"] is None and entries[batched]["prefill_ms_median"] == pytest.approx(raw_stats(work, batched, MMB)["prefill_ms"])
    assert entries[mixed]["prefill_ms_median"] is None and entries[mixed]["prefill_ratio"] is None
    assert [key for key in entries[batched] if key.startswith("prefill_ms")] == ["prefill_ms_median"]  # one statistic of it
    captions = {e["model"]: e for e in json.loads((out / "report.json").read_text())["datasets"][COCO]}  # both at --batch-size 8
    vanilla_ms = raw_stats(work, "llava_v1.5_7b", COCO)["prefill_ms"]
    assert captions[batched]["batch_sizes"] == captions["llava_v1.5_7b"]["batch_sizes"] == [8]
    assert captions[batched]["prefill_ratio"] == pytest.approx(raw_stats(work, batched, COCO)["prefill_ms"] / vanilla_ms)
    section = markdown.split(f"### {MMB}", 1)[1].split("### ", 1)[0]
    assert f"at another batch size (ratio shown as –): `{batched}` (batch 8 vs batch 1)" in section
    assert f"so no median is given: `{mixed}` (batch 1/8)" in section


def test_recorded_commands_carry_every_setting_run_py_recorded(tmp_path):
    """The provenance block rebuilt each run's command from its run_info.json env, but only from six
    setting names: three pool runs (VISUAL_POOL=2/3/4) showed as one command without it, and random
    selection (FASTV_SELECT=random) as FastV's. Every recorded setting now goes in front."""
    work = make_work_dir(tmp_path / "outputs", SYNTHETIC_7B)
    model = next(m for m in SYNTHETIC_7B if m != "llava_v1.5_7b")
    record = {"command": f"python run.py --data {MMB} --model {model.split('__')[0]}",
              "env": {"FASTV_K": "72", "FASTV_SELECT": "random", "VISUAL_POOL": "3", "VISUAL_METHOD": ""}}
    (work / model / "run_info.json").write_text(json.dumps({"runs": [record]}))
    assert run_report(work, "--name", "commands", "--out", tmp_path / "reports") == 0
    markdown = (tmp_path / "reports" / "commands" / "report.md").read_text()
    assert f"FASTV_K=72 FASTV_SELECT=random VISUAL_POOL=3 {record['command']}    # run_info.json" in markdown


def test_a_models_pattern_that_matches_no_folder_is_refused(tmp_path, capsys):
    """--models llava_v1.5_7b_fastv (no '*') matched no folder, since a pattern matches whole names,
    and the report came out with vanilla alone, exit 0. It is a usage error naming the pattern now."""
    work = make_work_dir(tmp_path / "outputs", SYNTHETIC_7B)
    with pytest.raises(SystemExit) as exit_info:
        run_report(work, "--models", "llava_v1.5_7b_fastv", "--out", tmp_path / "reports")
    assert exit_info.value.code == 2 and "--models llava_v1.5_7b_fastv: no model folder matches" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a typo beside a good pattern is named too
        run_report(work, "--models", "llava_v1.5_7b_fastv*", "llava_v1.5_7b_hybrd*", "--out", tmp_path / "reports")
    assert exit_info.value.code == 2 and "--models llava_v1.5_7b_hybrd*: no model folder matches" in capsys.readouterr().err
    assert run_report(work, "--models", "llava_v1.5_7b_fastv*", "--out", tmp_path / "reports") == 0


def test_readme_testbed_cider_table_quotes_the_committed_testbed_runs():
    """Every CIDEr in the README's testbed table is one of reports/testbed's raw TinyCOCO score files
    (CIDEr x100, one decimal); the table had no test (found by review)."""
    import re

    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- testbed-cider:begin -->", 1)[1].split("<!-- testbed-cider:end -->", 1)[0]
    raw = REPO / "reports" / "testbed" / "raw" / "outputs"
    ciders = {f"{json.loads(path.read_text())['CIDEr']:.1f}" for path in raw.glob("*/*_TinyCOCO_score.json")}
    quoted = re.findall(r"\d+\.\d", table)
    assert len(quoted) >= 15 and len(ciders) >= 15
    assert [value for value in quoted if value not in ciders] == []

    # each value under its own label: the folder a label names at the row's budget holds that CIDEr
    def folder(label: str, budget: int) -> str:
        layer = re.search(r"at layer (\d)", label)
        if label.startswith("the hybrid"):
            return f"llava_testbed_hybrid__dymu-testbed-mid_fastv-k{budget}-l2"
        if label.startswith(("random", "FastV")):
            method = "random" if label.startswith("random") else "fastv"
            return f"llava_testbed_fastv__{method}-k{budget}-l{layer.group(1) if layer else 2}"
        side = re.match(r"(\d)x\d pooling", label)
        return f"llava_testbed_pool__pool-{side.group(1)}x{side.group(1)}"

    checked = 0
    for line in table.splitlines()[2:]:
        budget, *cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        text = re.sub(r"\(([^()]*)\)", lambda m: m.group(0) if re.search(r"\d\.\d", m.group(1)) else "", " ".join(cells))  # a label's gloss
        for label, value in re.findall(r"((?:\dx\d )?[A-Za-z][^,:()|]*?)(?:,? \d+ tokens)?:? (\d+\.\d)", text):
            score = raw / folder(label.strip(), int(budget)) / f"{folder(label.strip(), int(budget))}_TinyCOCO_score.json"
            assert f"{json.loads(score.read_text())['CIDEr']:.1f}" == value, (budget, label, value)
            checked += 1
    assert checked == len(quoted)


def test_a_device_runs_step_statuses_and_failed_tests_are_in_its_report(tmp_path):
    """The GPU run's pytest results and each step's exit status were copied into raw/ and never shown:
    a test failing on CUDA was invisible beside the figures."""
    from hybrid_tools.report.cli import main as report_main

    (tmp_path / "checks.log").write_text("== pytest (limit 70s): python3 -m pytest ...\n== pytest: rc=1 after 41s\n"
                                         "== parity: rc=0 after 12s\n== bench-bs16: rc=124 after 150s\n"
                                         "== bench-kernels (limit 90s): python3 -m hybrid_tools.bench ...\n"
                                         "== bench-kernels: rc=0 after 80s\n"  # a step run twice: both rows
                                         "== bench-kernels (limit 90s): python3 -m hybrid_tools.bench ...\n")  # the run stopped during it
    (tmp_path / "pytest.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.test_engine" name="test_a"/>'
        '<testcase classname="tests.test_dymu" name="test_b"><failure message="assert 1 == 2&#10;more">tb</failure></testcase>'
        '<testcase classname="tests.test_engine" name="test_c"><skipped message="needs CUDA"/></testcase>'
        '</testsuite></testsuites>')
    bench = REPO / "reports" / "tiny-demo" / "raw" / "bench"
    assert report_main(["--bench", str(bench), "--steps", str(tmp_path / "checks.log"), "--pytest", str(tmp_path / "pytest.xml"),
                        "--name", "device", "--out", str(tmp_path / "reports")]) == 0
    markdown = (tmp_path / "reports" / "device" / "report.md").read_text()
    assert "| pytest | 1 | failed | 41 |" in markdown and "| bench-bs16 | 124 | stopped at its time limit | 150 |" in markdown
    assert "| bench-kernels | 0 | done | 80 |\n| bench-kernels | – | not finished: the run was stopped during it | – |" in markdown
    assert "3 tests ran, 1 failed, 0 errors, 1 skipped:" in markdown
    assert "- tests.test_dymu::test_b: assert 1 == 2" in markdown
    assert "--steps" in markdown and "--pytest" in markdown  # in the command that regenerates it


def test_floors_name_the_configurations_at_or_below_them_on_the_committed_testbed_runs(tmp_path, capsys):
    """--floors: each floor is quoted from its file, with the configurations whose score does not rise
    above it, read here from the raw VLMEvalKit files; the random-letter floor is (1/n)^n per question
    of the committed TinyMMBench set, averaged."""
    import pandas as pd

    from vlmeval_plugin.tiny_data import build_mcq_table

    testbed = REPO / "reports" / "testbed"
    blind = json.loads((testbed / "blind_baselines.json").read_text())
    table = build_mcq_table()
    copies = table.groupby(table["index"].astype(int) % 1_000_000).size()  # circular copies = options per question
    expected = 100 * sum((1 / n) ** n for n in copies) / len(copies)
    assert blind["TinyMMBench"]["random_letter_circular_accuracy"] == round(expected, 1)

    floors = [testbed / "blind_baselines.json", testbed / "shuffled_captions.json"]
    assert run_report(testbed / "raw" / "outputs", "--name", "floors", "--out", tmp_path, "--floors", *floors) == 0
    markdown = (tmp_path / "floors" / "report.md").read_text()
    overall = {path.parent.name: 100 * float(pd.read_csv(path)["Overall"][0])
               for path in (testbed / "raw" / "outputs").glob("*/*_TinyMMBench_acc.csv")}
    chance = blind["TinyMMBench"]["random_letter_circular_accuracy"]
    line = next(text for text in markdown.splitlines() if text.startswith("- a random letter on every circular copy"))
    assert f"**{chance:.1f}**" in line
    listed = set(re.findall(r"`([^`]+)` \(", line.split("at or below it:")[1]))
    assert listed == {name for name, value in overall.items() if value <= chance} and listed
    prior = next(text for text in markdown.splitlines() if text.startswith("- text prior"))
    assert f"**{blind['TinyMMBench']['circular_accuracy']:.1f}**" in prior and prior.endswith("at or below it: every configuration")
    assert max(overall.values()) <= blind["TinyMMBench"]["circular_accuracy"]
    words = "zero one two three four five six seven eight nine ten".split()
    readme = " ".join((REPO / "README.md").read_text().split())
    assert (f"every TinyMMBench row is at or below the text prior ({blind['TinyMMBench']['circular_accuracy']:.1f}%), and "
            f"{words[len(listed)]} are at or below the {chance:.1f}% that a random letter") in readme
    ciders = [json.loads(path.read_text())["CIDEr"] for path in (testbed / "raw" / "outputs").glob("*/*_TinyCOCO_score.json")]
    assert ciders and min(ciders) > blind["TinyCOCO"]["cider"]
    assert "No TinyCOCO row is at or below the constant caption." in readme

    for name, text in (("other", '{"runs": []}'), ("list", "[1, 2]"), ("partial", '{"TinyMMBench": {"circular_accuracy": 3.0}}')):
        (tmp_path / f"{name}.json").write_text(text)
        assert run_report(testbed / "raw" / "outputs", "--name", "bad", "--out", tmp_path, "--floors", tmp_path / f"{name}.json") == 2
        assert f"--floors {tmp_path / name}.json: " in capsys.readouterr().err


def test_readme_testbed_intervals_are_the_method_comparisons():
    """The two paired intervals the README's testbed section quotes, in the committed comparison's
    rows they name: the hybrid at 32 vs random (mean of the seeds), random seed 0 at 16 vs FastV."""
    readme = " ".join((REPO / "README.md").read_text().split())
    table = (REPO / "reports" / "method-comparison-testbed" / "table.md").read_text()
    hybrid = next(line for line in table.splitlines() if line.startswith("| 32 | hybrid |"))
    random = next(line for line in table.splitlines() if line.startswith("| 16 | random | random-k16-l2 |"))
    vs_fastv, vs_random = (cell.strip() for cell in hybrid.split("|")[9:11])
    assert vs_random.startswith("+2.1 [-19.7, +30.7]") and "random (mean of 3 seeds) at 32 tokens at +2.1 [−19.7, +30.7]" in readme
    assert random.split("|")[9].strip().startswith("+13.2 [-6.0, +35.1]") and "FastV at 16 at +13.2 [−6.0, +35.1]" in readme


def test_data_keeps_only_the_named_sets_and_names_an_absent_one(tmp_path, capsys):
    """A sweep on one set reported every set its folders held (an earlier run's), and its printed
    regenerate command then changed with the folders; --data keeps the named ones, and is in that command."""
    work = make_work_dir(tmp_path / "outputs", SYNTHETIC_7B)
    assert run_report(work, "--name", "one", "--out", tmp_path / "reports", "--data", MMB) == 0
    markdown = (tmp_path / "reports" / "one" / "report.md").read_text()
    sections = re.findall(r"^### (\S+)", markdown, flags=re.M)
    assert sections == [MMB] and f"--data {MMB}" in markdown
    with pytest.raises(SystemExit) as exit_info:
        run_report(work, "--name", "two", "--out", tmp_path / "reports", "--data", "NoSuchSet")
    assert exit_info.value.code == 2 and "--data NoSuchSet: no model folder holds results of it" in capsys.readouterr().err


def test_a_score_equal_to_a_floor_counts_as_at_or_below_it():
    from types import SimpleNamespace

    from hybrid_tools.report.floors import Floor, floor_lines

    entries = [SimpleNamespace(main_value=value, config=SimpleNamespace(label=label)) for label, value in (("a", 25.0), ("b", 30.0))]
    linker = SimpleNamespace(link=lambda name, path: name)
    lines = floor_lines([Floor("chance", 25.0, Path("f.json"))], entries, linker)
    assert lines[2].endswith("at or below it: `a` (25.0)")


def test_what_the_reader_noted_reaches_an_mcq_section(tmp_path):
    """A metric file torn by a kill and stats records of rows the prediction file lacks: the reader
    notes both, and only a caption section printed notes, so an MCQ table showed a bare '–'."""
    work = make_work_dir(tmp_path / "outputs", SYNTHETIC_7B)
    model = "llava_v1.5_7b_fastv__fastv-k72-l2"
    (work / model / f"{model}_{MMB}_acc.csv").write_bytes(b'"split","Overall"\n"dev",0.4\n"dev","x\xff\n')
    stats = work / model / f"{model}_{MMB}_stats.jsonl"
    stats.write_text(stats.read_text() + json.dumps({"index": "99", "prediction": "A", "tokens_in": 9999, "tokens_kept": 9999, "prefill_s": 9.0}) + "\n")
    assert report.main([str(work), "--name", "r", "--out", str(tmp_path / "reports"), "--data", MMB]) == 0
    section = (tmp_path / "reports" / "r" / "report.md").read_text().split(f"### {MMB}", 1)[1]
    assert f"- `{model}`: metric file unreadable" in section
    assert f"- `{model}`: 1 stats records of rows the prediction file does not hold" in section


def test_missing_counts_show_no_ratio_and_no_none(tmp_path):
    """Vanilla without a stats file has no tokens kept: its 'kept vs vanilla' was '1×' beside '–'. A
    setting stopped before VLMEvalKit wrote its predictions was 'None rows' in the unpaired note."""
    work = make_work_dir(tmp_path / "outputs", SYNTHETIC_7B)
    (work / "llava_v1.5_7b" / f"llava_v1.5_7b_{COCO}_stats.jsonl").unlink()
    model = "llava_v1.5_7b_fastv__fastv-k72-l2"
    for suffix in (".xlsx", "_acc.csv"):
        (work / model / f"{model}_{MMB}{suffix}").unlink()
    stats = work / model / f"{model}_{MMB}_stats.jsonl"
    stats.write_text("".join(stats.read_text().splitlines(True)[:5]))
    assert report.main([str(work), "--name", "r", "--out", str(tmp_path / "reports")]) == 0
    markdown = (tmp_path / "reports" / "r" / "report.md").read_text()
    header = next(line for line in markdown.split(f"### {COCO}", 1)[1].splitlines() if line.startswith("| configuration"))
    cells = dict(zip([c.strip() for c in header.strip("|").split(" | ")], table_row(markdown, f"### {COCO}", "llava_v1.5_7b")))
    assert (cells["tokens kept"], cells["kept vs vanilla"]) == ("–", "–")
    assert "None" not in markdown and f"`{model}` (5 (stats only) rows, vanilla 12)" in markdown


def test_nothing_of_the_machine_reaches_a_report_of_files_outside_the_checkout(tmp_path, monkeypatch):
    """A work dir and --out outside the checkout: the links to raw files spelled out the machine's
    folders (../../../<scratch>/outputs/...), the Regenerate command held the absolute --out, and
    --snapshot committed VLMEvalKit's status.json with its absolute prediction paths."""
    checkout, scratch = tmp_path / "checkout", tmp_path / "machine-scratch-7f3a"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    work = make_work_dir(scratch / "outputs", SYNTHETIC_7B)
    status = work / "llava_v1.5_7b" / "status.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "prediction_file": str(work / "llava_v1.5_7b" / "p.xlsx")}))
    assert report.main([str(work), "--name", "r", "--out", str(scratch / "reports"), "--data", MMB]) == 0
    markdown = (scratch / "reports" / "r" / "report.md").read_text()
    assert "machine-scratch-7f3a" not in markdown and "machine-scratch-7f3a" not in (scratch / "reports" / "r" / "report.json").read_text()
    assert report.main([str(work), "--name", "s", "--snapshot", "--data", MMB]) == 0
    committed = [path.read_text(errors="replace") for path in (checkout / "reports" / "s").rglob("*") if path.is_file() and path.suffix != ".png"]
    assert committed and not any(str(tmp_path) in text for text in committed)
    assert "[metric](raw/" in (checkout / "reports" / "s" / "report.md").read_text()  # snapshotted files are linked


def test_snapshot_carries_the_single_file_inputs_and_regenerates_without_them(tmp_path, monkeypatch):
    """--parity and --recipe files outside the report were read but not copied: the committed
    report's Regenerate command named files only the author's machine had."""
    checkout, scratch = tmp_path / "checkout", tmp_path / "scratch"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    work = make_work_dir(scratch / "outputs", SYNTHETIC_7B)
    numbers = dict(max_abs_logit_diff=0.25, relative_logit_diff=0.01, top1_margin=0.5, greedy_tokens=3, greedy_tokens_shared=3,
                   first_parting_step=None, kept_positions_equal=True)
    (scratch / "parity.json").write_text(json.dumps(dict(meta={"preset": "tiny"}, comparisons={"pair": numbers}, complete=True)))
    (scratch / "make.sh").write_text("echo the recipe\n")
    assert report.main([str(work), "--name", "s", "--snapshot", "--data", MMB, "--parity", str(scratch / "parity.json"),
                        "--recipe", str(scratch / "make.sh")]) == 0
    folder = checkout / "reports" / "s"
    assert sorted(p.name for p in (folder / "raw" / "inputs").iterdir()) == ["make.sh", "parity.json"]
    first = (folder / "report.md").read_text()
    assert "scratch" not in first and "| pair | 0.25 |" in first and "echo the recipe" in first

    shutil.rmtree(scratch)  # regenerating needs nothing outside the report
    block = first.split("This report, from the raw files it read:", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert report.main(shlex.split(block)[3:]) == 0
    assert (folder / "report.md").read_text() == first

    kept = folder / "raw" / "parity.json"  # an input in raw/, and sources from outside: raw/ starts afresh
    shutil.copy(folder / "raw" / "inputs" / "parity.json", kept)
    work = make_work_dir(scratch / "outputs", SYNTHETIC_7B)
    assert report.main([str(work), "--name", "s", "--snapshot", "--data", MMB, "--parity", str(kept)]) == 0
    assert not kept.exists() and "| pair | 0.25 |" in (folder / "report.md").read_text()


def test_plot_draws_only_the_tables_metric(tmp_path, monkeypatch):
    """An entry whose metric file lacks the table's main metric ("Overall") was drawn with its own
    first metric on the same axis, under the first entry's label."""
    import matplotlib.axes

    from hybrid_tools.configs import Configuration, Entry
    from hybrid_tools.report.plots import plot_dataset

    def entry(name, metrics, main):
        config = Configuration.__new__(Configuration)
        config.name, config.vanilla, config.label = f"llava_v1.5_7b{name}", not name, name or "vanilla"
        return Entry(model=config.name, dataset=MMB, kind="mcq", metrics=metrics, main_metric=main, tokens_kept_mean=600.0,
                     prefill_ms_median=10.0, config=config)

    entries = [entry("", {"Overall": 40.0}, "Overall"), entry("_fastv__fastv-k64-l2", {"Overall": 30.0}, "Overall"),
               entry("_dymu__dymu-mid", {"scene": 90.0}, "scene")]
    drawn, plot = [], matplotlib.axes.Axes.plot

    def spy(self, xs, ys, **kwargs):
        drawn.extend(ys)
        return plot(self, xs, ys, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    assert plot_dataset(MMB, entries, "Overall", tmp_path / "p.png", tiny=False)
    assert sorted(drawn) == [30.0, 30.0, 40.0, 40.0]  # each axis: vanilla and fastv, never dymu's 90
    assert not plot_dataset(MMB, entries[2:], "Overall", tmp_path / "q.png", tiny=False)


def test_plot_lines_vary_only_the_budget_and_the_prefill_axis_names_its_batches():
    """A method's budgets are one line (visionzip-b192 and -b64 were a legend entry each), two seeds
    of random selection are two lines (they were drawn as one zig-zag), and prefill times of batched
    rows are per batch, as the axis now says (it said per row)."""
    from hybrid_tools.configs import Configuration
    from hybrid_tools.report.plots import prefill_axis_label

    def method(tag):
        config = Configuration.__new__(Configuration)
        config.name, config.vanilla = f"llava_v1.5_7b_x__{tag}", False
        return config.method

    assert method("visionzip-b192") == method("visionzip-b64") == "visionzip"
    assert method("visionzip-b0.11-per-crop") == "visionzip-per-crop" and method("pdrop-b64_renumbered") == "pdrop + renumbered"
    assert method("dart-b128-l2") == "dart-l2" and method("divprune-b64_fastv-k16-l2") == "divprune + FastV L2"
    assert method("random-k64-l2-s1") == "random L2 seed 1" != method("random-k64-l2-s2")
    assert method("fastv-k64-l2") == method("fastv-r0.5-l2") == "FastV L2"
    assert prefill_axis_label([1]) == "median prefill ms per row (vision + LLM)"
    assert prefill_axis_label([1, 8]) == "median prefill ms per batch (vision + LLM; batch sizes 1, 8)"


def test_a_ratio_beside_its_verdict_shows_the_side_of_the_bound_it_is_on():
    """1.0304 against a band ending at 1.030 was shown as '1.030' beside 'missed (slower)'; a ratio of
    0 (a row timed at nothing) raised ZeroDivisionError in its speed-up."""
    from hybrid_tools.report.targets import bench_targets

    just_over = bench_targets(synthetic_bench_rows(1.0304, 0.2, 0.2, "pass"))[0]
    assert just_over[2].startswith("1.0304 ") and just_over[-1] == "missed (slower)"
    assert bench_targets(synthetic_bench_rows(1.02, 0.2, 0.2, "pass"))[0][2].startswith("1.020 ")  # clear of the bound: 3 decimals
    assert bench_targets(synthetic_bench_rows(1.03, 0.2, 0.2, "pass"))[0][2].startswith("1.030 ")  # on it exactly
    zero = bench_targets(synthetic_bench_rows(0.0, 0.2, 0.2, "pass"))[0]
    assert zero[2] == "0.000 (–)" and zero[-1] == "missed (faster)"


def test_readme_next_methods_prose_quotes_the_committed_bench():
    """The range of ratio − theory over the NeXT method rows, and VisPruner's cost before the LLM
    beside stock's, as reports/cpu-next-methods/raw holds them."""
    readme = (REPO / "README.md").read_text()
    rows = {row["config"]: row for row in json.loads((REPO / "reports/cpu-next-methods/raw/bench/bench.json").read_text())["rows"]}
    prose = readme.split("<!-- cpu-next-methods-prose:begin -->", 1)[1].split("<!-- cpu-next-methods-prose:end -->", 1)[0]
    gaps = [row["prefill_ratio_minus_theory"] for row in rows.values() if row["method"] not in ("stock", "vanilla")]
    vispruner, stock = rows["vispruner-b0.11"], rows["stock"]
    assert max(gaps) == vispruner["prefill_ratio_minus_theory"]
    assert re.findall(r"[+-]?\d[\d,]*\.?\d*", prose) == [
        f"{min(gaps):+.3f}", f"{max(gaps):+.3f}", "2,304", f"{vispruner['vision_gmacs']:.1f}", f"{stock['vision_gmacs']:.1f}",
        f"{vispruner['vision_ms']:.0f}", f"{stock['vision_ms']:.0f}"]
