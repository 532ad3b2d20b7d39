"""Smoke tests of `python -m hybrid_vlm.bench`: it runs and writes its files. Speed is never asserted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from hybrid_vlm import bench, flops
from hybrid_vlm.tiny import build_tokenizer


def test_tiny_cli_writes_csv_and_json(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_vlm.bench", "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fastv-k64-l2" in result.stdout and "theory" in result.stdout

    with open(out / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.CSV_COLUMNS
        rows = {row["config"]: row for row in reader}
    assert list(rows) == ["vanilla", "fastv-k288-l2", "fastv-k144-l2", "fastv-k64-l2"]
    for name, kept in [("vanilla", 576), ("fastv-k288-l2", 288), ("fastv-k144-l2", 144), ("fastv-k64-l2", 64)]:
        row = rows[name]
        assert row["status"] == "ok"
        assert float(row["visual_in"]) == 576 and float(row["visual_kept"]) == kept
        assert float(row["text_tokens"]) == 60
        for column in ("vision_ms", "llm_prefill_ms", "prefill_ms", "decode_ms_per_token", "prefill_gmacs", "prefill_ratio"):
            assert float(row[column]) > 0, column
        assert row["sync_debug"] == "not run"
    assert float(rows["vanilla"]["prefill_theory_ratio"]) == 1.0
    assert float(rows["fastv-k64-l2"]["prefill_theory_ratio"]) < float(rows["fastv-k144-l2"]["prefill_theory_ratio"]) < 1

    data = json.loads((out / "bench.json").read_text())
    meta = data["meta"]
    for key in ("device", "torch", "transformers", "hybrid_vlm", "cpu", "torch_threads", "preset", "shape"):
        assert key in meta
    assert [row["config"] for row in data["rows"]] == list(rows)
    assert len(data["rows"][0]["runs"]) == 1


def test_theory_columns_match_flops(tmp_path):
    rows = bench.main(
        ["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--decode-tokens", "1", "--no-memory", "--no-progress",
         "--fastv-k", "0.5", "--fastv-layer", "1", "--scoring", "row", "eager", "--dymu", str(tmp_path / "none.json"),
         "--stock", "--sync-debug"]
    )  # fmt: skip
    by_name = {row["config"]: row for row in rows}
    assert set(by_name) >= {"stock", "vanilla", "fastv-r0.5-l1", "fastv-r0.5-l1_scoring-eager"}
    dymu_rows = [row for row in rows if row["method"] in ("dymu", "hybrid")]
    assert len(dymu_rows) == 3 and all(row["status"] in ("ok", "skipped") for row in dymu_rows)
    assert by_name["stock"]["sync_debug"].startswith("skipped")

    from hybrid_vlm.tiny import build_tiny_llava

    shape = flops.shape_from_config(build_tiny_llava()[0].config)
    expected = flops.prefill_macs(shape, 60, visual_kept=288, fastv_layer=1, scoring="row")
    assert by_name["fastv-r0.5-l1"]["prefill_gmacs"] == pytest.approx(expected.total / 1e9)
    assert by_name["fastv-r0.5-l1"]["prefill_theory_ratio"] == pytest.approx(
        expected.total / flops.prefill_macs(shape, 60).total
    )


def test_7b_preset_config_and_cpu_refusal(capsys):
    config = bench.preset_config("llava-1.5-7b", build_tokenizer())
    assert flops.shape_from_config(config) == flops.LLAVA_15_7B
    assert flops.shape_from_config(bench.preset_config("mid", build_tokenizer())).llm.hidden == 1024
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--preset", "llava-1.5-7b", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--device cuda" in capsys.readouterr().err
