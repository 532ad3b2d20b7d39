"""Smoke tests of `python -m hybrid_tools.bench`: it runs and writes its files. Speed is never asserted."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_tools import bench, presets
from hybrid_vlm import flops, runtime
from hybrid_vlm.calibrate import load_thresholds, measure_token_counts
from hybrid_vlm.tiny import build_tiny_llava, build_tokenizer


def test_tiny_cli_writes_csv_and_json(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_tools.bench", "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fastv-k64-l2" in result.stdout and "theory" in result.stdout

    with open(out / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert "prefill_ms_median" in reader.fieldnames and "visual_kept_mean" in reader.fieldnames  # named by their statistic
        rows = {row["config"]: {column: row[header] for column, header in zip(bench.CSV_COLUMNS, reader.fieldnames)} for row in reader}
    assert list(rows) == ["stock", "vanilla", "fastv-k288-l2", "fastv-k144-l2", "fastv-k64-l2"]  # stock is always timed
    for name, kept in [("stock", 576), ("vanilla", 576), ("fastv-k288-l2", 288), ("fastv-k144-l2", 144), ("fastv-k64-l2", 64)]:
        row = rows[name]
        assert row["status"] == "ok"
        assert float(row["visual_in"]) == 576 and float(row["visual_kept"]) == kept
        assert float(row["text_tokens"]) == 60
        for column in ("vision_ms", "llm_prefill_ms", "prefill_ms", "decode_ms_per_token", "prefill_gmacs", "prefill_ratio"):
            assert float(row[column]) > 0, column
        assert row["sync_debug"] == "not run"
        assert row["repeats"] == "1" and row["ratios_divide_by"] == "stock"  # the CSV says what its ratios and medians are of
    assert float(rows["stock"]["prefill_ratio"]) == 1.0 and json.loads((out / "bench.json").read_text())["meta"]["baseline"] == "stock"
    assert float(rows["vanilla"]["prefill_theory_ratio"]) == 1.0  # the engine with nothing cut: the same MACs as stock
    assert float(rows["fastv-k64-l2"]["prefill_theory_ratio"]) < float(rows["fastv-k144-l2"]["prefill_theory_ratio"]) < 1

    data = json.loads((out / "bench.json").read_text())
    meta = data["meta"]
    for key in ("device", "torch", "transformers", "hybrid_vlm", "cpu", "torch_threads", "preset", "shape"):
        assert key in meta
    assert [row["config"] for row in data["rows"]] == list(rows)
    assert len(data["rows"][0]["runs"]) == 1


def test_theory_columns_match_flops_and_dymu_rows_run(tmp_path, capsys):
    """FastV, DyMU and hybrid rows all run; their counts match the vision tower's own count, their
    theory columns hybrid_vlm.flops, and the sync check passes for FastV. Both tables mark the DyMU
    rows' prefill theory as the merged-count ideal the static tower does not run at, and only those."""
    out = tmp_path / "bench"
    rows = bench.main(
        ["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--decode-tokens", "1", "--no-memory", "--no-progress",
         "--fastv-k", "0.5", "--fastv-layer", "1", "--scoring", "row", "eager", "--dymu-target", "200", "--dymu-images", "4",
         "--stock", "--sync-debug", "--out", str(out)]
    )
    by_name = {row["config"]: row for row in rows}
    assert set(by_name) >= {"stock", "vanilla", "fastv-r0.5-l1", "fastv-r0.5-l1_scoring-eager"}
    assert all(row["status"] == "ok" for row in rows), [(r["config"], r["note"]) for r in rows if r["status"] != "ok"]
    dymu = [row for row in rows if row["method"] == "dymu"]
    hybrids = [row for row in rows if row["method"] == "hybrid"]
    assert len(dymu) == 1 and len(hybrids) == 2

    # the merged count the engine put into the LLM == the vision tower's own count (calibrate's compacting path)
    model, processor = build_tiny_llava()
    thresholds = load_thresholds(out / "200.json", model)
    inputs, _ = presets.build_inputs(processor, 60, 1, 0)
    merged = measure_token_counts(model, [inputs["pixel_values"]], thresholds, progress=False)[0]
    assert 0 < merged < 576 and dymu[0]["visual_in"] == merged
    for row in hybrids:  # FastV prunes half of the merged tokens, rounded half to even as the official llava-hf FastV
        assert row["visual_in"] == merged and row["visual_kept"] == round(merged * 0.5)
    assert "merged per-layer CLIP counts" in dymu[0]["note"]
    assert dymu[0]["prefill_theory_ratio"] < 1

    shape = flops.shape_from_config(model.config)
    expected = flops.prefill_macs(shape, 60, visual_kept=288, fastv_layer=1, scoring="row")
    assert by_name["fastv-r0.5-l1"]["prefill_gmacs"] == pytest.approx(expected.total / 1e9)
    assert by_name["fastv-r0.5-l1"]["prefill_theory_ratio"] == pytest.approx(expected.total / flops.prefill_macs(shape, 60).total)

    assert by_name["fastv-r0.5-l1"]["sync_debug"] == "pass" and by_name["vanilla"]["sync_debug"] == "pass"
    assert dymu[0]["sync_debug"].startswith("not applicable")

    from hybrid_tools.report.bench import IDEAL_THEORY_FOOTNOTE, bench_table, read_bench

    terminal = capsys.readouterr().out
    report = bench_table(read_bench(out / "bench.json"))
    for row in rows:
        theory = f"{row['prefill_theory_ratio']:.3f}"
        starred = row["method"] in ("dymu", "hybrid")
        assert any(line.startswith(f"| `{row['config']}`") and f" {theory}{'*' if starred else ''} |" in line for line in report.splitlines())
        assert any(line.split()[:1] == [row["config"]] and (theory + "*" in line.split()) == starred for line in terminal.splitlines())
    assert IDEAL_THEORY_FOOTNOTE in terminal


