"""`python -m hybrid_tools.sweep`: the grids of the one-command ablations, and one real sweep on the tiny model.

The grid tests use --dry-run (nothing runs; vlmeval is imported only to check the --data names). The end-to-end test runs two
settings through run.py on the tiny LLaVA (a few captions each) and checks the table, the CSV, the
sweep record and the report it writes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from hybrid_tools import sweep
from vlmeval_plugin import settings

REPO = Path(__file__).resolve().parents[1]
needs_vlmeval = pytest.mark.skipif(importlib.util.find_spec("vlmeval") is None, reason="ms-vlmeval is not installed")
VANILLA = "llava_v1.5_7b"


def planned(capsys, *argv) -> list[str]:
    """The results folders a dry run plans, in order."""
    assert sweep.main([*argv, "--dry-run"]) == 0
    output = capsys.readouterr().out
    return re.findall(r"^  (\S+)$", output, flags=re.M)


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("FASTV_K", "FASTV_LAYER", "DYMU_THRESHOLDS", "DYMU_SPLIT", "HYBRID_POSITIONS", "MMEVAL_ROOT"):
        monkeypatch.delenv(key, raising=False)


# the plan reads a thresholds file's shape (its model is checked when a run loads it); its stem names the setting
WELL_FORMED_THRESHOLDS = json.dumps({"format": "hybrid-vlm/dymu-thresholds/v2", "split": "official", "model": {}, "thresholds": [0.5]})


@pytest.fixture
def thresholds(tmp_path):
    path = tmp_path / "mid.json"
    path.write_text(WELL_FORMED_THRESHOLDS)
    return str(path)


def test_existing_fastv_k_sweep_is_unchanged(capsys, clean_env):
    assert planned(capsys, "--data", "X", "--fastv-k", "576", "72", "0.5", "--vanilla") == [
        VANILLA, "llava_v1.5_7b_fastv__fastv-k576-l2", "llava_v1.5_7b_fastv__fastv-k72-l2", "llava_v1.5_7b_fastv__fastv-r0.5-l2",
    ]


def test_a_setting_inherited_from_the_environment_is_part_of_each_runs_recorded_command(capsys, clean_env, monkeypatch):
    """FASTV_LAYER=3 set in the shell makes the folder `...-l3`: the run's recorded settings name it
    (they held FASTV_K alone, a command that makes `...-l2`), and a name that does not read it
    (DivPrune) does not record it."""
    monkeypatch.setenv("FASTV_LAYER", "3")
    assert sweep.main(["--data", "X", "--model", "fastv", "divprune", "--fastv-k", "72", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    settings_of = {folder.strip(): command.split()[: next(i for i, word in enumerate(command.split()) if "python" in word)]
                   for folder, command in zip(lines, lines[1:]) if folder.startswith("  llava")}
    assert settings_of["llava_v1.5_7b_fastv__fastv-k72-l3"] == ["FASTV_K=72", "FASTV_LAYER=3"]
    assert [settings for folder, settings in settings_of.items() if "divprune" in folder] == [[]]


def test_a_layer_beyond_the_checkpoints_llm_is_refused_before_the_first_run(capsys, clean_env):
    """The tiny LLaVA has 4 layers: FASTV_LAYER=5 was refused by run.py only when its turn came,
    after the layer-2 run had taken its time; the plan now refuses it, naming the range."""
    status = sweep.main(["--family", "tiny", "--data", "TinyCOCO", "--model", "fastv", "--fastv-layer", "2", "5", "--launcher", "false"])
    captured = capsys.readouterr()
    assert status == 2 and "FASTV_LAYER=5 is not valid: use 1..3 for this 4-layer LLM" in captured.err
    assert "=== " not in captured.out  # no run started


def test_a_dry_run_writes_nothing_not_even_the_tiny_model(capsys, clean_env, tmp_path, monkeypatch):
    """The depth check resolves checkpoints; under --dry-run it must not build the tiny model."""
    monkeypatch.setenv("HYBRID_VLM_CACHE", str(tmp_path / "cache"))
    assert sweep.main(["--family", "tiny", "--data", "TinyCOCO", "--model", "fastv", "--fastv-layer", "2", "--dry-run"]) == 0
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_fastv_layer_and_k_ablations(capsys, clean_env):
    assert planned(capsys, "--data", "X", "--ablation", "fastv-layer") == [
        VANILLA, "llava_v1.5_7b_fastv__fastv-r0.5-l1", "llava_v1.5_7b_fastv__fastv-r0.5-l2", "llava_v1.5_7b_fastv__fastv-r0.5-l3",
    ]
    assert planned(capsys, "--data", "X", "--fastv-layer", "1", "3", "--fastv-k", "64") == [
        "llava_v1.5_7b_fastv__fastv-k64-l1", "llava_v1.5_7b_fastv__fastv-k64-l3",
    ]
    assert planned(capsys, "--data", "X", "--ablation", "fastv-k")[1:] == [
        f"llava_v1.5_7b_fastv__fastv-k{k}-l2" for k in (576, 288, 144, 72, 36)
    ]


def test_dymu_hybrid_and_position_ablations(capsys, clean_env, thresholds, tmp_path):
    low, high = tmp_path / "low.json", tmp_path / "high.json"
    low.write_text(WELL_FORMED_THRESHOLDS)
    high.write_text(WELL_FORMED_THRESHOLDS)
    assert planned(capsys, "--data", "X", "--ablation", "dymu-level", "--dymu", str(low), thresholds, str(high)) == [
        VANILLA, "llava_v1.5_7b_dymu__dymu-low", "llava_v1.5_7b_dymu__dymu-mid", "llava_v1.5_7b_dymu__dymu-high",
    ]
    assert planned(capsys, "--data", "X", "--ablation", "hybrid-vs-alone", "--dymu", thresholds, "--fastv-k", "64") == [
        VANILLA, "llava_v1.5_7b_fastv__fastv-k64-l2", "llava_v1.5_7b_dymu__dymu-mid", "llava_v1.5_7b_hybrid__dymu-mid_fastv-k64-l2",
    ]
    folders = planned(capsys, "--data", "X", "--ablation", "positions", "--dymu", thresholds)
    assert folders == [
        VANILLA, "llava_v1.5_7b_fastv__fastv-r0.5-l2", "llava_v1.5_7b_fastv__fastv-r0.5-l2_renumbered",
        "llava_v1.5_7b_hybrid__dymu-mid_fastv-r0.5-l2", "llava_v1.5_7b_hybrid__dymu-mid_fastv-r0.5-l2_renumbered",
    ]
    # DyMU alone reads HYBRID_POSITIONS too: merged tokens keep their representative patch's position or are renumbered
    folders = planned(capsys, "--data", "X", "--ablation", "positions", "--model", "dymu", "--dymu", thresholds)
    assert folders == [VANILLA, "llava_v1.5_7b_dymu__dymu-mid", "llava_v1.5_7b_dymu__dymu-mid_renumbered"]


def test_dymu_split_axis_and_ablation(capsys, clean_env, thresholds):
    assert planned(capsys, "--data", "X", "--ablation", "dymu-split", "--dymu", thresholds) == [
        VANILLA, "llava_v1.5_7b_dymu__dymu-mid", "llava_v1.5_7b_dymu__dymu-mid_split-slot",
    ]
    # the axis crosses the others; FastV alone ignores it (one run)
    assert planned(capsys, "--data", "X", "--model", "fastv", "hybrid", "--dymu", thresholds, "--dymu-split", "official", "slot",
                   "--fastv-k", "64") == [
        "llava_v1.5_7b_fastv__fastv-k64-l2", "llava_v1.5_7b_hybrid__dymu-mid_fastv-k64-l2",
        "llava_v1.5_7b_hybrid__dymu-mid_split-slot_fastv-k64-l2",
    ]
    assert sweep.main(["--data", "X", "--dymu-split", "slot", "--dry-run"]) == 2
    assert "--dymu-split needs --dymu" in capsys.readouterr().err
    assert sweep.main(["--data", "X", "--ablation", "dymu-split", "--dry-run"]) == 2
    assert "needs --dymu" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the accepted values
        sweep.main(["--data", "X", "--dymu", thresholds, "--dymu-split", "raster", "--dry-run"])
    assert "official" in capsys.readouterr().err


def test_bad_requests_stop_before_running(capsys, clean_env, thresholds):
    cases = [
        (["--ablation", "dymu-level"], "needs --dymu"),
        (["--ablation", "hybrid-vs-alone", "--dymu", thresholds, thresholds], "exactly one --dymu"),
        (["--ablation", "scoring"], "python -m hybrid_tools.bench"),
        (["--dymu", "low"], "--calibrate-images"),
        (["--dymu", "nofile.json"], "no such file"),
        (["--model", "dymu"], "needs DyMU thresholds"),
        (["--model", "llava_tiny_fastv", "--family", "llava_v1.5_7b", "--fastv-k", "64"], "the llava_tiny names run with --family tiny"),
        (["--model", "llava_v1.5_7b_fastvv", "--fastv-k", "64"], "did you mean llava_v1.5_7b_fastv"),
        (["--fastv-layer", "0"], "--fastv-layer 0: FASTV_LAYER='0' is not valid"),
        (["--fastv-k", "-3"], "--fastv-k -3: FASTV_K='-3' is not valid"),
        ([], "nothing to sweep"),
    ]
    for extra, message in cases:
        assert sweep.main(["--data", "X", *extra, "--dry-run"]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_full_names_set_the_family_and_an_unknown_dataset_stops_a_real_sweep(capsys, clean_env):
    """--model llava_tiny_fastv was refused without --family tiny, listing ~60 other names; a typo in
    --data ran every planned run, each skipped by VLMEvalKit, and the sweep exited 1."""
    assert planned(capsys, "--data", "TinyCOCO", "--model", "llava_tiny_fastv", "--fastv-k", "64") == ["llava_tiny_fastv__fastv-k64-l2"]
    assert sweep.main(["--data", "TinyMMBnech", "--model", "llava_tiny_fastv", "--fastv-k", "64", "--launcher", "false"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset name(s) 'TinyMMBnech' (did you mean TinyMMBench" in err
    assert sweep.main(["--data", "TinyMMBnech", "--model", "llava_tiny_fastv", "--fastv-k", "64", "--dry-run"]) == 0
    assert "note: unknown dataset name(s) 'TinyMMBnech'" in capsys.readouterr().out
    qwen = "Qwen2.5-VL-7B-Instruct"
    assert sweep.main(["--family", qwen, "--data", "MVBench", "--model", "fastv", "--fastv-k", "0.5", "--launcher", "false"]) == 2
    assert f"{qwen}_fastv on the video set(s) MVBench" in capsys.readouterr().err


def test_a_dry_run_starts_quietly():
    """Every dry run printed VLMEvalKit's `ERROR ... Did not detect the .env file` line (from the
    import that checks --data), which reads as a failure before the plan; run.py already hid it."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "hybrid_tools.sweep", "--model", "llava_tiny_fastv", "--data", "TinyMMBench", "--fastv-k", "64", "--dry-run"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "llava_tiny_fastv__fastv-k64-l2" in done.stdout
    assert "Did not detect the .env file" not in done.stdout + done.stderr


