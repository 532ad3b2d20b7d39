"""Parity results in a report: reading `python -m hybrid_tools.parity --out FILE` and its table."""

from __future__ import annotations

from pathlib import Path

from vlmeval_plugin.results import read_json

from .markdown import fmt, md_table

HEADER = ["comparison", "max abs logit diff", "over max abs logit", "reference top-1 margin", "greedy tokens shared", "first parting step", "kept positions equal"]


def read_parity(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"--parity {path}: no such file (python -m hybrid_tools.parity --out FILE writes one)")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("comparisons"), dict):
        raise ValueError(f"{path} is not a hybrid_tools.parity file (no 'comparisons')")
    return data


def parity_lines(data: dict, source: str) -> list[str]:
    meta = data.get("meta") or {}
    device = meta.get("gpu") or meta.get("cpu") or "?"
    lines = [
        "## Parity (`python -m hybrid_tools.parity`)", "",
        f"From `{source}`: preset `{meta.get('preset', '?')}`, {meta.get('dtype', '?')}, {meta.get('device', '?')} ({device}), "
        f"a prefill and {meta.get('new_tokens', '?')} greedy decode steps per run; torch {meta.get('torch', '?')}, "
        f"transformers {meta.get('transformers', '?')}. The first run of each pair is the reference.", "",
    ]
    if data.get("complete") is False:
        lines += ["**Stopped early** (its time limit, or an error: see the run's log): only the comparisons below were measured.", ""]
    rows = []
    for name, c in data["comparisons"].items():
        kept = c.get("kept_positions_equal")
        rows.append([
            name, fmt(c.get("max_abs_logit_diff"), ".3g"), fmt(c.get("relative_logit_diff"), ".2e"), fmt(c.get("top1_margin"), ".3g"),
            f"{c.get('greedy_tokens_shared')} / {c.get('greedy_tokens')}", "none" if c.get("first_parting_step") is None else str(c["first_parting_step"]),
            "–" if kept is None else ("yes" if kept else kept_difference(c.get("kept_positions_differing"))),
        ])
    return lines + [md_table(HEADER, rows, align="lrrrrrr"), ""]


def kept_difference(differing) -> str:
    return "no" if differing is None else f"no ({differing} at most in a sample)"  # None: a file from before the count