def test_7b_preset_config_and_cpu_refusal(capsys):
    config = presets.preset_config("llava-1.5-7b", build_tokenizer())
    assert flops.shape_from_config(config) == flops.LLAVA_15_7B
    assert flops.shape_from_config(presets.preset_config("mid", build_tokenizer())).llm.hidden == 1024
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--preset", "llava-1.5-7b", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("requested,index", [("cuda", 0), ("cuda:1", 1)])
def test_a_cuda_device_gets_an_index_torch_set_device_accepts(monkeypatch, requested, index):
    """`--device cuda` made `torch.cuda.set_device(torch.device("cuda"))` raise ValueError ("Expected a
    torch.device with a specified index") before any model was built: every GPU bench step would have
    ended there. torch's own check runs here; only the driver call is replaced."""
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", selected.append, raising=False)
    device, dtype = bench.checked_device_dtype(*bench.parse_args(["--device", requested, "--preset", "llava-1.5-7b", "--dtype", "bfloat16"]))
    assert device == torch.device("cuda", index) and selected == [index] and dtype == torch.bfloat16


# the "torch_dtype" of each family's released checkpoint's config.json (llava-hf/llava-1.5-7b-hf,
# llava-hf/llava-v1.6-vicuna-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct): what "auto" should run on CUDA
RELEASED_DTYPES = {"llava-1.5-7b": torch.float16, "llava-next-7b": torch.float16, "qwen2.5-vl-7b": torch.bfloat16}