def test_an_interrupted_sweep_says_how_to_resume(capsys, clean_env, monkeypatch, tmp_path):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_all", interrupted)
    assert sweep.main(["--data", "TinyCOCO", "--model", "llava_tiny_fastv", "--fastv-k", "64", "--work-dir", str(tmp_path)]) == 130
    assert "interrupted. Finished runs and the rows written so far are kept" in capsys.readouterr().err


def test_the_run_in_flight_at_an_interrupt_is_in_the_sweep_record(capsys, clean_env, monkeypatch, tmp_path):
    """Ctrl-C during the second run: the plugin keeps that run's rows, but the record listed only the
    first run, so the second folder had no sweep provenance until it ran again."""
    calls, real_run = [], subprocess.run

    def fake_run(command, **kwargs):
        if "env" not in kwargs:  # git and the like
            return real_run(command, **kwargs)
        calls.append(command)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    status = sweep.main(["--data", "TinyCOCO", "--model", "llava_tiny_fastv", "--fastv-k", "64", "32", "--work-dir", str(tmp_path)])
    assert status == 130
    runs = json.loads(next(tmp_path.glob("sweep_*.json")).read_text())["runs"]
    assert [(run["folder"], run["returncode"], run.get("interrupted")) for run in runs] == [
        ("llava_tiny_fastv__fastv-k64-l2", 0, None), ("llava_tiny_fastv__fastv-k32-l2", 130, True)]


