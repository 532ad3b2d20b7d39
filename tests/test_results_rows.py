"""The per-row statistics a results folder reports describe the same rows as its metric."""

from __future__ import annotations

import json
import statistics

import pandas as pd
import pytest

from vlmeval_plugin.results import read_dataset

MODEL, DATASET = "llava_tiny_fastv", "TinyCOCO"


def test_stats_of_rows_outside_the_prediction_file_are_left_out_of_the_means(tmp_path):
    """A folder first run on five rows and then rerun with --limit 2 holds five stats records and
    a two-row prediction file: the means (and the failed rows) must be those two rows' only."""
    pd.DataFrame({"index": [0, 1], "prediction": ["a", "b"]}).to_csv(tmp_path / f"{MODEL}_{DATASET}.tsv", sep="\t", index=False)
    records = [dict(index=str(i), prediction="x", tokens_in=100 * (i + 1), prefill_s=0.01 * (i + 1)) for i in range(5)]
    records[3]["error"] = "a bad image cell"
    with open(tmp_path / f"{MODEL}_{DATASET}_stats.jsonl", "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)

    result = read_dataset(tmp_path, MODEL, DATASET)
    assert result.rows == 2 and result.stats_rows == 2
    assert result.tokens_in_mean == statistics.fmean([100, 200])
    assert result.prefill_ms_median == 1000 * statistics.median([0.01, 0.02])
    assert result.failed_rows == []  # row 3 failed in a run whose rows are not the ones scored
    assert any("3 stats records" in note for note in result.notes), result.notes


def test_prefill_time_is_the_median_of_the_rows_and_older_records_stand_for_their_largest_batch(tmp_path):
    """Skewed prefill times (10, 20, 90 ms: mean 40) give 20 ms. Records written before
    `batch_requested` existed carry only their call's size, which a rank's last batch makes smaller
    (8, 8, 4): they stand for one --batch-size, 8, so the median stands too."""
    pd.DataFrame({"index": [0, 1, 2], "prediction": ["a"] * 3}).to_csv(tmp_path / f"{MODEL}_{DATASET}.tsv", sep="\t", index=False)
    records = [dict(index=str(i), prediction="a", prefill_s=s, batch_size=b) for i, (s, b) in enumerate(zip([0.01, 0.09, 0.02], [8, 8, 4]))]
    with open(tmp_path / f"{MODEL}_{DATASET}_stats.jsonl", "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    result = read_dataset(tmp_path, MODEL, DATASET)
    assert result.batch_sizes == [8]
    assert abs(result.prefill_ms_median - 20.0) < 1e-9


def test_without_a_readable_prediction_file_every_record_counts(tmp_path):
    with open(tmp_path / f"{MODEL}_{DATASET}_stats.jsonl", "w") as handle:
        handle.writelines(json.dumps(dict(index=str(i), prediction="x", tokens_in=10 * i)) + "\n" for i in range(3))
    result = read_dataset(tmp_path, MODEL, DATASET)
    assert result.rows is None and result.stats_rows == 3 and result.tokens_in_mean == 10.0 and result.notes == []
    from vlmeval_plugin.results import summary_table

    line = summary_table([result]).splitlines()[-1].split()  # run.py's table says what the report says, not "0"
    assert line[:5] == [MODEL, DATASET, "3", "(stats", "only)"]


def write_folder(work, model, indices, failed=None):
    folder = work / model
    folder.mkdir(parents=True)
    pd.DataFrame({"index": indices, "prediction": ["a"] * len(indices)}).to_csv(folder / f"{model}_{DATASET}.tsv", sep="\t", index=False)
    with open(folder / f"{model}_{DATASET}_stats.jsonl", "w") as handle:
        for index in indices:
            record = dict(index=str(index), prediction="a", tokens_in=100, tokens_kept=50, prefill_s=0.01, setting="stock" if model == "llava_tiny" else "fastv")
            if index == failed:
                record = dict(index=str(index), prediction="Failed to obtain answer: a bad image cell", error="a bad image cell")
            handle.write(json.dumps(record) + "\n")


def test_reports_name_failed_rows_and_compare_only_runs_on_the_same_rows(tmp_path):
    """A run whose prediction file holds other rows than vanilla's gets no Δ or ratios (they would
    compare different questions), and each failed row is listed with its reason."""
    from hybrid_tools.report.cli import main as report_main

    work = tmp_path / "work"
    write_folder(work, "llava_tiny", [0, 1, 2])
    write_folder(work, "llava_tiny_fastv__fastv-k64-l2", [0, 1])
    write_folder(work, "llava_tiny_fastv__fastv-k32-l2", [0, 1, 2], failed=2)
    write_folder(work, "llava_tiny_fastv__fastv-k16-l2", [0, 1, 3])  # as many rows, not the same ones
    report_main([str(work), "--name", "rows", "--out", str(tmp_path / "reports")])
    markdown = (tmp_path / "reports" / "rows" / "report.md").read_text()
    assert "Not compared with vanilla, whose rows, checkpoint or device differ (Δ and ratios shown as –): " in markdown, markdown
    assert "`llava_tiny_fastv__fastv-k64-l2` (2 rows, vanilla 3)" in markdown
    assert "`llava_tiny_fastv__fastv-k32-l2` row 2 (a bad image cell)" in markdown
    assert "`llava_tiny_fastv__fastv-k16-l2` (3 rows, other ones than vanilla's)" in markdown
    entries = {e["model"]: e for e in json.loads((tmp_path / "reports" / "rows" / "report.json").read_text())["datasets"][DATASET]}
    assert entries["llava_tiny_fastv__fastv-k64-l2"]["reference"] is None and entries["llava_tiny_fastv__fastv-k64-l2"]["unpaired"]
    assert entries["llava_tiny_fastv__fastv-k32-l2"]["reference"] is not None
    assert entries["llava_tiny_fastv__fastv-k32-l2"]["failed_rows"] == [{"index": "2", "reason": "a bad image cell"}]


def test_a_torn_metric_file_leaves_its_dataset_without_a_metric_and_the_others_read(tmp_path):
    """An empty acc file (a kill while VLMEvalKit wrote it) ended run.py's summary and the whole
    report with pandas' EmptyDataError."""
    from vlmeval_plugin import results

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "m_A_acc.csv").write_text("")
    (folder / "m_B_acc.csv").write_text("split,Overall\ndev,0.5\n")
    torn, intact = results.read_dataset(folder, "m", "A"), results.read_dataset(folder, "m", "B")
    assert torn.main_value is None and any("metric file unreadable" in note for note in torn.notes)
    assert intact.main_value == 50.0


def test_of_two_prediction_files_left_by_a_rerun_under_another_pred_format_the_newer_is_read(tmp_path):
    """A folder run with --limit 12 as xlsx, then rerun as tsv with 16 rows: VLMEvalKit scored the
    tsv, so its rows are the ones counted (the xlsx came first in the suffix order)."""
    import os

    import pandas as pd

    from vlmeval_plugin.results import prediction_file

    older, newer = tmp_path / "m_TinyCOCO.xlsx", tmp_path / "m_TinyCOCO.tsv"
    pd.DataFrame({"index": range(12), "prediction": ["a"] * 12}).to_excel(older, index=False)
    pd.DataFrame({"index": range(16), "prediction": ["b"] * 16}).to_csv(newer, sep="\t", index=False)
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    assert prediction_file(tmp_path, "m", "TinyCOCO") == newer
    os.utime(older, ns=(2 * 10**18, 2 * 10**18))
    assert prediction_file(tmp_path, "m", "TinyCOCO") == older
    assert prediction_file(tmp_path, "m", "TinyMMBench") is None
    # then `--mode eval` under PRED_FORMAT=tsv scores the tsv without writing it: status.json says which
    status = {"datasets": {"TinyCOCO": {"status": "done", "prediction_file": f"work/m/{newer.name}"}}}
    (tmp_path / "status.json").write_text(json.dumps(status))
    assert prediction_file(tmp_path, "m", "TinyCOCO") == newer


def test_a_run_on_another_checkpoint_or_device_is_not_set_against_vanilla(tmp_path):
    """Folders are paired with vanilla by name, across work dirs too: a FastV run made on CUDA from
    another checkpoint than vanilla's (its run_info.json says so) gets no Δ or prefill ratio, and a
    vanilla of the same checkpoint and device, where there is one, is preferred."""
    from hybrid_tools.configs import collect, comparison_reference, prefill_ratio

    def record(folder, signature, device):
        (folder / "run_info.json").write_text(json.dumps({"runs": [dict(mode="all", checkpoint_signature=signature, device=device)]}))

    work = tmp_path / "work"
    write_folder(work, "llava_tiny", [0, 1, 2])
    write_folder(work, "llava_tiny_fastv__fastv-k64-l2", [0, 1, 2])
    record(work / "llava_tiny", "sha256:aaaa", "cpu")
    record(work / "llava_tiny_fastv__fastv-k64-l2", "sha256:bbbb", "cuda")
    fastv = next(c for c in collect(work, ["llava_tiny_fastv__fastv-k64-l2"]) if not c.vanilla).entries[DATASET]
    assert comparison_reference(fastv) is None and prefill_ratio(fastv, fastv.reference) is None
    assert fastv.unpaired == "checkpoint sha256:bbbb, vanilla's sha256:aaaa; device cuda, vanilla's cpu"

    record(work / "llava_tiny_fastv__fastv-k64-l2", "sha256:aaaa", "cpu")  # the same run as vanilla's
    fastv = next(c for c in collect(work, ["llava_tiny_fastv__fastv-k64-l2"]) if not c.vanilla).entries[DATASET]
    assert comparison_reference(fastv) is not None and not fastv.unpaired and prefill_ratio(fastv, fastv.reference) == 1.0


def test_the_vanilla_of_the_same_checkpoint_and_device_is_preferred_over_the_one_beside_it(tmp_path):
    """Two work dirs, each with a vanilla: the FastV run made on CUDA from checkpoint bbbb pairs with
    the other dir's vanilla of that checkpoint and device, not with the CPU vanilla in its own dir."""
    from hybrid_tools.configs import assign_references, configurations

    def record(folder, signature, device):
        (folder / "run_info.json").write_text(json.dumps({"runs": [dict(mode="all", checkpoint_signature=signature, device=device)]}))

    own, other = tmp_path / "own", tmp_path / "other"
    write_folder(own, "llava_tiny", [0, 1, 2])
    write_folder(own, "llava_tiny_fastv__fastv-k64-l2", [0, 1, 2])
    write_folder(other, "llava_tiny", [0, 1, 2])
    record(own / "llava_tiny", "sha256:aaaa", "cpu")
    record(own / "llava_tiny_fastv__fastv-k64-l2", "sha256:bbbb", "cuda")
    record(other / "llava_tiny", "sha256:bbbb", "cuda")
    configs = configurations(own) + configurations(other)
    assign_references(configs)
    fastv = next(c for c in configs if not c.vanilla)
    assert fastv.reference.work_dir == other and not fastv.entries[DATASET].unpaired
    assert fastv.entries[DATASET].reference is fastv.reference.entries[DATASET]


def test_the_summary_counts_failed_rows_beside_the_rows(tmp_path):
    """run.py's table showed "rows 16" for a set where 4 rows failed (scored as misses): it now says so."""
    from vlmeval_plugin.results import summary_table

    write_folder(tmp_path, MODEL, [0, 1, 2, 3], failed=2)
    result = read_dataset(tmp_path / MODEL, MODEL, DATASET)
    assert result.rows == 4 and [index for index, _ in result.failed_rows] == ["2"]
    assert summary_table([result]).splitlines()[-1].split()[:5] == [MODEL, DATASET, "4", "(1", "failed)"]


def test_an_mcq_table_of_several_splits_reports_the_dev_row(tmp_path):
    """report_acc writes a row per split; MMBench_DEV_EN's scores are its dev row, wherever it lies."""
    from vlmeval_plugin.results import read_acc_metrics

    path = tmp_path / "acc.csv"
    path.write_text("split,Overall,counting\ntest,0.2,0.1\ndev,0.7,0.45\n")
    metrics, split, kind = read_acc_metrics(path)
    assert split == "dev" and metrics == {"Overall": 70.0, "counting": 45.0} and kind == "mcq"
    path.write_text("split,Overall\ntest,0.2\n")  # no dev row: the only one there is
    assert read_acc_metrics(path) == ({"Overall": 20.0}, "test", "mcq")


def test_a_vqa_set_s_accuracy_is_read_as_vlmevalkit_wrote_it(tmp_path):
    """VLMEvalKit's VQA sets (GQA, TextVQA, ChartQA, ...) write their `_acc` table already in percent,
    without report_acc's split column: it was multiplied by 100 again (3 of 4 right read as 7500)."""
    pytest.importorskip("vlmeval")
    from types import SimpleNamespace

    from vlmeval.dataset.image_vqa import ImageVQADataset

    model, name = "m", "GQA_TestDev_Balanced"
    eval_file = tmp_path / f"{model}_{name}.xlsx"
    pd.DataFrame({"index": [0, 1, 2, 3], "question": ["q"] * 4, "answer": ["cat", "dog", "red", "two"],
                  "prediction": ["cat", "dog", "red", "three"]}).to_excel(eval_file, index=False)
    ImageVQADataset.evaluate_heuristic(SimpleNamespace(dataset_name=name), str(eval_file))  # VLMEvalKit's own scoring
    found = read_dataset(tmp_path, model, name)
    assert found.main_value == pytest.approx(75.0) and found.kind == "other"