@pytest.mark.parametrize("preset", sorted(RELEASED_DTYPES))
def test_auto_dtype_on_cuda_is_the_family_release_dtype(monkeypatch, preset):
    """`--dtype auto` on CUDA ran Qwen2.5-VL presets in float16, in which Qwen2.5-VL is reported to
    overflow, while the plugin loads its checkpoints' own bfloat16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", lambda index: None, raising=False)
    _, dtype = bench.checked_device_dtype(*bench.parse_args(["--device", "cuda", "--preset", preset]))
    assert dtype == RELEASED_DTYPES[preset]


def test_auto_dtype_of_a_checkpoint_follows_its_model_type(tmp_path):
    qwen, llava, broken = (tmp_path / name for name in ("qwen", "llava", "broken"))
    for folder, text in ((qwen, '{"model_type": "qwen2_5_vl"}'), (llava, '{"model_type": "llava"}'), (broken, "{not json")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    cuda = torch.device("cuda", 0)
    assert runtime.resolve_dtype("auto", cuda, presets.model_type_of("tiny", str(qwen))) == torch.bfloat16
    assert runtime.resolve_dtype("auto", cuda, presets.model_type_of("tiny", str(llava))) == torch.float16
    assert runtime.resolve_dtype("auto", cuda, presets.model_type_of("tiny", str(broken))) == torch.float16
    assert runtime.resolve_dtype("auto", torch.device("cpu"), "qwen2_5_vl") == torch.float32
    assert runtime.resolve_dtype("float16", cuda, "qwen2_5_vl") == torch.float16  # an explicit dtype wins


def test_methods_rows_use_each_budget_rule_and_count_the_scoring(tmp_path):
    """--methods at a budget: rule A methods let the budget in, fastv and random keep it after layer 2,
    and the theory of a method before the LLM includes its scoring (method_prefill_macs)."""
    from hybrid_tools import bench

    rows = bench.main(["--preset", "tiny", "--fastv-k", "--methods", "fastv", "random", "divprune", "--budgets", "32", "--repeats", "1",
                       "--warmup", "0", "--decode-tokens", "0", "--no-memory", "--no-progress", "--out", str(tmp_path)])
    by_config = {row["config"]: row for row in rows}
    assert (by_config["divprune-b32"]["visual_in"], by_config["divprune-b32"]["visual_kept"]) == (32, 32)
    assert (by_config["fastv-k32-l2"]["visual_in"], by_config["fastv-k32-l2"]["visual_kept"]) == (576, 32)
    from hybrid_vlm import HybridConfig, flops
    from hybrid_vlm.tiny import build_tiny_llava

    shape = flops.shape_from_config(build_tiny_llava()[0].config)
    text = by_config["divprune-b32"]["llm_tokens_in"] - 32
    expected = flops.method_prefill_macs(shape, HybridConfig(visual_method="divprune", visual_budget=32), int(text))
    assert by_config["divprune-b32"]["prefill_gmacs"] == pytest.approx(expected.total / 1e9)
    assert expected.selection > 0
    # random selection reads no attention: charged no scoring row, as the plugin's per-row GMACs
    pruned = dict(kept=int(text) + 32, fastv_layer=2)
    assert by_config["random-k32-l2"]["llm_prefill_gmacs"] == pytest.approx(flops.llm_prefill_macs(shape.llm, int(text) + 576, **pruned, scoring=None) / 1e9)
    assert by_config["fastv-k32-l2"]["llm_prefill_gmacs"] == pytest.approx(flops.llm_prefill_macs(shape.llm, int(text) + 576, **pruned, scoring="row") / 1e9)


def test_kv_cache_is_measured_on_the_cache_and_kernels_are_traced():
    """kv_cache_mb_prompt is read off the cache: it equals the size worked out by hand from the
    config (layers before FastV's layer hold every prompt token, the rest the kept ones)."""
    rows = bench.main(["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--no-memory",
                       "--no-progress", "--fastv-k", "16", "--kernels"])
    by_name = {row["config"]: row for row in rows}
    model, processor = build_tiny_llava()
    text = model.config.text_config
    prompt = presets.build_inputs(processor, 60, 1, 0)[0]["input_ids"].shape[1]
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4  # K and V, fp32
    layers = text.num_hidden_layers
    assert by_name["stock"]["kv_cache_mb_prompt"] * 2**20 == layers * prompt * per_token
    assert by_name["vanilla"]["kv_cache_mb_prompt"] * 2**20 == layers * prompt * per_token
    assert by_name["fastv-k16-l2"]["kv_cache_mb_prompt"] * 2**20 == (2 * prompt + (layers - 2) * (prompt - 576 + 16)) * per_token
    for row in rows:  # the theory column (hybrid_vlm.flops) against the cache it models
        assert row["kv_cache_mb_prompt_theory"] == row["kv_cache_mb_prompt"], row["config"]
    for row in rows:
        assert row["sdpa_prefill"].startswith("vision ") and f"L0-{layers - 1} " in row["sdpa_prefill"]
        assert row["sdpa_decode"].startswith(f"L0-{layers - 1} ")
        assert row["generate_tokens_per_s"] > 0


def test_each_time_column_is_the_median_of_its_rounds(monkeypatch):
    """Every round's times are scripted (skewed, so a mean or a single round would differ): each time
    column is the median of its rounds, min and max are the extremes, and tokens per second is the
    median of the rounds' own rates."""
    import statistics

    prefill_rounds, decode_rounds, configs = [1.0, 2.0, 9.0], [4.0, 0.5, 1.0], 3  # the tiny preset's rows, visited in turn
    calls, real_timed_run = [], bench.timed_run

    def scripted(*args, **kwargs):
        times, output = real_timed_run(*args, **kwargs)
        at = len(calls) // configs
        calls.append(1)
        times.update(prefill_ms=prefill_rounds[at], vision_ms=prefill_rounds[at] / 4, llm_prefill_ms=prefill_rounds[at] * 3 / 4,
                     decode_ms_per_token=decode_rounds[at])
        return times, output

    monkeypatch.setattr(bench.session, "timed_run", scripted)
    rows = bench.main(["--preset", "tiny", "--fastv-k", "16", "--repeats", "3", "--warmup", "0", "--decode-tokens", "2", "--no-memory", "--no-progress"])
    assert [row["config"] for row in rows] == ["stock", "vanilla", "fastv-k16-l2"] and len(calls) == 3 * configs
    for row in rows:
        assert (row["prefill_ms"], row["prefill_ms_min"], row["prefill_ms_max"]) == (2.0, 1.0, 9.0)
        assert (row["vision_ms"], row["llm_prefill_ms"], row["decode_ms_per_token"]) == (0.5, 1.5, 1.0)
        rates = [3 / ((p + 2 * d) / 1e3) for p, d in zip(prefill_rounds, decode_rounds)]  # batch 1, 2 steps + the prefill's token
        assert row["generate_tokens_per_s"] == pytest.approx(statistics.median(rates))


def test_generate_tokens_per_s_counts_the_prefill_token():
    runs = [dict(prefill_ms=100.0, decode_ms_per_token=10.0), dict(prefill_ms=300.0, decode_ms_per_token=25.0), dict(prefill_ms=60.0, decode_ms_per_token=10.0)]
    # batch 2, 4 decode steps: 10 new tokens in 0.14 s, 0.40 s and 0.10 s; the median rate is 10 / 0.14
    assert bench.generate_tokens_per_s(runs, batch=2, decode_tokens=4) == pytest.approx(10 / 0.14)
    assert math.isnan(bench.generate_tokens_per_s(runs, batch=2, decode_tokens=0))


def test_mask_read_rows_run_an_unpadded_batch_without_a_mask():
    """--mask-read never once: in an unpadded batch of two, the default rows keep the mask in every
    layer and make no host read; the mask-read rows run SDPA without it and read once per prompt."""
    rows = bench.main(["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--no-memory", "--no-progress",
                       "--fastv-k", "16", "--batch-size", "2", "--mask-read", "never", "once", "--kernels", "--sync-debug"])
    by_name = {row["config"]: row for row in rows}
    assert list(by_name) == ["stock", "vanilla", "fastv-k16-l2", "vanilla_mask-read-once", "fastv-k16-l2_mask-read-once"]
    layers = build_tiny_llava()[0].config.text_config.num_hidden_layers
    for name in ("vanilla", "fastv-k16-l2"):
        never, once = by_name[name], by_name[name + "_mask-read-once"]
        assert (never["mask_read"], once["mask_read"]) == ("never", "once")
        assert f"L0-{layers - 1} " in never["sdpa_prefill"] and never["sdpa_prefill"].endswith("+mask")
        assert once["sdpa_prefill"].split("; ")[-1] == f"L0-{layers - 1} flash-cpu" and "+mask" not in once["sdpa_decode"]
        assert never["sync_debug"] == "pass"
        assert once["sync_debug"] == f"pass: 1 sync(s) in the prefill (1 allowed), 0 in {bench.SYNC_CHECK_DECODE_STEPS} decode steps (none allowed)"


@pytest.mark.parametrize("stop", ["SIGINT"])
def test_ctrl_c_in_the_timed_rounds_writes_what_was_measured_as_a_sigterm_does(tmp_path, monkeypatch, stop):
    """Ctrl-C ended the bench in a KeyboardInterrupt and wrote nothing; it now stops as SIGTERM does."""
    import os
    import signal

    calls, timed_run = [], bench.timed_run

    def run_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 + 3 + 1:
            os.kill(os.getpid(), getattr(signal, stop))
        return timed_run(*args, **kwargs)

    monkeypatch.setattr(bench.session, "timed_run", run_then_signal)
    before = signal.getsignal(signal.SIGINT)
    rows, stopped = bench.run(["--preset", "tiny", "--repeats", "50", "--warmup", "1", "--decode-tokens", "1", "--no-progress",
                               "--fastv-k", "16", "--no-memory", "--out", str(tmp_path)])
    assert signal.getsignal(signal.SIGINT) == before and stopped == "in the warm-up and timed rounds"
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["stopped"] == "in the warm-up and timed rounds"


def test_a_checkpoint_of_another_model_type_is_refused_before_it_loads(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config().save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--model", str(tmp_path), "--no-progress"])
    assert exit_.value.code == 2 and "this one is 'gpt2'" in capsys.readouterr().err


def test_thresholds_of_another_tower_are_a_usage_error_not_a_refused_row(tmp_path, capsys):
    """The testbed's thresholds on --preset tiny, or a garbage file, became a "refused" row after the
    whole bench, with exit status 0."""
    from vlmeval_plugin.settings import testbed_thresholds

    (tmp_path / "garbage.json").write_text("not json")
    for path, needle in ((testbed_thresholds("mid"), "calibrated for a vision tower of shape clip-h96"), (tmp_path / "garbage.json", "--dymu ")):
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--preset", "tiny", "--no-progress", "--fastv-k", "--dymu", str(path), "--repeats", "1", "--warmup", "0"])
        assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_dymu_target_beyond_the_tower_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--preset", "tiny", "--no-progress", "--fastv-k", "--dymu-target", "1000", "--repeats", "1", "--warmup", "0"])
    assert exit_.value.code == 2 and "--dymu-target '1000' is not valid: use 1..576" in capsys.readouterr().err


def test_a_sigterm_during_the_timed_rounds_writes_what_was_measured(tmp_path, monkeypatch, capsys):
    """A SIGTERM (as `timeout` sends at a step's limit) lands as the second timed round starts: the
    bench stops timing, skips the per-row passes, and still writes every row, saying how far it got."""
    import os
    import signal

    calls, timed_run = [], bench.timed_run
    warmup, configs = 1, 3  # stock, vanilla, fastv-k16-l2

    def run_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == warmup * configs + configs + 1:  # the first timed round of all three is done
            os.kill(os.getpid(), signal.SIGTERM)
        return timed_run(*args, **kwargs)

    monkeypatch.setattr(bench.session, "timed_run", run_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    rows, stopped = bench.run(["--preset", "tiny", "--repeats", "50", "--warmup", str(warmup), "--decode-tokens", "1", "--no-progress",
                               "--fastv-k", "16", "--sync-debug", "--out", str(tmp_path)])
    assert signal.getsignal(signal.SIGTERM) == before
    assert stopped == "in the warm-up and timed rounds"  # bench.cli exits 1 on it
    assert "| stopped by SIGTERM or Ctrl-C in the warm-up and timed rounds: each row's `repeats` says how many rounds it has" in capsys.readouterr().out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["stopped"] == "in the warm-up and timed rounds"
    by_name = {row["config"]: row for row in data["rows"]}
    assert list(by_name) == ["stock", "vanilla", "fastv-k16-l2"] and [r["config"] for r in rows] == list(by_name)
    assert [len(by_name[name]["runs"]) for name in by_name] == [1, 1, 1]  # the signal lands before the second round's first run
    for row in by_name.values():
        assert row["status"] == "ok" and row["prefill_ms"] > 0 and "1 of 50 timed rounds: stopped by SIGTERM or Ctrl-C" in row["note"]
        assert row["sync_debug"] == "not run: stopped by SIGTERM or Ctrl-C" and row["mem_kind"] == "not run: stopped by SIGTERM or Ctrl-C"
    assert by_name["fastv-k16-l2"]["visual_kept"] == 16 and by_name["vanilla"]["prefill_ratio"] > 0
    from hybrid_tools.report.bench import bench_setup

    assert "**Stopped early** by SIGTERM or Ctrl-C in the warm-up and timed rounds" in bench_setup(data["meta"])


def test_qwen_rows_count_the_tokens_that_ran_and_report_what_cannot_run(tmp_path):
    """Qwen2.5-VL, 1,280 units per image: DivPrune's LLM theory is a prompt of the 64 units that
    entered the LLM (it read the whole grid: 1.000); random selection is charged no attention row
    and FastV is; DART's theory is left empty (its per-layer counts follow the image, as the
    plugin leaves it); a PyramidDrop budget the 4-layer model cannot reach is a refused row, and
    the other rows are still timed and written (it ended the bench with a traceback)."""
    from transformers import AutoConfig

    from hybrid_vlm.qwen_flops import qwen_shape_from_config
    from hybrid_vlm.tiny_qwen import ensure_tiny_qwen

    checkpoint = ensure_tiny_qwen(tmp_path / "tiny-qwen")
    rows = bench.main(["--model", str(checkpoint), "--fastv-k", "--methods", "fastv", "random", "divprune", "dart", "pdrop",
                       "--budgets", "64", "--repeats", "1", "--warmup", "0", "--decode-tokens", "1", "--no-memory", "--no-progress",
                       "--out", str(tmp_path / "bench")])
    by_config = {row["config"]: row for row in rows}
    llm = qwen_shape_from_config(AutoConfig.from_pretrained(checkpoint)).llm
    stock, divprune = by_config["stock"], by_config["divprune-b64"]
    text = int(stock["llm_tokens_in"] - stock["visual_in"])
    assert stock["visual_in"] == 1280 and (divprune["visual_in"], divprune["visual_kept"]) == (64, 64)
    assert stock["llm_prefill_gmacs"] == pytest.approx(flops.llm_prefill_macs(llm, text + 1280) / 1e9)
    assert divprune["llm_prefill_gmacs"] == pytest.approx(flops.llm_prefill_macs(llm, text + 64) / 1e9)
    assert divprune["prefill_theory_ratio"] < 1

    pruned = dict(kept=text + 64, fastv_layer=2)
    assert by_config["fastv-k64-l2"]["llm_prefill_gmacs"] == pytest.approx(flops.llm_prefill_macs(llm, text + 1280, **pruned, scoring="row") / 1e9)
    assert by_config["random-k64-l2"]["llm_prefill_gmacs"] == pytest.approx(flops.llm_prefill_macs(llm, text + 1280, **pruned, scoring=None) / 1e9)
    assert by_config["random-k64-l2"]["llm_prefill_gmacs"] < by_config["fastv-k64-l2"]["llm_prefill_gmacs"]

    dart = next(row for name, row in by_config.items() if name.startswith("dart-b64"))
    assert dart["status"] == "ok" and math.isnan(dart["prefill_theory_ratio"]) and dart["prefill_ms"] > 0
    assert by_config["pdrop-b64"]["status"] == "refused" and "not reachable by pdrop" in by_config["pdrop-b64"]["note"]
    written = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert {row["config"] for row in written["rows"]} == set(by_config)


def test_a_configuration_that_raises_is_a_failed_row_and_the_exit_status_says_so(tmp_path, monkeypatch):
    """Out of memory (or an engine error) in one configuration's first prefill: that row is "failed"
    with the error, the others are timed and written, and the command exits 1 (0 when none fails)."""
    real_prefill, calls = bench.prefill, []

    def prefill(model, inputs):
        calls.append(None)
        if len(calls) == 2:  # the second configuration's untimed prefill (no warm-up)
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_prefill(model, inputs)

    argv = ["--preset", "tiny", "--fastv-k", "64", "--repeats", "1", "--warmup", "0", "--decode-tokens", "1", "--no-memory",
            "--no-progress", "--out", str(tmp_path)]
    monkeypatch.setattr(bench.session, "prefill", prefill)
    assert bench.cli(argv) == 1
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    failed = [row for row in rows if row["status"] == "failed"]
    assert len(failed) == 1 and "CUDA out of memory (simulated)" in failed[0]["note"]
    assert all(row["status"] == "ok" and row["prefill_ms"] > 0 for row in rows if row is not failed[0])
    monkeypatch.setattr(bench.session, "prefill", real_prefill)
    assert bench.cli(argv) == 0


@pytest.mark.parametrize("split", ["official", "slot"])
def test_dymu_layer_counts_follow_the_split_that_ran(split, tmp_path):
    """The bench's vision MACs come from an untimed re-run of the merging loop: its count at the
    layer LLaVA reads (less CLS) must be what entered the LLM, under either DYMU_SPLIT."""
    from hybrid_vlm import HybridConfig, apply_hybrid
    from hybrid_vlm.calibrate import calibrate_thresholds, write_threshold_file
    from hybrid_vlm.tiny import synthetic_image

    from conftest import QUESTIONS, image_inputs

    torch.manual_seed(0)
    model, processor = build_tiny_llava(vision_layers=8)
    calibration = processor.image_processor([synthetic_image(300 + seed) for seed in range(8)], return_tensors="pt").pixel_values
    path = tmp_path / f"{split}.json"
    write_threshold_file(path, calibrate_thresholds(model, [calibration], "192out", split=split, progress=False))
    hybrid = apply_hybrid(model, HybridConfig(dymu=str(path), dymu_split=split))
    inputs = image_inputs(processor, QUESTIONS[:3], seeds=[0, 1, 2])
    with torch.no_grad():
        entered = hybrid(**inputs, use_cache=True).past_key_values.hybrid_state.visual_counts().entered
    assert len(set(entered)) > 1  # images merge differently, so a wrong split could not match by chance
    assert [per_layer[-1] - 1 for per_layer in bench.dymu_layer_counts(hybrid, inputs["pixel_values"])] == entered


class _SlowGpuClock(bench.Clock):
    """A stand-in for CUDA events: every region's device time reads 1e6 ms, whatever the host took."""

    def __init__(self):
        self.cuda = True

    def sync(self):
        pass

    def mark(self):
        return object()

    def elapsed(self, start, end) -> float:
        return 1e6


def test_on_cuda_the_host_time_is_measured_beside_the_device_time_and_reported():
    """timed_run records the host's own time to return from the prefill and from each decode step,
    apart from the device's (the events): a forward that holds the host 30 ms reads >= 30 ms on the
    host while the stand-in device reads 1e6 ms. The report's resources table shows both host
    times for such a row, and "–" for a CPU row, which has none."""
    import time

    from hybrid_tools.report.bench import Bench, resources_table

    model, processor = build_tiny_llava()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    inputs = presets.build_inputs(processor, 20, 1, 0)[0]
    clock = _SlowGpuClock()
    mark = bench.LlmStartMark(model, clock)
    with torch.inference_mode():
        times, _ = bench.timed_run(model, inputs, clock, mark, decode_tokens=3)
    assert times["prefill_ms"] == 1e6 and times["decode_ms_per_token"] == 1e6 / 3
    assert 30.0 <= times["prefill_host_ms"] < 1e5
    assert 30.0 <= times["decode_host_ms_per_token"] < 1e5
    with torch.inference_mode():
        mark.remove()
        cpu_clock = bench.Clock(torch.device("cpu"))
        cpu_times, _ = bench.timed_run(model, inputs, cpu_clock, bench.LlmStartMark(model, cpu_clock), decode_tokens=1)
    assert "prefill_host_ms" not in cpu_times and "decode_host_ms_per_token" not in cpu_times
    row = dict(status="ok", config="cuda-row", kv_cache_mb_prompt=1.0, prefill_host_ms=31.25, decode_host_ms_per_token=30.5)
    cpu_row = dict(status="ok", config="cpu-row", kv_cache_mb_prompt=1.0)
    table = resources_table(Bench(path=None, meta={}, rows=[row, cpu_row]))
    cuda_line, cpu_line = [line for line in table.splitlines() if "-row`" in line]
    assert cuda_line.split(" | ")[5] == "31.25 / 30.50" and cpu_line.split(" | ")[5] == "–"


def test_a_failed_dymu_count_rerun_keeps_the_row_and_names_the_error(monkeypatch):
    """The DyMU vision MACs come from a re-run of the merging loop; if that re-run raises, the row
    keeps its timings and counts, its vision MACs fall back to unmerged counts, and its note names the
    error (it was swallowed unnamed before)."""
    from hybrid_vlm.tiny import ensure_tiny_thresholds

    def moved(*args, **kwargs):
        raise RuntimeError("merging loop moved")

    monkeypatch.setattr(bench.counts, "merging_vision_forward", moved)
    rows = bench.main(["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--decode-tokens", "0", "--no-memory", "--no-progress",
                       "--fastv-k", "--dymu", str(ensure_tiny_thresholds())])
    dymu = [row for row in rows if row["method"] == "dymu"]
    assert len(dymu) == 1 and dymu[0]["status"] == "ok" and dymu[0]["prefill_ms"] > 0
    assert dymu[0]["visual_kept"] < 576
    assert dymu[0]["note"] == "vision MACs counted unmerged: the per-layer CLIP counts could not be taken (RuntimeError: merging loop moved)"


def test_an_error_in_a_timed_round_fails_its_row_and_the_others_are_written(tmp_path, monkeypatch):
    """Without a warm-up, a configuration's first decode steps run inside the timed rounds, outside
    the warm-up's guard: an error there (or a late out of memory) ended the bench with no files."""
    real_decode, calls = bench.decode, []

    def decode(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:  # round 1: stock, vanilla, then fastv-k64-l2
            raise RuntimeError("engine error in a decode step (simulated)")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(bench.timing, "decode", decode)
    argv = ["--preset", "tiny", "--fastv-k", "64", "--repeats", "2", "--warmup", "0", "--decode-tokens", "1", "--no-memory",
            "--no-progress", "--out", str(tmp_path)]
    assert bench.cli(argv) == 1
    by_name = {row["config"]: row for row in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert by_name["fastv-k64-l2"]["status"] == "failed" and "in timed round 1: RuntimeError: engine error" in by_name["fastv-k64-l2"]["note"]
    assert [by_name[name]["repeats"] for name in ("stock", "vanilla")] == [2, 2]
    assert by_name["vanilla"]["status"] == "ok" and by_name["vanilla"]["prefill_ratio"] > 0


def rows_with_a_failing_memory_pass(monkeypatch, tmp_path, failing_call: int, message: str) -> dict[str, dict]:
    """The tiny bench's rows by name, its `failing_call`-th memory pass raising `message` (1 = stock's)."""
    real_memory, calls = bench.measure_memory, []

    def measure_memory(*args, **kwargs):
        calls.append(None)
        if len(calls) == failing_call:
            raise RuntimeError(message)
        return real_memory(*args, **kwargs)

    monkeypatch.setattr(bench.session, "measure_memory", measure_memory)
    argv = ["--preset", "tiny", "--fastv-k", "64", "--repeats", "1", "--warmup", "0", "--decode-tokens", "1", "--no-progress", "--out", str(tmp_path)]
    assert bench.cli(argv) == 1
    return {row["config"]: row for row in json.loads((tmp_path / "bench.json").read_text())["rows"]}


def test_an_error_in_the_memory_pass_fails_that_row_only(tmp_path, monkeypatch):
    by_name = rows_with_a_failing_memory_pass(monkeypatch, tmp_path, 2, "allocator error (simulated)")  # vanilla's
    assert by_name["vanilla"]["status"] == "failed" and "memory or sync pass: RuntimeError: allocator error" in by_name["vanilla"]["note"]
    assert by_name["vanilla"]["prefill_ms"] > 0  # its timings stand
    assert by_name["fastv-k64-l2"]["status"] == "ok" and by_name["fastv-k64-l2"]["peak_mem_mb"] > 0


def test_a_baseline_whose_memory_pass_fails_still_divides_the_others(tmp_path, monkeypatch):
    """Out of memory in the baseline's untimed memory pass (batch 16 on a GPU, say) made it a failed
    row and every ratio NaN, though its timings stand. The row stays failed (exit 1), the ratios are
    made from its timings, as from a row whose passes ran."""
    by_name = rows_with_a_failing_memory_pass(monkeypatch, tmp_path, 1, "out of memory (simulated)")  # stock's
    assert by_name["stock"]["status"] == "failed" and "memory or sync pass: RuntimeError: out of memory" in by_name["stock"]["note"]
    fastv = by_name["fastv-k64-l2"]
    assert fastv["prefill_ratio"] == pytest.approx(fastv["prefill_ms"] / by_name["stock"]["prefill_ms"])
    assert by_name["stock"]["prefill_ratio"] == 1.0


@pytest.mark.parametrize("argv,needle", [
    (["--fastv-k", "64", "--baseline", "vanila"], "--baseline 'vanila' is not a row of this bench: use one of stock, vanilla, fastv-k64-l2"),
    (["--fastv-k", "--fastv-layer", "3"], "--fastv-layer applies to the --fastv-k rows"),
    (["--fastv-k", "--scoring", "eager", "--methods", "divprune"], "--scoring applies to the --fastv-k rows"),
    (["--budgets", "32"], "--budgets applies to the --methods rows"),
    (["--dymu-images", "4"], "--dymu-images is the number of calibration images for --dymu-target"),
    (["--dymu-target", "bogus"], "--dymu-target: --target 'bogus' is not valid"),
    (["--dymu-target", "mid", "--dymu-images", "0"], "--dymu-images 0: use 1 or more"),
    (["--threads", "0"], "--threads 0: use 1 or more"),
    (["--device", "foo"], "--device foo:"),
    (["--model", "./no/such/dir"], "--model ./no/such/dir: not a checkpoint directory"),
    (["--dymu", "no/such.json"], "--dymu: no threshold file at no/such.json"),
    (["--text-tokens", "-5"], "--text-tokens >= 0"),
    (["--model", "no_such_dir"], "--model no_such_dir: not a checkpoint directory"),
    (["--model", "tests"], "--model tests: not a checkpoint directory"),
    (["--out", "tests/conftest.py"], "--out tests/conftest.py: tests/conftest.py is a file: name a folder"),
    (["--out", "tests/conftest.py/sub"], "tests/conftest.py is a file: name a folder"),
    (["--fastv-k", "64.0"], "--fastv-k 64.0:"),
    (["--fastv-k", "--position-mode", "renumbered"], "--position-mode applies to the --fastv-k, --methods, DyMU and hybrid rows"),
    (["--model", "tests", "--seed", "3"], "--seed seeds a --preset's random weights"),
])
def test_bad_settings_are_refused_before_the_model_loads(argv, needle, monkeypatch, capsys):
    """Each was a traceback after the model loaded, a silent "skipped" row, or ignored without a word."""
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bench.session, "build_model", no_load)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--preset", "tiny", "--no-progress", *argv])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_threshold_files_sharing_a_row_name_and_a_malformed_config_are_refused(tmp_path, monkeypatch, capsys):
    """Two different threshold files named alike gave one DyMU row (the second's rows were dropped as
    repeats of the first's name); a config.json that is not JSON was a traceback."""
    from hybrid_vlm.tiny import ensure_tiny_thresholds

    monkeypatch.setattr(bench.session, "build_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    payload = json.loads(Path(ensure_tiny_thresholds()).read_text())
    for folder, scale in (("a", 1.0), ("b", 0.5), ("c", 1.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mid.json").write_text(json.dumps(dict(payload, thresholds=[t * scale for t in payload["thresholds"]])))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases = [(["--dymu", str(tmp_path / "a" / "mid.json"), str(tmp_path / "b" / "mid.json")], "different contents under one row name (dymu-mid)"),
             (["--dymu", str(tmp_path / "a" / "mid.json"), "--dymu-target", "mid"], "--dymu-target mid: its calibrated mid.json would share"),
             (["--model", str(tmp_path / "broken")], "its config.json is not a JSON object")]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--no-progress", *argv])
        assert exit_.value.code == 2 and needle in capsys.readouterr().err, argv
    same = bench.parse_args(["--fastv-k", "--dymu", str(tmp_path / "a" / "mid.json"), str(tmp_path / "c" / "mid.json")])[0]
    assert [config.name for config in bench.build_configs(same)] == ["stock", "vanilla", "dymu-mid"]  # one file's content, one row


def test_dymu_rows_take_every_position_mode():
    """The plugin's DyMU names read HYBRID_POSITIONS; the bench's DyMU row ran logical whatever was asked."""
    from hybrid_vlm.tiny import ensure_tiny_thresholds

    args, _ = bench.parse_args(["--fastv-k", "--dymu", str(ensure_tiny_thresholds()), "--position-mode", "logical", "renumbered"])
    dymu_rows = [config.hybrid for config in bench.build_configs(args) if config.method == "dymu"]
    assert sorted(row.position_mode for row in dymu_rows) == ["logical", "renumbered"]


def test_method_rows_take_every_position_mode_and_the_layer_and_scorer_they_read():
    """--position-mode, --fastv-layer and --scoring reached only the --fastv-k rows: a --methods row
    ran at the first position mode, layer 2 and row scoring whatever was asked."""
    from hybrid_vlm import HybridConfig

    args, _ = bench.parse_args(["--fastv-k", "--methods", "visionzip", "fastv", "dart", "--budgets", "64",
                                "--position-mode", "logical", "renumbered", "--fastv-layer", "1", "3", "--scoring", "row", "eager"])
    ran = {config.hybrid for config in bench.build_configs(args) if config.hybrid is not None}
    modes, layers = ("logical", "renumbered"), (1, 3)
    expected = {HybridConfig()}
    expected |= {HybridConfig(visual_method="visionzip", visual_budget=64, position_mode=m) for m in modes}
    expected |= {HybridConfig(fastv_k=64, fastv_layer=k, scoring=s, position_mode=m) for m in modes for k in layers for s in ("row", "eager")}
    expected |= {HybridConfig(visual_method="dart", visual_budget=64, fastv_layer=k, position_mode=m) for m in modes for k in layers}
    assert ran == expected


def test_next_rows_count_every_crop_and_a_method_s_reads_per_crop():
    """On LLaVA-NeXT the bench's theory is the MACs model of the sample's crops and packed span
    (`flops.next_method_prefill_macs`, checked against FlopCounterMode in test_next_flops), from the
    counts it ran: it fell back to one 576-patch crop (VisionZip 17% high, DivPrune 8% low at 64
    tokens on next-mid), then left these rows empty; PyramidDrop's decode and cache follow the span."""
    from hybrid_vlm import HybridConfig

    shape, image = flops.LLAVA_15_7B, flops.AnyresImage((576, 48, 48), 674)  # a 30:1 strip
    counts = dict(text=[60], visual=[64], visual_kept=[64], vit_counts=None, crops=[3], crop_patches=[[576, 48, 48]], packed=[674])
    for config in (HybridConfig(visual_method="visionzip", visual_budget=64), HybridConfig(visual_method="divprune", visual_budget=64),
                   HybridConfig(fastv_k=64)):
        visual = 674 if config.fastv_k is not None else 64
        theory = bench.theory(shape, dict(counts, visual=[visual]), bench.BenchConfig("m", "m", config), 16, 1, 2)
        expected = flops.next_method_prefill_macs(shape, config, [image], 60, visual_entered=visual, visual_kept=64)
        assert theory["prefill"] == expected.total and theory["vision"] == expected.vision_total
        assert expected.vision > 2 * flops.vit_macs(shape.vit)  # three crops through the tower
    pdrop = HybridConfig(visual_method="pdrop", visual_budget=0.11)
    theory = bench.theory(shape, dict(counts, visual=[674]), bench.BenchConfig("p", "p", pdrop), 16, 1, 2)
    assert theory["kv_prompt"] == flops.staged_kv_cache_bytes(shape, pdrop, 60, 0, 2, [image])
    assert theory["kv_prompt"] != flops.staged_kv_cache_bytes(shape, pdrop, 60, 0, 2)  # not one 576-token image


def test_a_budget_a_staged_method_cannot_reach_on_this_model_is_a_refused_row(tmp_path):
    """Refused at activation (the tiny LLM's 4 layers): it was a "skipped" row, the status for what
    the engine cannot run, while the same refusal on Qwen2.5-VL read "refused"."""
    rows = bench.main(["--preset", "tiny", "--fastv-k", "--methods", "pdrop", "--budgets", "64", "--repeats", "1", "--warmup", "0",
                       "--decode-tokens", "0", "--no-memory", "--no-progress", "--out", str(tmp_path)])
    pdrop = next(row for row in rows if row["method"] == "pdrop")
    assert pdrop["status"] == "refused" and "not reachable by pdrop" in pdrop["note"]


def test_token_counts_are_means_over_the_batch_as_the_evaluation_s_are_over_rows(tmp_path):
    """A DyMU batch merges each image to its own count: the row reports the mean over the samples (the
    statistic the evaluation tables use for tokens), and compare's speed table prints it as a count."""
    from hybrid_tools import compare

    columns = bench.count_columns(dict(text=[60, 60, 60], visual=[190, 195, 203], visual_kept=[64, 64, 64]))
    assert columns["visual_in"] == pytest.approx(196.0) and columns["llm_tokens_in"] == pytest.approx(256.0)
    assert columns["visual_kept"] == 64 and columns["per_sample_counts"]["visual"] == [190, 195, 203]
    row = dict(config="dymu-mid_fastv-k64-l2", status="ok", prefill_ms=10.0, prefill_ratio=0.5, prefill_theory_ratio=0.4,
               decode_ms_per_token=2.0, kv_cache_mb_theory=1.0, **columns)
    assert "| dymu-mid_fastv-k64-l2 | 196 → 64 | 10.0 | 0.500 |" in compare.speed_table(dict(meta=dict(baseline="stock"), rows=[row]))


def test_a_fastv_k_above_the_visual_tokens_is_a_refused_row_not_a_timing_of_nothing_pruned(tmp_path):
    """--fastv-k 1000 on 576 visual tokens timed a 'fastv-k1000-l2' row of 576 -> 576 tokens (run.py
    and the sweep refuse the same value); K equal to the count stays a row (FastV's scoring alone)."""
    rows = bench.main(["--preset", "tiny", "--fastv-k", "1000", "576", "--repeats", "1", "--warmup", "0", "--decode-tokens", "0",
                       "--no-memory", "--no-progress", "--out", str(tmp_path)])
    by_config = {row["config"]: row for row in rows}
    assert by_config["fastv-k1000-l2"]["status"] == "refused"
    assert "K=1000 (--fastv-k, or --budgets with --methods) is more than the 576 visual tokens" in by_config["fastv-k1000-l2"]["note"]
    assert by_config["fastv-k576-l2"]["status"] == "ok" and by_config["fastv-k576-l2"]["visual_kept"] == 576


def test_a_hybrid_row_whose_k_keeps_every_merged_token_says_nothing_was_pruned(tmp_path):
    """DyMU's merged count follows the image, so a FASTV_K at or above it is a setting (not refused),
    but its row timed DyMU alone under a FastV name without a word."""
    rows = bench.main(["--preset", "tiny", "--fastv-k", "500", "16", "--dymu-target", "200", "--dymu-images", "4", "--repeats", "1",
                       "--warmup", "0", "--decode-tokens", "0", "--no-memory", "--no-progress", "--out", str(tmp_path)])
    hybrids = {row["fastv_k"]: row for row in rows if row["dymu"] and row["fastv_k"] is not None}
    assert set(hybrids) == {500, 16} and all(row["status"] == "ok" for row in hybrids.values())
    assert hybrids[500]["visual_kept"] == hybrids[500]["visual_in"] < 500
    assert "K=500 (--fastv-k) keeps every token DyMU left" in hybrids[500]["note"]
    assert "keeps every token DyMU left" not in (hybrids[16]["note"] or "")


def test_stock_qwen_decode_steps_after_a_text_prompt_follow_generate(tiny_qwen):
    """A stock Qwen2.5-VL forward keeps the last image prompt's rope_deltas through a text-only one
    (only generate resets them), and the decode steps run by hand added them: every position was
    off by the image's delta. The bench's prefill resets them as generate does."""
    from conftest import QUESTIONS, qwen_inputs

    model, processor = tiny_qwen
    # one unpadded prompt: a stock prefill without position ids numbers pad slots too, unlike generate
    text = processor(text=["a question about colours here"], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**text, max_new_tokens=5, min_new_tokens=5, do_sample=False)[:, -5:]
        bench.prefill(model, qwen_inputs(processor, QUESTIONS[:1]))  # an image prompt before it sets the deltas
        tokens = bench.decode(model, bench.prefill(model, text), text["attention_mask"], 4)
    assert torch.equal(tokens, expected)


def test_budgets_take_a_kept_share_as_visual_budget_does():
    """LLaVA-NeXT's method defaults are shares (0.11 of each image); --budgets took only counts. A share
    reaches fastv and random as FASTV_K = 1 - share, as the plugin converts VISUAL_BUDGET."""
    args, _ = bench.parse_args(["--preset", "next-mid", "--fastv-k", "--methods", "fastv", "visionzip", "--budgets", "0.11", "256"])
    assert [config.name for config in bench.build_configs(args)] == [
        "stock", "vanilla", "fastv-r0.89-l2", "fastv-k256-l2", "visionzip-b0.11", "visionzip-b256"]
    for bad in ("1.5", "0", "x"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--fastv-k", "--methods", "visionzip", "--budgets", bad])