def test_every_setting_a_name_reads_is_swept(capsys, clean_env, monkeypatch):
    """random reads FASTV_K and FASTV_LAYER, dart FASTV_LAYER (settings_read): the plan dropped
    both axes for them (one run at the default, or at the environment's FASTV_K)."""
    for key in ("FASTV_SELECT", "VISUAL_BUDGET", "SELECT_SEED"):
        monkeypatch.delenv(key, raising=False)
    assert planned(capsys, "--data", "X", "--model", "random", "--fastv-k", "64", "32", "--fastv-layer", "1", "3") == [
        f"llava_v1.5_7b_random__random-k{k}-l{layer}" for k in (64, 32) for layer in (1, 3)
    ]
    assert planned(capsys, "--data", "X", "--methods", "dart", "--budgets", "64", "--fastv-layer", "1", "3") == [
        "llava_v1.5_7b_dart__dart-b64-l1", "llava_v1.5_7b_dart__dart-b64-l3",
    ]
    monkeypatch.setenv("FASTV_K", "64")
    assert planned(capsys, "--data", "X", "--model", "random", "--fastv-layer", "3") == ["llava_v1.5_7b_random__random-k64-l3"]


def test_a_setting_no_planned_name_reads_is_refused(capsys, clean_env, thresholds):
    assert sweep.main(["--data", "X", "--methods", "visionzip", "--budgets", "64", "--fastv-k", "64", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "--fastv-k 64: none of the planned names (llava_v1.5_7b_visionzip) reads FASTV_K" in error
    assert "the names that read it: fastv, hybrid, pool, random" in error
    assert sweep.main(["--data", "X", "--model", "fastv", "--fastv-k", "64", "--dymu", thresholds, "--dry-run"]) == 2
    assert f"--dymu {thresholds}: none of the planned names (llava_v1.5_7b_fastv) reads DYMU_THRESHOLDS" in capsys.readouterr().err
    # read by one of the names: the others run once, as before
    assert planned(capsys, "--data", "X", "--model", "fastv", "dymu", "--fastv-k", "64", "--dymu", thresholds) == [
        "llava_v1.5_7b_fastv__fastv-k64-l2", "llava_v1.5_7b_dymu__dymu-mid",
    ]


def test_threshold_files_sharing_a_name_are_one_setting_only_when_they_are_equal(capsys, clean_env, tmp_path):
    """The folder names a threshold file by its stem: a/mid.json and b/mid.json with different
    thresholds were merged as one setting and only the first ran."""
    for folder, thresholds in (("a", [0.5]), ("b", [0.9]), ("c", [0.5])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mid.json").write_text(WELL_FORMED_THRESHOLDS.replace("[0.5]", str(thresholds)))
    a, b, c = (str(tmp_path / folder / "mid.json") for folder in "abc")
    assert sweep.main(["--data", "X", "--model", "dymu", "--dymu", a, b, "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert f"--dymu {a} and {b}: different contents, same name" in error and "rename one" in error
    assert planned(capsys, "--data", "X", "--model", "dymu", "--dymu", a, c, a) == ["llava_v1.5_7b_dymu__dymu-mid"]
    # the testbed's level name "mid" is its shipped file: another testbed-mid.json is compared with that
    import json

    from vlmeval_plugin.settings import testbed_thresholds

    shipped = json.loads(testbed_thresholds("mid").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "testbed-mid.json").write_text(json.dumps(dict(shipped, thresholds=[t and t / 2 for t in shipped["thresholds"]])))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "testbed-mid.json").write_text(testbed_thresholds("mid").read_text())
    assert sweep.main(["--data", "X", "--family", "testbed", "--model", "dymu", "--dymu", "mid", str(tmp_path / "other" / "testbed-mid.json"),
                       "--dry-run"]) == 2
    assert "different contents, same name" in capsys.readouterr().err
    assert len(planned(capsys, "--data", "X", "--family", "testbed", "--model", "dymu", "--dymu", "mid",
                       str(tmp_path / "copy" / "testbed-mid.json"))) == 1


def test_report_name_and_work_dir_are_checked_before_any_run(capsys, clean_env, tmp_path):
    """--report a/b was refused by hybrid_tools.report after every run, its record written to
    sweep_a/b.json; a --work-dir after '--' gave each run two."""
    work = tmp_path / "work"
    status = sweep.main(["--data", "X", "--fastv-k", "64", "--launcher", "true", "--work-dir", str(work), "--report", "a/b"])
    assert status == 2 and not work.exists()
    assert "--report 'a/b': use letters, digits, '.', '_' and '-'" in capsys.readouterr().err
    for passthrough in (["--work-dir", "elsewhere"], ["--work-dir=elsewhere"]):
        assert sweep.main(["--data", "X", "--fastv-k", "64", "--dry-run", "--", *passthrough, "--batch-size", "8"]) == 2
        assert "pass the sweep's own --work-dir" in capsys.readouterr().err
    # flags that only act with another were accepted and ignored without a word (exit 0)
    for flags, needle in ((["--report-out", "elsewhere"], "--report-out elsewhere is the parent folder of --report NAME"),
                          (["--calibrate-images", "nowhere"], "--calibrate-images nowhere calibrates the --dymu targets")):
        assert sweep.main(["--data", "X", "--fastv-k", "64", "--dry-run", *flags]) == 2
        assert needle in capsys.readouterr().err


def test_a_run_refused_before_it_ran_leaves_its_folders_old_outputs_out_and_the_report_is_skipped(capsys, clean_env, tmp_path, monkeypatch):
    """run.py refuses a run (exit status 2) before any work, e.g. a folder holding another checkpoint's
    outputs: those outputs are not this sweep's, so they are not tabulated as its results, and a
    report of no folder is skipped with a message instead of failing in argparse."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(REPO / "reports" / "tiny-demo" / "raw" / "outputs" / "llava_tiny", work / "llava_tiny")
    monkeypatch.chdir(tmp_path)
    status = sweep.main(["--family", "tiny", "--data", "TinyCOCO", "--fastv-k", "72", "--vanilla", "--launcher", "sh -c 'exit 2'",
                         "--work-dir", str(work), "--report", "r"])
    err = capsys.readouterr().err
    assert status == 1
    assert "vanilla (exit status 2, made nothing)" in err and "no report r: no run of this sweep left results" in err
    table = pd.read_csv(work / "sweep_r.csv")  # one empty row saying why, no number of the folder's old outputs
    assert table[["setting", "dataset", "status", "rows"]].values.tolist() == [
        [label, "TinyCOCO", "no result: refused before any work (exit status 2)", 0] for label in ("vanilla", "fastv: fastv-k72-l2")]
    assert set(table.columns) == {"setting", "model", "dataset", "status", "rows"}
    assert not (tmp_path / "reports" / "r").exists()

    status = sweep.main(["--family", "tiny", "--data", "TinyCOCO", "--fastv-k", "72", "--launcher", "no-such-launcher",
                         "--work-dir", str(work), "--report", "r2"])
    err = capsys.readouterr().err
    assert status == 1 and "cannot start 'no-such-launcher'" in err and "(exit status 127, made nothing" in err
    assert json.loads((work / "sweep_r2.json").read_text())["runs"][0]["returncode"] == 127


def raw_numbers(work: Path, model: str, dataset: str) -> tuple[float, float]:
    """(CIDEr, median prefill ms) read straight from the raw files with json and statistics."""
    folder = work / model
    cider = json.loads((folder / f"{model}_{dataset}_score.json").read_text())["CIDEr"]
    lines = (folder / f"{model}_{dataset}_stats.jsonl").read_text().splitlines()
    return cider, 1000 * statistics.median(json.loads(line)["prefill_s"] for line in lines)


@needs_vlmeval
def test_sweep_runs_each_setting_and_writes_table_record_and_report(tmp_path, monkeypatch, capfd):
    """One sweep of two settings; run.py's summaries, the sweep table, its CSV and the report all
    show the metric and median prefill time that the raw files hold."""
    from hybrid_vlm.tiny import TINY_VERSION, ensure_tiny_llava

    for key in ("FASTV_K", "FASTV_LAYER", "DYMU_THRESHOLDS", "HYBRID_POSITIONS", "MMEVAL_ROOT", "OPENAI_API_KEY", "PRED_FORMAT", settings.MODEL_PATH_ENV):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "LMUData").mkdir()
    for key, value in dict(LMUData=tmp_path / "LMUData", HYBRID_VLM_CACHE=tmp_path / "cache", HF_HOME=tmp_path / "hf", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1").items():
        monkeypatch.setenv(key, str(value))
    checkpoint = ensure_tiny_llava(tmp_path / "cache" / f"tiny-llava-{TINY_VERSION}")
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    status = sweep.main([
        "--data", "TinyCOCO", "--fastv-k", "72", "--vanilla", "--work-dir", "work", "--report", "tiny-sweep",
        "--", "--model-path", str(checkpoint), "--max-new-tokens", "4", "--limit", "3",
    ])
    output = capfd.readouterr().out
    assert status == 0, output[-3000:]
    fastv = "llava_v1.5_7b_fastv__fastv-k72-l2"
    final_table = output[output.rindex("Δ vs vanilla"):]
    csv_rows = {row.model: row for row in pd.read_csv(work / "sweep_tiny-sweep.csv").itertuples()}
    report_rows = {e["model"]: e for e in json.loads((tmp_path / "reports" / "tiny-sweep" / "report.json").read_text())["datasets"]["TinyCOCO"]}
    assert list(csv_rows) == [VANILLA, fastv] and sorted(report_rows) == sorted(csv_rows)
    for model in (VANILLA, fastv):
        cider, prefill_ms = raw_numbers(work, model, "TinyCOCO")
        summary = re.search(rf"^{re.escape(model)} +TinyCOCO +3 +CIDEr (\S+) +\S+ +\S+ +(\S+)$", output, flags=re.M)
        assert summary, output[-3000:]  # run.py's own end-of-run table
        assert (summary.group(1), summary.group(2)) == (f"{cider:.1f}", f"{prefill_ms:.2f}")
        # setting, folder, dataset, rows, metric, delta, visual in / kept / layer-avg, GMACs, prefill ms
        sweep_line = re.search(rf"^.+ +{re.escape(model)} +TinyCOCO +3 +CIDEr (\S+) +\S+ +\S+ +\S+ +\S+ +\S+ +(\S+)$", final_table, flags=re.M)
        assert sweep_line, final_table
        assert (sweep_line.group(1), sweep_line.group(2)) == (f"{cider:.1f}", f"{prefill_ms:.2f}")
        assert csv_rows[model].CIDEr == pytest.approx(cider) and csv_rows[model].prefill_ms_median == pytest.approx(prefill_ms)
        assert report_rows[model]["metrics"]["CIDEr"] == pytest.approx(cider)
        assert report_rows[model]["prefill_ms_median"] == pytest.approx(prefill_ms)
    assert re.search(rf"^fastv: fastv-k72-l2 +{fastv} +TinyCOCO +3 +CIDEr", final_table, flags=re.M), final_table
    assert csv_rows[VANILLA].tokens_in_mean == csv_rows[VANILLA].tokens_kept_mean
    assert csv_rows[fastv].tokens_in_mean - csv_rows[fastv].tokens_kept_mean == pytest.approx(576 - 72)  # FastV kept 72 visual tokens
    # the three budget rules from the cache state: 576 in, 72 kept after layer 2, (2 * 576 + L' * 72) / L averaged
    layers = 4  # the tiny LLaVA's LLM
    assert (csv_rows[fastv].visual_in_mean, csv_rows[fastv].visual_kept_mean) == (576, 72)
    assert csv_rows[fastv].visual_layer_mean == pytest.approx((2 * 576 + (layers - 2) * 72) / layers)
    assert csv_rows[VANILLA].visual_in_mean == csv_rows[VANILLA].visual_kept_mean == csv_rows[VANILLA].visual_layer_mean == 576
    assert 0 < csv_rows[fastv].prefill_gmacs_mean < csv_rows[VANILLA].prefill_gmacs_mean

    record = json.loads((work / "sweep_tiny-sweep.json").read_text())
    assert [run["folder"] for run in record["runs"]] == [VANILLA, fastv]
    assert all(run["returncode"] == 0 for run in record["runs"])
    assert record["runs"][1]["env"] == {"FASTV_K": "72"} and record["versions"]["transformers"]
    assert str(tmp_path) not in json.dumps(record)  # provenance names no machine path

    markdown = (tmp_path / "reports" / "tiny-sweep" / "report.md").read_text()
    assert "Tiny random-weight model, not LLaVA-1.5-7B" in markdown  # --model-path is the tiny checkpoint
    assert "FASTV_K=72 python -m vlmeval_plugin --data TinyCOCO --model llava_v1.5_7b_fastv --work-dir work" in markdown
    assert (tmp_path / "reports" / "tiny-sweep" / "figures" / "TinyCOCO.png").is_file()


def test_baselines_and_the_testbed_family_in_the_plan(capsys, clean_env, monkeypatch):
    for key in ("FASTV_SELECT", "VISUAL_POOL", "SELECT_SEED"):
        monkeypatch.delenv(key, raising=False)
    assert planned(capsys, "--data", "X", "--fastv-k", "64", "--select", "attention", "random", "--vanilla") == [
        "llava_v1.5_7b", "llava_v1.5_7b_fastv__fastv-k64-l2", "llava_v1.5_7b_fastv__random-k64-l2",
    ]
    assert planned(capsys, "--data", "X", "--pool", "2", "3x3") == ["llava_v1.5_7b_pool__pool-2x2", "llava_v1.5_7b_pool__pool-3x3"]
    assert planned(capsys, "--data", "X", "--family", "testbed", "--model", "vanilla", "dymu", "--dymu", "low", "high") == [
        "llava_testbed", "llava_testbed_dymu__dymu-testbed-low", "llava_testbed_dymu__dymu-testbed-high",
    ]
    assert sweep.main(["--data", "X", "--pool", "5", "--dry-run"]) == 2
    assert "VISUAL_POOL='5' is not valid" in capsys.readouterr().err


def test_qwen_method_sweep_takes_counts_and_fractions(capsys, clean_env):
    qwen = "Qwen2.5-VL-7B-Instruct"
    assert planned(capsys, "--family", qwen, "--data", "X", "--methods", "divprune", "pool", "--budgets", "0.25", "40") == [
        f"{qwen}_divprune__divprune-b0.25", f"{qwen}_divprune__divprune-b40", f"{qwen}_pool__pool-b0.25", f"{qwen}_pool__pool-b40",
    ]
    assert sweep.main(["--family", qwen, "--data", "X", "--methods", "divprune", "--budgets", "1.5", "--dry-run"]) == 2
    assert "VISUAL_BUDGET='1.5' is not valid" in capsys.readouterr().err


def test_a_second_sweep_with_the_same_tag_keeps_the_first_record(tmp_path):
    """Random selection under seeds 1 and 2 sweeps the same model twice: the second record went to
    the same sweep_<tag>.json and the first seed's commands and exit statuses were lost."""
    (tmp_path / "sweep_llava_testbed_random.json").write_text('{"runs": []}')
    assert sweep.unused_tag(str(tmp_path), "llava_testbed_random") == "llava_testbed_random-2"
    assert sweep.unused_tag(str(tmp_path), "other") == "other"
    assert json.loads((tmp_path / "sweep_llava_testbed_random.json").read_text()) == {"runs": []}  # the first record untouched


def test_two_sweeps_started_together_take_two_records(tmp_path):
    """The record was written only after the first run ended, so two sweeps of one model started
    together (one per GPU) both took sweep_<tag>.json and the later one overwrote the other's. The
    name is now taken by creating the file."""
    first, second = (sweep.unused_tag(str(tmp_path), "llava_v1.5_7b_fastv") for _ in range(2))
    assert (first, second) == ("llava_v1.5_7b_fastv", "llava_v1.5_7b_fastv-2")
    assert (tmp_path / "sweep_llava_v1.5_7b_fastv.json").exists() and (tmp_path / "sweep_llava_v1.5_7b_fastv-2.json").exists()


def test_sweep_records_are_read_oldest_first(tmp_path):
    """`sweep_x-2.json` sorts before `sweep_x.json` by name; readers that take a folder's last entry
    (its latest run) need them by start time."""
    from vlmeval_plugin.results import read_sweep_runs

    for name, started, code in (("sweep_x.json", "2026-12-06T10:00:00+00:00", 1), ("sweep_x-2.json", "2026-12-06T11:00:00+00:00", 0),
                                ("sweep_x-10.json", "2026-12-06T12:00:00+00:00", 0)):
        (tmp_path / name).write_text(json.dumps({"started": started, "runs": [{"folder": "f", "returncode": code, "record": name}]}))
    assert [run["record"] for _, run in read_sweep_runs(tmp_path)] == ["sweep_x.json", "sweep_x-2.json", "sweep_x-10.json"]
    for name in ("sweep_x.json", "sweep_x-2.json", "sweep_x-10.json"):  # started within one second: by the number taken
        (tmp_path / name).write_text(json.dumps({"started": "2026-12-06T10:00:00+00:00", "runs": [{"folder": "f", "record": name}]}))
    assert [run["record"] for _, run in read_sweep_runs(tmp_path)] == ["sweep_x.json", "sweep_x-2.json", "sweep_x-10.json"]

    # a tag ending in digits of its own (sweep_budget-64.json is the first, not the 64th), with and without the recorded number
    for recorded in (True, False):
        folder = tmp_path / f"digits-{recorded}"
        folder.mkdir()
        for number, name in ((1, "sweep_budget-64.json"), (2, "sweep_budget-64-2.json")):
            record = {"started": "2026-12-06T10:00:00+00:00", "runs": [{"folder": "f", "record": name}]}
            (folder / name).write_text(json.dumps(record | ({"record_number": number} if recorded else {})))
        assert [run["record"] for _, run in read_sweep_runs(folder)] == ["sweep_budget-64.json", "sweep_budget-64-2.json"]


def test_the_sweep_table_and_report_show_only_the_swept_sets(tmp_path, capsys):
    """A folder also holds the sets of earlier runs: a --data MMBench sweep showed a COCO row too,
    and its report a COCO section."""
    from test_report import COCO, MMB, SYNTHETIC_7B, make_work_dir

    work = make_work_dir(tmp_path / "outputs", SYNTHETIC_7B)
    folder = "llava_v1.5_7b_fastv__fastv-k72-l2"
    runs = [sweep.Run(label="k72", model="llava_v1.5_7b_fastv", folder=folder, env={}, settings={})]
    records = [dict(folder=folder, returncode=0, started="2026-01-01T00:00:00+00:00")]
    status = sweep.summarize(runs, records, str(work), "t", work / "sweep_t.json", "swept", str(tmp_path / "reports"), [MMB])
    assert status == 0
    table = pd.read_csv(work / "sweep_t.csv")
    assert set(table["dataset"]) == {MMB}
    report = (tmp_path / "reports" / "swept" / "report.md").read_text()
    assert f"### {MMB}" in report and f"### {COCO}" not in report


def test_a_run_recorded_in_the_second_it_started_counts_as_recorded(tmp_path):
    """Both times are whole seconds: a run recorded in the second the sweep started it made its
    outputs then, and must not be left out of the table as a run that made nothing."""
    (tmp_path / "run_info.json").write_text(json.dumps({"runs": [{"time": "2026-01-01T00:00:00+00:00"}]}))
    assert sweep.recorded_since(tmp_path, "2026-01-01T00:00:00+00:00")
    assert not sweep.recorded_since(tmp_path, "2026-01-01T00:00:01+00:00")


def test_an_exported_budget_reaches_only_the_names_that_read_it(clean_env):
    """VISUAL_BUDGET=32 exported for a sweep of visionzip beside vanilla: visionzip takes it, and the
    vanilla run, which reads no budget, runs without it (the plugin would refuse it there)."""
    args = sweep.build_parser().parse_args(["--data", "X", "--family", "tiny", "--methods", "visionzip", "--vanilla"])
    runs, _ = sweep.plan_runs(args, {"VISUAL_BUDGET": "32"}, ["llava_tiny", "llava_tiny_visionzip"])
    assert [run.folder for run in runs] == ["llava_tiny", "llava_tiny_visionzip__visionzip-b32"]
    assert "VISUAL_BUDGET" not in runs[0].env and runs[1].env["VISUAL_BUDGET"] == "32"


@pytest.mark.parametrize("left", ["a folder", "a status file only", "another dataset's results"])
def test_a_recorded_run_that_failed_keeps_an_empty_row_and_the_others_their_report(capsys, tmp_path, left):
    """One setting of a sweep fails after run.py recorded it (the model did not load: a folder with
    run_info.json, maybe VLMEvalKit's status.json or an earlier set's results, and no result on
    this sweep's set). It had no row in the table or CSV, and passing its folder to the report made
    the report exit in argparse, so the finished settings got no report either."""
    from test_report import MMB, SYNTHETIC_7B, make_work_dir

    ok, bad = "llava_v1.5_7b_fastv__fastv-k72-l2", "llava_v1.5_7b_fastv__fastv-k36-l2"
    configs = {k: v for k, v in SYNTHETIC_7B.items() if "hybrid" not in k}
    if left == "another dataset's results":  # an earlier run's COCO_VAL, none of this sweep's MMBench
        configs[bad] = SYNTHETIC_7B[ok]
    work = make_work_dir(tmp_path / "outputs", configs)
    (work / bad).mkdir(exist_ok=True)
    for path in (work / bad).iterdir():
        if MMB in path.name or path.name == "status.json":
            path.unlink()
    if left == "a status file only":
        (work / bad / "status.json").write_text(json.dumps({"eval_id": "T1", "mode": "all", "model_name": bad}))
    (work / bad / "run_info.json").write_text(json.dumps({"runs": [{"time": "2026-01-01T00:00:05+00:00"}]}))
    runs = [sweep.Run("k72", "llava_v1.5_7b_fastv", ok, {}, {}), sweep.Run("k36", "llava_v1.5_7b_fastv", bad, {}, {})]
    records = [dict(folder=ok, returncode=0, started="2026-01-01T00:00:00+00:00"),
               dict(folder=bad, returncode=1, started="2026-01-01T00:00:01+00:00")]
    status = sweep.summarize(runs, records, str(work), "t", work / "sweep_t.json", "partly", str(tmp_path / "reports"), [MMB])
    out, err = capsys.readouterr()
    assert status == 1 and "k36 (exit status 1)" in err
    printed = {line.split()[0]: line for line in out.splitlines() if line.startswith(("k36 ", "k72 "))}
    assert " 12 " in printed["k72"] and "no result: exit status 1" in printed["k36"]  # the table's rows column, and why none
    table = pd.read_csv(work / "sweep_t.csv")
    failed = table[table["model"] == bad]
    assert failed[["dataset", "status", "rows"]].values.tolist() == [[MMB, "no result: exit status 1", 0]]
    assert table[table["model"] == ok]["status"].tolist() == ["ok"] and table[table["model"] == ok]["rows"].iloc[0] > 0
    report = (tmp_path / "reports" / "partly" / "report.md").read_text()
    assert ok in report and "k36 on " + MMB + " (no result: exit status 1)" in err


def test_a_run_that_exited_0_without_a_result_is_a_miss(capsys, tmp_path):
    """A run that exits 0 but writes nothing for a set (VLMEvalKit skipped it): its row read
    'no result: ok' and the sweep exited 0."""
    from test_report import MMB, SYNTHETIC_7B, make_work_dir

    ok = "llava_v1.5_7b_fastv__fastv-k72-l2"
    work = make_work_dir(tmp_path / "outputs", {k: v for k, v in SYNTHETIC_7B.items() if "hybrid" not in k})
    runs = [sweep.Run("k72", "llava_v1.5_7b_fastv", ok, {}, {})]
    records = [dict(folder=ok, returncode=0, started="2026-01-01T00:00:00+00:00")]
    assert sweep.summarize(runs, records, str(work), "t", work / "sweep_t.json", None, None, [MMB, "MyCaps"]) == 1
    table = pd.read_csv(work / "sweep_t.csv")
    assert table[table["dataset"] == "MyCaps"]["status"].tolist() == ["no result: the run exited 0 without it"]
    assert table[(table["dataset"] == MMB) & (table["model"] == ok)]["status"].tolist() == ["ok"]
