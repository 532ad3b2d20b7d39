"""Bench results in a report: reading bench.json (`python -m hybrid_tools.bench --out DIR`) and its table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hybrid_vlm.provenance import shell_join
from vlmeval_plugin.results import read_json

from .markdown import fmt, md_table


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
        raise ValueError(f"{path} is not a hybrid_tools.bench bench.json (no 'rows')")
    csv_path = path.with_name("bench.csv")
    return Bench(path=path, meta=data.get("meta") or {}, rows=data["rows"], csv_path=csv_path if csv_path.exists() else None)


def bench_baseline(meta: dict, rows: list[dict]) -> str | None:
    """The row a bench's ratios divide by: its meta's record, else its rows' (`ratios_divide_by`),
    else None (not recorded: no default is guessed, the report says so)."""
    if meta.get("baseline"):
        return meta["baseline"]
    return next((row["ratios_divide_by"] for row in rows if row.get("ratios_divide_by")), None)


IDEAL_THEORY_NOTE = "vision MACs at the merged per-layer CLIP counts (ideal: a static-shape tower computes every slot)"
IDEAL_THEORY_FOOTNOTE = (
    "A prefill theory marked * (DyMU, alone or with FastV) is an ideal: it counts the CLIP layers at their merged "
    "token counts, as the official batch-1 loop runs them, while the engine's static-shape tower computes all 577 "
    "slots in every layer (so that a batch needs no host read) and projects all 576 patches; its `ratio − theory` "
    "holds that gap."
)


def prefill_theory_text(row: dict) -> str:
    """The row's prefill theory ratio, marked * where it is DyMU's ideal (`IDEAL_THEORY_FOOTNOTE`)."""
    text = fmt(row.get("prefill_theory_ratio"), ".3f")
    return text + "*" if str(row.get("note") or "").startswith(IDEAL_THEORY_NOTE) and text != "–" else text


BENCH_HEADER = [
    "config", "method", "visual in→kept (mean)", "vision ms (median)", "LLM prefill ms (median)", "prefill ms (median)", "prefill GMACs",
    "prefill ratio", "theory", "ratio − theory", "LLM prefill ratio", "theory", "decode ms/token (median)",
    "decode ratio", "theory", "peak MiB",
]


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
            fmt(r.get("prefill_ratio"), ".3f"), prefill_theory_text(r),
            fmt(r.get("prefill_ratio_minus_theory"), "+.3f"),
            fmt(r.get("llm_prefill_ratio"), ".3f"), fmt(r.get("llm_prefill_theory_ratio"), ".3f"),
            fmt(r.get("decode_ms_per_token"), ".2f"), fmt(r.get("decode_ratio"), ".3f"), fmt(r.get("decode_theory_ratio"), ".3f"),
            fmt(r.get("peak_mem_mb"), ".0f"),
        ])
    return md_table(BENCH_HEADER, rows, align="ll" + "r" * (len(BENCH_HEADER) - 2))


def bench_command(meta: dict) -> str | None:
    argv = meta.get("argv")
    if not isinstance(argv, list):
        return None
    return "python -m hybrid_tools.bench " + shell_join(argv)


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
        + (f". **Stopped early** by SIGTERM or Ctrl-C {meta['stopped']}: each row's note gives the rounds it completed, and passes "
           "not run say so" if meta.get("stopped") else "")
    )


RESOURCES_HEADER = [
    "config", "peak MiB", "KV MiB after prompt", "theory", "decode ms/token (median)", "host ms: prefill / decode step (median)",
    "generate tokens/s (median)", "host syncs", "SDPA in the prefill", "SDPA per decode step",
]


RESOURCES_NOTE = (
    "\"KV MiB after prompt\" is read off the cache: it includes the slots a batch pads (unequal prompt lengths; "
    "with DyMU, the images' unequal merged counts), while its theory counts each sample's own tokens, so the two "
    "agree only where nothing is padded. \"host ms\" (CUDA only) is the host's median time until the prefill and a "
    "decode step returned, their kernels queued: well below the GPU's time, the GPU sets the pace; close to it, the "
    "host's launches do, or the host waited for the GPU (a full launch queue, a designed read)."
)


def resources_table(bench: Bench) -> str | None:
    """Memory, cache, throughput, syncs and SDPA backends per row; None for a bench.json written
    before the bench measured the cache (its rows have no kv_cache_mb_prompt)."""
    ok = [r for r in bench.rows if r.get("status") == "ok"]
    if not any("kv_cache_mb_prompt" in r for r in ok):
        return None
    rows = [[
        f"`{r.get('config')}`", fmt(r.get("peak_mem_mb"), ".0f"), fmt(r.get("kv_cache_mb_prompt"), ".1f"),
        fmt(r.get("kv_cache_mb_prompt_theory"), ".1f"), fmt(r.get("decode_ms_per_token"), ".2f"), host_times(r),
        fmt(r.get("generate_tokens_per_s"), ".0f"), str(r.get("sync_debug") or "–"),
        str(r.get("sdpa_prefill") or "not traced"), str(r.get("sdpa_decode") or "not traced"),
    ] for r in ok]
    return md_table(RESOURCES_HEADER, rows, align="lrrrrrrlll")


def host_times(row: dict) -> str:
    """The host's prefill and per-step decode times (CUDA rows), or "–" (CPU rows have none)."""
    if "prefill_host_ms" not in row:
        return "–"
    return f"{fmt(row['prefill_host_ms'], '.2f')} / {fmt(row.get('decode_host_ms_per_token'), '.2f')}"
