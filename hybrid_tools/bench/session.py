"""One bench run: load, time every configuration in interleaved rounds, fill each row (counts,
theory, memory, syncs, kernels), stop cleanly on SIGTERM, write the outputs."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from hybrid_vlm import inputs_for
from hybrid_vlm.calibrate import (
    calibrate_thresholds,
    count_summary,
    measure_token_counts,
    read_threshold_payload,
    shape_mismatch,
    write_threshold_file,
)
from hybrid_vlm.hf_compat import cache_tensor_bytes, output_cache
from hybrid_vlm.hf_compat.llava_next import tower_pixels
from hybrid_vlm.methods import methods_at_a_layer
from hybrid_vlm.model import HybridDecoder
from hybrid_vlm.provenance import portable
from hybrid_vlm.syncs import check_no_host_syncs

from ..presets import bench_image, build_inputs, build_model
from ..report.bench import IDEAL_THEORY_NOTE
from ..sdpa_kernels import PHASES, kernel_summary, profile_sdpa
from .configs import BenchConfig, activate, build_configs, prunes_nothing
from .counts import count_columns, generate_tokens_per_s, theory_columns, token_counts
from .options import KERNEL_TRACE_DECODE_STEPS, SYNC_CHECK_DECODE_STEPS, check_baseline, checked_device_dtype, parse_args
from .output import CSV_COLUMNS, PASS_FAILED, bench_meta, median, print_table, summarize, timed, write_outputs
from .timing import Clock, LlmStartMark, decode, measure_memory, prefill, timed_run


def calibrate_for_bench(model, processor, targets, out_dir: Path, device, dtype, num_images: int = 32) -> list[str]:
    """DyMU thresholds for this very model, by DyMU's calibration on synthetic images.

    On random weights the merge scores say nothing about real images; what matters for timing is
    that the thresholds reach the requested token counts (recorded in each file's "achieved").
    """
    images = [bench_image(processor, seed) for seed in range(2000, 2000 + num_images)]  # the timed image's size (NeXT: its crops)
    processed = processor.image_processor(images, return_tensors="pt")
    # LLaVA-NeXT: thresholds are calibrated on the crops the tower sees
    pixel_values = tower_pixels(model, processed.pixel_values, processed.get("image_sizes")).to(device=device, dtype=dtype)
    paths = []
    for target in targets:
        payload = calibrate_thresholds(model, [pixel_values], target, progress=False)
        thresholds = torch.tensor(payload["thresholds"], dtype=torch.float32, device=device)
        payload["achieved"] = count_summary(measure_token_counts(model, [pixel_values], thresholds, progress=False))
        path = out_dir / f"{target}.json"
        write_threshold_file(path, payload)
        paths.append(str(path))
    return paths


@dataclass
class BenchRun:
    """What every measurement of one bench run shares."""

    args: argparse.Namespace
    model: object
    host_inputs: dict  # the processor's batch, on the CPU
    text_tokens: int
    device: torch.device
    dtype: torch.dtype
    clock: Clock
    mark: LlmStartMark
    stopped: str | None = None  # where a SIGTERM stopped the measurements (`BenchStopped`), else None
    placed: dict = field(default_factory=dict)  # engine or stock forward -> its inputs

    @property
    def inputs(self) -> dict:
        """The batch as the active forward takes it (`hybrid_vlm.inputs_for`), placed once per kind,
        outside every timed region."""
        engine = isinstance(self.model, HybridDecoder)
        if engine not in self.placed:
            self.placed[engine] = inputs_for(self.model, self.host_inputs)
        return self.placed[engine]


class BenchStopped(BaseException):
    """SIGTERM reached the bench (a step's time limit, say): it stops measuring and writes the rows
    with what it has. A BaseException, so that no `except Exception` on the way swallows it."""


def _raise_stopped(signum, frame):
    raise BenchStopped()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a step's time limit, or Ctrl-C: either keeps what was measured


def measure(bench: BenchRun, configs: list[BenchConfig]) -> None:
    """Time every configuration, then fill its row; a SIGTERM ends the timing or the per-row passes
    where it lands, and the rows keep what was measured before it (`bench.stopped` says where)."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # the only thread that may set a handler
    previous = {number: signal.signal(number, _raise_stopped) for number in STOP_SIGNALS} if in_main_thread else {}
    try:
        with torch.inference_mode():
            try:
                time_configs(bench, configs)
            except BenchStopped:
                bench.stopped = "in the warm-up and timed rounds"
            for config in configs:
                config.row = measured_row(bench, config)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main(argv=None) -> list[dict]:
    """The bench's rows (each as written to bench.json)."""
    return run(argv)[0]


def run(argv=None) -> tuple[list[dict], str | None]:
    """(the rows, where a SIGTERM stopped the bench or None)."""
    args, parser = parse_args(argv)
    device, dtype = checked_device_dtype(args, parser)
    try:
        configs = build_configs(args)
    except ValueError as error:
        parser.error(str(error))
    if not args.dymu_target:  # calibrated rows are named after the model loads
        check_baseline(args.baseline, configs, parser)
    torch.set_grad_enabled(False)
    model, processor = build_model(args, device, dtype)
    for path in args.dymu:  # another tower's file was a "refused" row after the whole bench
        problem = shape_mismatch(read_threshold_payload(path), model.config.to_dict())
        if problem:
            parser.error(f"--dymu {path}: {problem}")
    host_inputs, text_tokens = build_inputs(processor, args.text_tokens, args.batch_size, args.image_seed)
    if args.dymu_target:
        configs = with_calibrated_rows(args, parser, model, processor, device, dtype)
    clock = Clock(device)
    bench = BenchRun(args, model, host_inputs, text_tokens, device, dtype, clock, LlmStartMark(model, clock))
    measure(bench, configs)
    bench.mark.remove()
    rows = complete_rows(summarize(configs, args.baseline), args.baseline)
    meta = bench_meta(bench)
    print(header_line(meta, args, text_tokens, bench.stopped))
    print_table(rows)
    base = next(row for row in rows if row["config"] == args.baseline)
    if not timed(base):
        print(f"# no ratios: the baseline row {args.baseline} is {base['status']}", file=sys.stderr)
    if args.out:
        write_outputs(Path(args.out), rows, meta)
        print(f"# wrote {Path(args.out) / 'bench.csv'} and bench.json")
    return rows, bench.stopped


def with_calibrated_rows(args, parser, model, processor, device, dtype) -> list[BenchConfig]:
    """The configurations again, with the rows of the --dymu-target thresholds calibrated on the
    loaded model (into --out, else a scratch folder removed when the bench ends)."""
    if not args.out:  # the rows name files nobody keeps without --out
        args.scratch = tempfile.TemporaryDirectory(prefix="bench-dymu-")
    threshold_dir = Path(args.out) if args.out else Path(args.scratch.name)
    try:
        args.dymu = list(args.dymu) + calibrate_for_bench(model, processor, args.dymu_target, threshold_dir, device, dtype, args.dymu_images)
    except ValueError as error:  # a token count this tower cannot reach, known once it is loaded
        parser.error(str(error).replace("--target ", "--dymu-target ", 1))
    configs = build_configs(args)
    check_baseline(args.baseline, configs, parser)
    return configs


def complete_rows(rows: list[dict], baseline: str) -> list[dict]:
    """Every row with every CSV column (NaN or None where not measured) and what its ratios divide by."""
    for row in rows:
        row["ratios_divide_by"] = baseline  # the CSV stands alone: what its ratios divide by
        for column in CSV_COLUMNS:
            row.setdefault(column, math.nan if column.endswith(("_ms", "_mb", "_ratio", "_theory", "_gmacs")) else None)
    return rows


def header_line(meta: dict, args, text_tokens: int, stopped: str | None) -> str:
    """The terminal table's first line: machine, versions, shape, statistic, baseline, and a stop."""
    return (
        f"# {meta['device']} {meta.get('gpu') or meta['cpu']} | torch {meta['torch']} transformers {meta['transformers']} "
        f"| threads {meta['torch_threads']} | {meta['preset'] or meta['model']} {meta['dtype']} batch {args.batch_size} "
        f"| text {text_tokens} tokens | times: median of {args.repeats} after {args.warmup} warm-up | ratios: ÷ {args.baseline}"
        + (f" | stopped by SIGTERM or Ctrl-C {stopped}: each row's `repeats` says how many rounds it has" if stopped else "")
    )


def time_configs(bench: BenchRun, configs: list[BenchConfig]) -> None:
    """Warm-up and token counts per configuration, then --repeats interleaved timed rounds."""
    args, model = bench.args, bench.model
    for config in configs:
        try:  # a configuration the engine cannot run (yet) is reported, not fatal
            activate(model, config)
        except ValueError as error:  # a setting this model refuses (a budget a staged method cannot reach)
            config.status, config.note = "refused", f"{type(error).__name__}: {error}"
        except Exception as error:
            config.status, config.note = "skipped", f"{type(error).__name__}: {error}"
    runnable = [c for c in configs if c.status == "ok"]
    bar = tqdm(total=len(runnable) * (args.warmup + args.repeats), desc="bench", unit="run", file=sys.stderr, disable=args.no_progress)
    for config in runnable:
        activate(model, config)
        inputs = bench.inputs
        bar.set_postfix_str(config.name)
        try:
            for _ in range(args.warmup):
                timed_run(model, inputs, bench.clock, bench.mark, args.decode_tokens)
                bar.update()
            output = prefill(model, inputs)
        except ValueError as error:  # a setting these inputs make impossible (a budget a staged method cannot reach)
            config.status, config.note = "refused", f"{type(error).__name__}: {error}"
            continue
        except Exception as error:  # an engine error or out of memory: the other rows are still measured
            config.status, config.note = "failed", f"{type(error).__name__}: {error}"
            continue
        config.counts = token_counts(model, inputs, output, config)
        config.kv_bytes_prompt = cache_tensor_bytes(output_cache(output))
        del output
        problem = prunes_nothing(config)
        if problem:
            config.status, config.note = "refused", problem
    runnable = [c for c in runnable if c.status == "ok"]
    for _ in range(args.repeats):
        for config in [c for c in runnable if c.status == "ok"]:
            activate(model, config)
            bar.set_postfix_str(config.name)
            try:  # the first decode steps run here when there is no warm-up; out of memory may come late
                config.runs.append(timed_run(model, bench.inputs, bench.clock, bench.mark, args.decode_tokens)[0])  # the output is freed at once
            except Exception as error:  # noqa: BLE001 - the row says what it was; the others are still timed
                config.status, config.note = "failed", f"in timed round {len(config.runs) + 1}: {type(error).__name__}: {error}"
            bar.update()
    bar.close()


def measured_row(bench: BenchRun, config: BenchConfig) -> dict:
    """One configuration's row: setting, median times, token counts, theory, memory and syncs."""
    row = setting_columns(bench, config)
    if config.status != "ok":
        return row
    if not config.runs:
        row.update(status="stopped", note=f"not timed: the bench was stopped by SIGTERM or Ctrl-C {bench.stopped}")
        return row
    activate(bench.model, config)
    row.update(timing_columns(config.runs, bench.args))
    row["kv_cache_mb_prompt"] = config.kv_bytes_prompt / 2**20
    row.update(count_columns(config.counts))
    row.update(theory_columns(bench, config, row))
    row["note"] = dymu_note(config, row["note"])
    if len(config.runs) < bench.args.repeats:
        row["note"] = with_note(row["note"], f"{len(config.runs)} of {bench.args.repeats} timed rounds: stopped by SIGTERM or Ctrl-C")
    if bench.stopped is None:
        try:
            row.update(row_passes(bench))
        except BenchStopped:
            bench.stopped = f"in the memory, sync and kernel passes of `{config.name}`"
        except Exception as error:  # noqa: BLE001 - its timings stand; the row is failed and says where
            row.update(status="failed", failed_in=PASS_FAILED, note=with_note(row["note"], f"{PASS_FAILED}: {type(error).__name__}: {error}"))
    if bench.stopped is not None:
        for key in ("mem_kind", "sync_debug"):
            row.setdefault(key, "not run: stopped by SIGTERM or Ctrl-C")
    return row


def setting_columns(bench: BenchRun, config: BenchConfig) -> dict:
    """The row's identity: its configuration's settings, batch and prompt, and its status so far."""
    hybrid = config.hybrid
    at_a_layer = getattr(hybrid, "prunes", False) and hybrid.llm_method in methods_at_a_layer()  # pdrop's and sparsevlm's stages have their own layers
    return dict(
        config=config.name, status=config.status, method=config.method, note=config.note,
        fastv_k=getattr(hybrid, "fastv_k", None), fastv_layer=hybrid.fastv_layer if at_a_layer else None,
        scoring=hybrid.scoring if at_a_layer and hybrid.staged_method is None and hybrid.fastv_select == "attention" else None,
        position_mode=getattr(hybrid, "position_mode", None),
        dymu=portable(getattr(hybrid, "dymu", None)), mask_read=getattr(hybrid, "mask_read", None),
        batch_size=bench.args.batch_size, text_tokens=bench.text_tokens,
        repeats=len(config.runs),
    )


def timing_columns(runs: list[dict], args) -> dict:
    """Medians over the timed rounds (host times where recorded), the prefill's range, tokens/s."""
    columns = {key: median([run[key] for run in runs if key in run]) for key in ("vision_ms", "llm_prefill_ms", "prefill_ms", "decode_ms_per_token")}
    for key in ("prefill_host_ms", "decode_host_ms_per_token"):
        if any(key in run for run in runs):
            columns[key] = median([run[key] for run in runs if key in run])
    prefill_times = [run["prefill_ms"] for run in runs]
    columns.update(prefill_ms_min=min(prefill_times), prefill_ms_max=max(prefill_times), runs=runs)
    columns["generate_tokens_per_s"] = generate_tokens_per_s(runs, args.batch_size, args.decode_tokens)
    return columns


def dymu_note(config: BenchConfig, note: str) -> str:
    """A DyMU row's note: how its vision MACs were counted, and a K that prunes nothing after DyMU."""
    hybrid = config.hybrid
    if hybrid is None or not hybrid.dymu:
        return note
    note = (IDEAL_THEORY_NOTE if config.counts["vit_counts"] is not None
            else f"vision MACs counted unmerged: the per-layer CLIP counts could not be taken ({config.counts['vit_counts_error']})")
    most = max(config.counts["visual"])
    if isinstance(hybrid.fastv_k, int) and hybrid.fastv_k >= most:
        note = with_note(note, f"K={hybrid.fastv_k} (--fastv-k) keeps every token DyMU left (at most {most}): nothing is pruned after DyMU here")
    return note


def with_note(note: str | None, more: str) -> str:
    """A row's note with one more remark after it."""
    return "; ".join(filter(None, [note, more]))


def row_passes(bench: BenchRun) -> dict:
    """The untimed passes of the active configuration: peak memory, host syncs, SDPA backends."""
    args, columns = bench.args, {}
    if args.no_memory:
        columns.update(peak_mem_mb=math.nan, peak_mem_abs_mb=math.nan, mem_kind="skipped")
    else:
        columns["peak_mem_mb"], columns["peak_mem_abs_mb"], columns["mem_kind"] = measure_memory(bench.model, bench.inputs, bench.device, args.decode_tokens)
    columns["sync_debug"] = check_no_host_syncs(bench.model, bench.inputs, SYNC_CHECK_DECODE_STEPS) if args.sync_debug else "not run"
    if args.kernels:
        try:  # a trace that fails (a profiler without CUPTI, say) must not cost the row its timings
            columns["sdpa_kernels"] = traced_kernels(bench)
            columns["sdpa_prefill"], columns["sdpa_decode"] = (columns["sdpa_kernels"][phase]["layers"] for phase in PHASES)
        except Exception as error:  # noqa: BLE001 - reported in the row, whatever it is
            columns["sdpa_prefill"] = columns["sdpa_decode"] = f"error: {type(error).__name__}: {str(error)[:160]}"
    return columns


def traced_kernels(bench: BenchRun) -> dict:
    """The SDPA backend of every layer in one profiled prefill + KERNEL_TRACE_DECODE_STEPS decode steps."""
    model, inputs = bench.model, bench.inputs
    calls = profile_sdpa(
        model, lambda: prefill(model, inputs), lambda output: decode(model, output, inputs["attention_mask"], KERNEL_TRACE_DECODE_STEPS),
        bench.device,
    )
    return kernel_summary(calls)


def cli(argv=None) -> int:
    """`python -m hybrid_tools.bench`: 1 when a configuration failed (its row says why) or a SIGTERM
    stopped the bench (what was measured is written), else 0."""
    rows, stopped = run(argv)
    return 1 if stopped or any(row["status"] == "failed" for row in rows) else 0
