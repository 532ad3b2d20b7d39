"""hybrid_tools.parity: the pairs it compares really take the paths they are named for, and its
comparison sees a difference where one is planted."""

from __future__ import annotations

import pytest
import torch

import hybrid_vlm.hf_compat.llava as llava_compat
from hybrid_tools import bench, parity, presets


def test_tiny_pairs_agree_and_take_their_own_sdpa_paths(monkeypatch):
    calls = []  # per LLM SDPA call of the engine: was a mask passed
    original = llava_compat.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        calls.append(attn_mask is not None)
        return original(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(llava_compat, "scaled_dot_product_attention", spy)
    torch.set_grad_enabled(False)
    model, processor = presets.build_model(bench.parse_args(["--preset", "tiny"])[0], torch.device("cpu"), torch.float32)
    inputs, _ = presets.build_inputs(processor, 60, 1, 0)
    steps, layers = 3, model.config.text_config.num_hidden_layers
    per_run = layers * (1 + steps)

    same = parity.engine_vs_stock(model, inputs, steps)
    assert calls == [False] * per_run  # the engine's run: batch 1, no padding, so no mask anywhere
    calls.clear()
    pair = parity.unmasked_vs_masked(model, inputs, steps, fastv_k=64)
    assert calls == [True] * per_run + [False] * per_run  # masked run first, then the mask-free one

    for result in (same, pair):
        assert result["relative_logit_diff"] < 1e-5
        assert result["greedy_tokens"] == steps + 1 and result["greedy_tokens_shared"] == steps + 1
        assert result["first_parting_step"] is None
    assert same["kept_positions_equal"] is None and pair["kept_positions_equal"] is True


def test_compare_reports_a_planted_difference():
    logits = torch.tensor([[1.0, 3.0, 2.5, -4.0]])
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    reference = dict(logits=logits, kept=torch.tensor([[0, 2, 3]]), tokens=tokens)
    candidate = dict(logits=logits + torch.tensor([[0.0, 0.0, 0.5, 0.0]]), kept=torch.tensor([[0, 1, 3]]), tokens=torch.tensor([[5, 6, 7, 1, 9]]))
    result = parity.compare(reference, candidate)
    assert result["max_abs_logit_diff"] == 0.5 and result["max_abs_logit"] == 4.0 and result["relative_logit_diff"] == 0.125
    assert result["top1_margin"] == 0.5  # 3.0 - 2.5
    assert result["greedy_tokens_shared"] == 3 and result["first_parting_step"] == 3  # step 4 agrees again: not counted
    assert result["kept_positions_equal"] is False and result["kept_positions_differing"] == 1  # 2 dropped for 1


def test_compare_counts_the_kept_positions_a_sample_lost():
    reference = torch.tensor([[0, 4, 5, 9], [1, 2, 3, 9]])
    candidate = torch.tensor([[0, 4, 5, 9], [0, 1, 7, 9]])  # sample 1 lost 2 and 3, in other slots of the row
    assert parity.positions_not_kept_by(candidate, reference) == 2
    assert parity.positions_not_kept_by(reference, reference) == 0


def test_report_renders_a_parity_file_as_written(tmp_path, monkeypatch):
    from hybrid_tools.report import cli as report

    monkeypatch.chdir(tmp_path)
    written = parity.main(["--preset", "tiny", "--new-tokens", "2", "--out", "parity.json"])
    bench.main(["--preset", "tiny", "--fastv-k", "--repeats", "1", "--warmup", "0", "--decode-tokens", "0", "--no-memory", "--no-progress", "--out", "bench"])
    assert report.main(["bench", "--parity", "parity.json", "--name", "p"]) == 0
    table = (tmp_path / "reports" / "p" / "report.md").read_text().split("## Parity", 1)[1]
    for name, numbers in written["comparisons"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {numbers['greedy_tokens_shared']} / {numbers['greedy_tokens']} |" in row
    assert report.main(["bench", "--parity", "missing.json", "--name", "p"]) == 2


def test_a_parity_run_stopped_after_its_first_comparison_keeps_it(tmp_path, monkeypatch):
    """The GPU run gives parity a time limit: each comparison is written as it completes, and the
    report says the file is incomplete instead of passing it off as the whole run."""
    from hybrid_tools.report import cli as report

    monkeypatch.chdir(tmp_path)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what the time limit's signal does to the second comparison

    monkeypatch.setattr(parity, "unmasked_vs_masked", stopped)
    with pytest.raises(KeyboardInterrupt):
        parity.main(["--preset", "tiny", "--new-tokens", "2", "--out", "parity.json"])
    bench.main(["--preset", "tiny", "--fastv-k", "--repeats", "1", "--warmup", "0", "--decode-tokens", "0", "--no-memory", "--no-progress", "--out", "bench"])
    assert report.main(["bench", "--parity", "parity.json", "--name", "p"]) == 0
    table = (tmp_path / "reports" / "p" / "report.md").read_text().split("## Parity", 1)[1]
    assert "**Stopped early**" in table and "| engine (nothing cut) vs stock transformers |" in table and "FastV K=" not in table


def test_report_shows_how_many_kept_positions_differ():
    from hybrid_tools.report.parity import parity_lines

    numbers = dict(max_abs_logit_diff=0.1, relative_logit_diff=0.01, top1_margin=0.5, greedy_tokens=3, greedy_tokens_shared=3, first_parting_step=None)
    data = dict(meta={}, comparisons={"new": dict(numbers, kept_positions_equal=False, kept_positions_differing=2),
                                      "old file": dict(numbers, kept_positions_equal=False)})
    rows = [line for line in "\n".join(parity_lines(data, "p.json")).splitlines() if line.startswith("| new |") or line.startswith("| old file |")]
    assert rows[0].endswith("| no (2 at most in a sample) |") and rows[1].endswith("| no |")
