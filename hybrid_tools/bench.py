"""Speed benchmark: vanilla vs FastV (vs DyMU / hybrid) in one process, measured beside theory.

For every configuration it measures, on one synthetic image plus a prompt padded to
--text-tokens with the real processor (batch --batch-size, identical samples, no padding):

- vision_ms: forward start until the first LLM layer starts (CLIP tower + projector + embedding
  and scatter). The split point is a pre-hook on LLM layer 0's input norm, so it holds for the
  stock forward, the hybrid engine and a DyMU tower alike, within one forward.
- llm_prefill_ms: from there to the logits of the last prompt token (logits_to_keep=1).
- prefill_ms: the whole prefill forward (= time to first token without sampling).
- decode_ms_per_token: --decode-tokens greedy steps over the cache, mean per step.
- on CUDA, prefill_host_ms and decode_host_ms_per_token: the host's time until the calls returned,
  with their kernels queued, not necessarily run. Well below prefill_ms / decode_ms_per_token, the
  GPU sets the pace. Close to them, either the host's kernel launches do (launch-bound, as a 7B
  decode step at batch 1 may be) or the host waited for the GPU: on a full launch queue, or at a
  designed host read (DyMU's count, MASK_READ=once).
- generate_tokens_per_s: batch x (decode_tokens + 1) new tokens over one run's prefill + decode time
  (the prefill yields the first token), the median over runs.
- kv_cache_mb_prompt: bytes the cache's key and value tensors hold after the prompt, measured on the
  cache itself, beside kv_cache_mb_prompt_theory from the token counts (hybrid_vlm.flops).
- with --kernels, one profiled prefill + decode per configuration: the SDPA backend (flash,
  efficient, cudnn, math) of each LLM layer, with or without an explicit mask, and the vision
  tower's calls (hybrid_tools.sdpa_kernels).
- peak memory, in a separate untimed pass: on CUDA torch.cuda.max_memory_allocated() minus the
  allocation before the pass (activations + KV cache; the weights are excluded; peak_mem_abs_mb
  has the absolute peak); on CPU the peak resident set size (sampled from /proc/self/statm every
  ~1 ms by a thread, after malloc_trim) minus the RSS before the pass: an approximation. Every
  *_mb column (memory and KV cache) is in MiB (2**20 bytes), as the tables label it.
- tokens entering the LLM and kept after FastV (from the cache's hybrid_state), and the
  theoretical MACs of each stage from hybrid_vlm.flops for those very counts (per batch).
- ratios vs the baseline ("stock": unpatched transformers with attn_implementation="sdpa", timed in
  every run) for measured times and theoretical MACs, and their difference. The "vanilla" row (the
  hybrid engine with nothing cut) stays beside it: its ratio is the engine's own overhead.

Timing: torch.inference_mode; --warmup runs per configuration, then --repeats rounds that visit
every configuration in turn (interleaved, so drift hits all alike); the median is reported (min
and max too). On CUDA the stages are timed with CUDA events after a synchronize.

    python -m hybrid_tools.bench --preset mid --fastv-k 288 144 64 --repeats 5 --out runs/bench-mid
    python -m hybrid_tools.bench --preset tiny --fastv-layer 1 2 3 --fastv-k 144      # layer ablation
    python -m hybrid_tools.bench --preset tiny --fastv-k 144 --scoring row eager        # scorer ablation
    python -m hybrid_tools.bench --preset llava-1.5-7b --device cuda --dtype bfloat16 --sync-debug   # real shapes, bf16 (auto: fp16)
    python -m hybrid_tools.bench --preset next-mid --fastv-k 576 288 144 --dymu-target mid   # LLaVA-NeXT, CPU
    python -m hybrid_tools.bench --preset mid --fastv-k --methods fastv visionzip vispruner divprune random pool --budgets 64
    python -m hybrid_tools.bench --preset llava-next-7b --device cuda                  # NeXT real shapes
    python -m hybrid_tools.bench --preset qwen-mid --fastv-k 640 320 160               # Qwen2.5-VL layout, CPU
    python -m hybrid_tools.bench --preset qwen2.5-vl-7b --device cuda --fastv-k 640 320 160 --sync-debug

LLaVA-NeXT presets (next-mid, llava-next-7b) bench one 640 x 480 image, which anyres turns into a
base image + 4 crops and 2,340 visual tokens (576 base, 36 x 48 unpadded grid, 36 newlines).
Qwen2.5-VL presets (qwen-mid: LLM 1024 x 16 layers, 16 query / 2 KV heads, ViT 384 x 8 blocks with
full attention at 3 and 7; qwen2.5-vl-7b: Qwen2.5-VL-7B-Instruct's shape) bench one 1120 x 896
image: 80 x 64 patches, 1,280 tokens; their MACs come from `hybrid_vlm.qwen_flops`, for the counts
that ran (a method before the LLM: the units that entered it), except PyramidDrop's and DART's,
whose per-layer counts follow the image: their theory columns stay empty, as in the plugin's rows
(on LLaVA-NeXT too, whose packed span follows the aspect ratio; there every method before the LLM
leaves them empty as well: its per-crop reads, projection and scoring are not modelled).

A configuration the engine refuses for this model or these inputs, by a ValueError naming the
setting (a method not available on this model, a budget a staged method cannot reach), is a
"refused" row; one whose set-up raised anything else a "skipped" row; one that raised on the way
(an engine error, out of memory) a "failed" row, and the command then exits with status 1.
Each names the error, and the other rows are timed as usual.

Presets: tiny (hybrid_vlm.tiny), mid (Llama 1024 x 16 layers / 16 heads / MLP 2816; CLIP 384 x
6 layers / 6 heads / MLP 1536, so vision is ~6% of prefill MACs, ~4.6% in LLaVA-1.5-7B), vit-l (the
real CLIP ViT-L/14-336 tower in front of mid's LLM: vision-tower timings on CPU), llava-1.5-7b
(CLIP ViT-L/14-336 + Llama-7B shapes, random weights; CUDA only). --model DIR loads a checkpoint.

A SIGTERM (`timeout` at a step's limit) or Ctrl-C stops the bench where it lands; it still writes every row
from the rounds it completed (each row's note says how many; the memory, sync and kernel passes not
run say so), records where it stopped in the meta (`stopped`) and in the header, and exits with
status 1.

Every setting is checked before the model loads: one that no row reads (--budgets without
--methods, say), a --baseline that names no row, a bad --dymu-target, a missing file or directory.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from hybrid_vlm import HybridConfig, __version__, apply_hybrid, flops, inputs_for, parse_fastv_k, remove_hybrid
from hybrid_vlm.calibrate import (
    calibrate_thresholds, count_summary, measure_token_counts, read_threshold_payload, shape_mismatch, write_threshold_file,
)
from hybrid_vlm.config import MASK_READS
from hybrid_vlm.dymu import check_target_name, threshold_merge_mask
from hybrid_vlm.hf_compat import cache_kwarg, cache_tensor_bytes, first_llm_module, output_cache
from hybrid_vlm.hf_compat.clip import merging_vision_forward
from hybrid_vlm.hf_compat.loading import looks_like_hub_id
from hybrid_vlm.hf_compat.llava_next import anyres_layouts, crop_pixels, tower_pixels
from hybrid_vlm.hf_compat.qwen2_5_vl import stock_decode_positions
from hybrid_vlm.methods import get_method, list_methods, methods_at_a_layer
from hybrid_vlm.model import HybridDecoder
from hybrid_vlm.provenance import git_state, portable
from hybrid_vlm.qwen_flops import QwenShape, qwen_method_prefill_macs
from hybrid_vlm.runtime import DTYPE_CHOICES, resolve_device, resolve_dtype
from hybrid_vlm.syncs import check_no_host_syncs
from vlmeval_plugin.results import number_text, text_table

from .report.bench import IDEAL_THEORY_FOOTNOTE, IDEAL_THEORY_NOTE, prefill_theory_text
from .presets import GPU_PRESETS, PRESETS, bench_image, bench_shape, build_inputs, build_model, model_type_of
from .sdpa_kernels import PHASES, kernel_summary, profile_sdpa

CSV_COLUMNS = (
    "config", "status", "method", "fastv_k", "fastv_layer", "scoring", "position_mode", "dymu", "mask_read",
    "batch_size", "repeats", "text_tokens", "visual_in", "visual_kept", "llm_tokens_in", "llm_tokens_kept",
    "vision_ms", "llm_prefill_ms", "prefill_ms", "prefill_ms_min", "prefill_ms_max", "decode_ms_per_token",
    "prefill_host_ms", "decode_host_ms_per_token",
    "generate_tokens_per_s", "peak_mem_mb", "peak_mem_abs_mb", "mem_kind", "kv_cache_mb_theory",
    "kv_cache_mb_prompt", "kv_cache_mb_prompt_theory",
    "vision_gmacs", "llm_prefill_gmacs", "prefill_gmacs", "decode_gmacs_per_token",
    "prefill_ratio", "prefill_theory_ratio", "prefill_ratio_minus_theory",
    "llm_prefill_ratio", "llm_prefill_theory_ratio", "llm_prefill_ratio_minus_theory",
    "decode_ratio", "decode_theory_ratio", "ratios_divide_by", "llm_prefill_gmacs_per_s", "sync_debug", "sdpa_prefill", "sdpa_decode",
    "note",
)
# bench.csv names each column's statistic, as the report's headers do; bench.json keeps the row keys
# (its meta says the same in `statistics`), which every reader of committed runs uses.
MEDIAN_COLUMNS = ("vision_ms", "llm_prefill_ms", "prefill_ms", "decode_ms_per_token", "prefill_host_ms",
                  "decode_host_ms_per_token", "generate_tokens_per_s")
MEAN_COLUMNS = ("visual_in", "visual_kept", "llm_tokens_in", "llm_tokens_kept")
CSV_HEADER = tuple(
    f"{column}_median" if column in MEDIAN_COLUMNS else f"{column}_mean" if column in MEAN_COLUMNS else column
    for column in CSV_COLUMNS
)
STATISTICS = {
    **{column: "median over the timed rounds" for column in MEDIAN_COLUMNS},
    **{column: "mean over the batch's samples" for column in MEAN_COLUMNS},
}
SYNC_CHECK_DECODE_STEPS = 8
KERNEL_TRACE_DECODE_STEPS = 2

# ----------------------------------------------------------------------------- configurations


@dataclass
class BenchConfig:
    name: str
    method: str  # stock | vanilla | fastv | dymu | hybrid | a registered method (--methods)
    hybrid: object | None = None  # HybridConfig; None for the stock forward
    status: str = "ok"
    note: str = ""
    runs: list = field(default_factory=list)  # dicts of stage times (ms)
    counts: dict = field(default_factory=dict)
    kv_bytes_prompt: int | None = None  # what the cache holds after the prompt, measured
    row: dict = field(default_factory=dict)


BENCH_METHODS = tuple(name for name in list_methods() if get_method(name).budget_rule != "thresholds")  # DyMU: --dymu
LAYER_METHODS = methods_at_a_layer()  # the --methods that prune inside the LLM at FASTV_LAYER


def build_configs(args) -> list[BenchConfig]:
    """[stock], vanilla, FastV (k x layer x scoring x position mode), DyMU per threshold file, and
    hybrid = each DyMU file x each FastV setting; vanilla, FastV and --methods once per --mask-read."""

    fastv = [
        dict(fastv_k=parse_fastv_k(k), fastv_layer=layer, scoring=scoring, position_mode=mode)
        for k, layer, scoring, mode in product(args.fastv_k, args.fastv_layer, args.scoring, args.position_mode)
    ]
    settings = []
    for mask_read in args.mask_read:  # not DyMU's rows: a DyMU batch is never read (its merged slots may pad it)
        settings += [("vanilla", dict(mask_read=mask_read))] + [("fastv", dict(f, mask_read=mask_read)) for f in fastv]
        for method, budget, mode in product(args.methods, args.budgets, args.position_mode):
            for reads in method_read_settings(method, args):
                settings.append((method, dict(method_settings(method, budget, mode), **reads, mask_read=mask_read)))
    for dymu in args.dymu:
        settings += [("dymu", dict(dymu=dymu, position_mode=mode)) for mode in args.position_mode]
        settings += [("hybrid", dict(f, dymu=dymu)) for f in fastv]
    configs = [BenchConfig("stock", "stock")]
    seen = {c.name for c in configs}
    for method, kwargs in settings:
        hybrid = HybridConfig(**kwargs)
        if hybrid.describe() not in seen:
            seen.add(hybrid.describe())
            configs.append(BenchConfig(hybrid.describe(), method, hybrid))
    return configs


def method_read_settings(method: str, args) -> list[dict]:
    """One dict per row of a --methods entry: --fastv-layer for the methods that prune inside the
    LLM at a layer (fastv, random, dart), times --scoring for fastv; one empty dict otherwise."""
    layers = [dict(fastv_layer=layer) for layer in args.fastv_layer] if method in LAYER_METHODS else [{}]
    scorers = [dict(scoring=scoring) for scoring in args.scoring] if method == "fastv" else [{}]
    return [dict(**layer, **scorer) for layer, scorer in product(layers, scorers)]


def method_settings(method: str, budget: int, position_mode: str) -> dict:
    """A registered method at a budget, by its own rule: fastv and random keep `budget` after
    FASTV_LAYER (B); the methods before the LLM let `budget` in (A)."""
    if method in ("fastv", "random"):
        return dict(fastv_k=budget, fastv_select="attention" if method == "fastv" else "random", position_mode=position_mode)
    return dict(visual_method=method, visual_budget=budget, position_mode=position_mode)


def activate(model, config: BenchConfig):
    """Switch the (shared) model to this configuration's forward."""
    if config.hybrid is None:
        return remove_hybrid(model)
    return apply_hybrid(model, config.hybrid)


# ----------------------------------------------------------------------------------- timing


class Clock:
    """Timestamps on the host (CPU) or CUDA events (GPU): mark() now, elapsed(a, b) in ms later."""

    def __init__(self, device):

        self.cuda = device.type == "cuda"
        self.torch = torch

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3


class LlmStartMark:
    """Forward pre-hook on the LLM's first module: marks when the LLM starts, once per arming."""

    def __init__(self, model, clock: Clock):
        self.clock, self.armed, self.stamp = clock, False, None
        self.handle = first_llm_module(model).register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        if self.armed:
            self.stamp, self.armed = self.clock.mark(), False

    def arm(self):
        self.armed, self.stamp = True, None

    def remove(self):
        self.handle.remove()


def prefill(model, inputs):
    return model(**inputs, use_cache=True, logits_to_keep=1)


def decode(model, output, attention_mask, steps: int) -> torch.Tensor:
    """Greedy decode `steps` tokens after a prefill, over its cache; no host syncs. The greedy tokens
    [B, steps + 1]: the prefill's, then each step's. With no attention_mask none is passed on."""
    cache = output_cache(output)
    token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
    tokens = [token]
    for _ in range(steps):
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        stock_positions = {} if isinstance(model, HybridDecoder) or attention_mask is None else stock_decode_positions(model, attention_mask)
        out = model(input_ids=token, attention_mask=attention_mask, **cache_kwarg(cache), use_cache=True, logits_to_keep=1, **stock_positions)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def timed_run(model, inputs, clock: Clock, mark: LlmStartMark, decode_tokens: int):
    """One prefill + decode, timed by stage (ms). Returns (times, prefill output)."""
    clock.sync()
    mark.arm()
    start, host_start = clock.mark(), time.perf_counter()
    output = prefill(model, inputs)
    end, host_end = clock.mark(), time.perf_counter()
    llm_start = mark.stamp
    decode_start = clock.mark()
    if decode_tokens:
        decode(model, output, inputs["attention_mask"], decode_tokens)
    decode_end, decode_host_end = clock.mark(), time.perf_counter()
    clock.sync()
    times = dict(prefill_ms=clock.elapsed(start, end))
    if clock.cuda:  # on the CPU the host's time is the time itself
        times["prefill_host_ms"] = (host_end - host_start) * 1e3
        if decode_tokens:
            times["decode_host_ms_per_token"] = (decode_host_end - host_end) * 1e3 / decode_tokens
    if llm_start is not None:
        times["vision_ms"] = clock.elapsed(start, llm_start)
        times["llm_prefill_ms"] = clock.elapsed(llm_start, end)
    if decode_tokens:
        times["decode_ms_per_token"] = clock.elapsed(decode_start, decode_end) / decode_tokens
    return times, output


# ----------------------------------------------------------------------------------- memory


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(model, inputs, device, decode_tokens: int) -> tuple[float, float, str]:
    """(peak above the start in MiB, absolute peak in MiB, what was measured) for one prefill+decode."""
    import gc


    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        output = prefill(model, inputs)
        if decode_tokens:
            decode(model, output, inputs["attention_mask"], decode_tokens)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del output
        return (peak - before) / 2**20, peak / 2**20, "cuda_max_allocated"
    if _rss_bytes() is None:
        return float("nan"), float("nan"), "unavailable"
    _malloc_trim()
    before = _rss_bytes()
    peak, stop = [before], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        output = prefill(model, inputs)
        if decode_tokens:
            decode(model, output, inputs["attention_mask"], decode_tokens)
        peak[0] = max(peak[0], _rss_bytes())
    finally:
        stop.set()
        thread.join()
    del output
    return (peak[0] - before) / 2**20, peak[0] / 2**20, "cpu_rss_delta_sampled"


# ----------------------------------------------------------------------------------- counts


def token_counts(model, inputs, output, config: BenchConfig) -> dict:
    """Per-sample tokens (lists over the batch): text, visual entering the LLM (after DyMU), visual
    kept after FastV, and with DyMU the CLIP tokens leaving each merging layer (None otherwise)."""
    image_id = model.config.image_token_id
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    text = ((ids != image_id) & mask).sum(dim=1).tolist()
    visual = ((ids == image_id) & mask).sum(dim=1).tolist()
    state = getattr(output_cache(output), "hybrid_state", None)
    if state is not None:
        visual = [e - t for e, t in zip(state.prompt_tokens.tolist(), text)]
        visual_kept = [k - t for k, t in zip(state.prompt_tokens_kept.tolist(), text)]
    else:
        visual_kept = list(visual)
    crops = [1] * len(text)
    pixel_values = inputs["pixel_values"]
    if "image_sizes" in inputs:  # LLaVA-NeXT: the tower sees every crop
        layouts = anyres_layouts(model, inputs["image_sizes"])
        crops = [layout.num_crops for layout in layouts]
        pixel_values = crop_pixels(pixel_values, layouts)
    grids = None
    if "image_grid_thw" in inputs:  # Qwen2.5-VL: each sample's image grids
        per_sample = len(inputs["image_grid_thw"]) // len(text)
        grids = [[tuple(g) for g in inputs["image_grid_thw"][b * per_sample : (b + 1) * per_sample].tolist()] for b in range(len(text))]
    vit_counts = vit_counts_error = None
    if config.hybrid is not None and config.hybrid.dymu is not None:
        try:  # a re-run that fails costs the row its merged vision MACs, not its timings: the note says why
            vit_counts = dymu_layer_counts(model, pixel_values)
        except Exception as error:  # noqa: BLE001 - named in the row's note, whatever it is
            vit_counts_error = f"{type(error).__name__}: {str(error)[:160]}"
        if vit_counts is not None and "image_sizes" in inputs:  # one per-layer list per crop, grouped per sample
            starts = [sum(crops[:i]) for i in range(len(crops))]
            vit_counts = [vit_counts[start : start + n] for start, n in zip(starts, crops)]
    return dict(text=text, visual=visual, visual_kept=visual_kept, vit_counts=vit_counts, vit_counts_error=vit_counts_error, crops=crops, grids=grids)


def dymu_layer_counts(model, pixel_values) -> list[list[int]]:
    """CLIP tokens (CLS included) leaving each merging layer, per image, from an untimed re-run of the
    engine's merging loop with the model's thresholds."""
    thresholds = model.hybrid_thresholds
    counts = []

    def select(index, node_max, state):
        if index > 0:
            counts.append(state.counts())  # after layer index - 1's merge: its MLP ran at this count
        return threshold_merge_mask(node_max, thresholds[index].to(node_max.device))

    _, state, _ = merging_vision_forward(model, pixel_values.to(model.dtype), select, split=model.hybrid_config.dymu_split)
    counts.append(state.counts())
    return torch.stack(counts, dim=1).tolist()


def theory(shape, counts: dict, config: BenchConfig, decode_tokens: int, batch: int, bytes_per_element: int) -> dict:
    """Theoretical MACs (summed over the batch) and KV-cache size for the measured token counts."""

    hybrid = config.hybrid
    fastv_layer = hybrid.fastv_layer if hybrid is not None else 2
    # random selection reads no attention: no scoring counted, as the plugin's per-row GMACs
    scoring = hybrid.scoring if hybrid is not None and hybrid.fastv_select == "attention" else None
    totals = dict(vision=0, llm=0, prefill=0, decode=0.0, kv=0, kv_prompt=0)
    anyres = any(crops > 1 for crops in counts["crops"])  # LLaVA-NeXT: the span follows the aspect ratio
    # Not modelled, as the plugin leaves them: a staged method's per-layer counts on Qwen2.5-VL (they
    # follow each image), and on LLaVA-NeXT any VISUAL_METHOD or pooling (flops.method_prefill_macs
    # counts one 576-patch crop, not per-crop reads, projection and scoring over a packed span)
    if hybrid is not None and ((isinstance(shape, QwenShape) and hybrid.staged_method is not None)
                               or (anyres and (hybrid.visual_method is not None or hybrid.visual_pool is not None))):
        return {key: math.nan for key in totals}
    dymu = hybrid is not None and hybrid.dymu is not None
    for i in range(len(counts["text"])):
        text, visual, kept = counts["text"][i], counts["visual"][i], counts["visual_kept"][i]
        vit_counts = counts["vit_counts"][i] if counts["vit_counts"] is not None else None
        if isinstance(shape, QwenShape):  # the counts that ran: entering the LLM, and kept after FASTV_LAYER
            macs = qwen_method_prefill_macs(shape, hybrid or HybridConfig(), counts["grids"][i], text, visual_entered=visual, visual_kept=kept)
        elif hybrid is not None and (hybrid.visual_method is not None or hybrid.visual_pool is not None):
            # a method before the LLM: its own CLIP loop, what it projects and its scoring
            macs = flops.method_prefill_macs(shape, hybrid, text, visual_entered=visual, visual_kept=kept)
        else:
            macs = flops.prefill_macs(
                shape, text, visual, kept if kept < visual else None, fastv_layer=fastv_layer,
                vit_counts=vit_counts, scoring=scoring, vit_layers_run=shape.vit_layers_read if dymu else None,
                crops=counts["crops"][i],
            )
        totals["vision"] += macs.vision_total
        totals["llm"] += macs.llm_total
        totals["prefill"] += macs.total
        if hybrid is not None and hybrid.staged_method is not None:  # one cache length per stage
            totals["decode"] += flops.staged_decode_macs_mean(shape, hybrid, text, decode_tokens) if decode_tokens else 0.0
            totals["kv"] += flops.staged_kv_cache_bytes(shape, hybrid, text, decode_tokens, bytes_per_element)
            totals["kv_prompt"] += flops.staged_kv_cache_bytes(shape, hybrid, text, 0, bytes_per_element)
            continue
        if decode_tokens:
            totals["decode"] += flops.llm_decode_macs_mean(
                shape.llm, text + visual, text + kept, steps=decode_tokens, fastv_layer=fastv_layer
            )
        totals["kv"] += flops.kv_cache_bytes(
            shape.llm, text + visual + decode_tokens, text + kept + decode_tokens, fastv_layer, bytes_per_element
        )
        totals["kv_prompt"] += flops.kv_cache_bytes(shape.llm, text + visual, text + kept, fastv_layer, bytes_per_element)
    return totals


# ----------------------------------------------------------------------------------- report


def environment(device, args) -> dict:

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    commit, dirty = git_state()
    env = dict(
        device=str(device), torch=torch.__version__, transformers=transformers.__version__, hybrid_vlm=__version__,
        python=platform.python_version(), platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), git_commit=commit, git_dirty=dirty,
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv=portable(sys.argv[1:]),
    )
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def _median(values):
    return statistics.median(values) if values else float("nan")


def timed(row: dict) -> bool:
    """Its timed rounds stand: an ok row, or one failed only in the untimed memory or sync pass."""
    return row["status"] == "ok" or (row["status"] == "failed" and PASS_FAILED in str(row.get("note") or "") and bool(row.get("runs")))


def summarize(configs, baseline_name: str) -> list[dict]:
    rows = [config.row for config in configs]
    base = next((r for r in rows if r["config"] == baseline_name and timed(r)), None)
    for row in rows:
        for measured, theoretical, key in (
            ("prefill_ms", "prefill_gmacs", "prefill"),
            ("llm_prefill_ms", "llm_prefill_gmacs", "llm_prefill"),
            ("decode_ms_per_token", "decode_gmacs_per_token", "decode"),
        ):
            ok = base is not None and timed(row)
            r = row.get(measured, math.nan) / base[measured] if ok and base.get(measured) else math.nan
            t = row.get(theoretical, math.nan) / base[theoretical] if ok and base.get(theoretical) else math.nan
            row[f"{key}_ratio"], row[f"{key}_theory_ratio"] = r, t
            if key != "decode":
                row[f"{key}_ratio_minus_theory"] = r - t
    return rows


TABLE_HEADER = (
    "config", "vis in→kept", "vision ms", "LLM ms", "prefill ms", "ratio", "theory", "ratio−th", "LLM ratio", "LLM th",
    "decode ms/tok", "peak MiB",
)


def print_table(rows, file=None):
    """The terminal table; times are medians over the repeats. A row that did not run says why below
    it, so that its reason does not widen a column."""
    lines, reasons = [], []
    for r in rows:
        if r["status"] != "ok":
            lines.append((r["config"], r["status"], *[""] * (len(TABLE_HEADER) - 2)))
            reasons.append(f"{r['config']}: {r['status']}: {r.get('note') or ''}")
            continue
        lines.append((
            r["config"], f"{number_text(r['visual_in'], '.0f')}→{number_text(r['visual_kept'], '.0f')}",
            number_text(r["vision_ms"]), number_text(r["llm_prefill_ms"]), number_text(r["prefill_ms"]),
            number_text(r["prefill_ratio"], ".3f"), prefill_theory_text(r),
            number_text(r["prefill_ratio_minus_theory"], "+.3f"), number_text(r["llm_prefill_ratio"], ".3f"),
            number_text(r["llm_prefill_theory_ratio"], ".3f"), number_text(r.get("decode_ms_per_token"), ".2f"),
            number_text(r["peak_mem_mb"], ".0f"),
        ))
    file = file or sys.stdout  # looked up now, so that a redirected stdout is the one written
    print(text_table(TABLE_HEADER, lines), file=file)
    for reason in reasons:
        print(reason, file=file)
    if any(prefill_theory_text(r).endswith("*") for r in rows if r["status"] == "ok"):
        print(IDEAL_THEORY_FOOTNOTE, file=file)


def write_outputs(out_dir: Path, rows, meta) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        writer.writerows([row.get(column) for column in CSV_COLUMNS] for row in rows)

    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    with open(out_dir / "bench.json", "w") as f:
        json.dump({"meta": meta, "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}, f, indent=2)


# --------------------------------------------------------------------------------------- main


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_tools.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, default="tiny", help="random-weight model shape (default tiny)")
    source.add_argument("--model", default=None, help="a llava-hf checkpoint directory instead of a preset")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto: on CUDA float16, bfloat16 for Qwen2.5-VL; float32 on CPU (hybrid_vlm.runtime)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--fastv-k", nargs="*", default=["288", "144", "64"], help="FastV budgets: ints keep n visual tokens, decimals in [0,1) prune a fraction; none given = no FastV rows")
    parser.add_argument("--fastv-layer", nargs="+", type=int, default=None,
                        help="layers K to sweep for the --fastv-k rows and the --methods fastv, random and dart rows (default 2)")
    parser.add_argument("--scoring", nargs="+", choices=("row", "eager"), default=None,
                        help="FastV scorers to compare, for the --fastv-k rows and --methods fastv (default row)")
    parser.add_argument("--position-mode", nargs="+", choices=("logical", "renumbered"), default=None,
                        help="position rules for the --fastv-k, --methods, DyMU and hybrid rows (default logical)")
    parser.add_argument("--mask-read", nargs="+", choices=MASK_READS, default=["never"],
                        help="HybridConfig.mask_read for the vanilla, FastV and --methods rows, each one given (default never; "
                        "once reads a batch's attention_mask on the host so an unpadded batch runs SDPA without it). DyMU and "
                        "hybrid rows keep never: the engine never reads a DyMU batch's mask, as its merged slots may pad it")
    parser.add_argument("--dymu", nargs="*", default=[], help="DyMU threshold files: adds DyMU and DyMU+FastV (hybrid) rows")
    parser.add_argument(
        "--dymu-target", nargs="*", default=[],
        help="calibrate DyMU thresholds for the benchmarked model itself (low|mid|high|N tokens) on synthetic "
        "images, then add their rows as --dymu does: random-weight presets have no threshold files",
    )
    parser.add_argument("--dymu-images", type=int, default=None, help="synthetic images for --dymu-target (default 32)")
    parser.add_argument("--methods", nargs="*", default=[], choices=BENCH_METHODS, help="registered methods to time at each --budgets (their own budget rules)")
    parser.add_argument("--budgets", nargs="+", type=int, default=None, help="visual tokens per image for --methods (default 64)")
    parser.add_argument("--stock", action="store_true", help="accepted for old command lines: the unpatched forward is always timed")
    parser.add_argument("--baseline", default="stock", help="row the ratios divide by (default stock = unpatched transformers; vanilla = the engine, nothing cut)")
    parser.add_argument("--text-tokens", type=int, default=60, help="non-image prompt tokens (default 60: LLaVA's 5 + 55)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed after each prefill (0 = none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument(
        "--sync-debug", action="store_true",
        help=f"check each config's prefill + {SYNC_CHECK_DECODE_STEPS} decode steps for host syncs (hybrid_vlm.syncs: "
        "CUDA sync-debug mode on GPU, the meta device on CPU)",
    )
    parser.add_argument(
        "--kernels", action="store_true",
        help=f"profile each config's prefill + {KERNEL_TRACE_DECODE_STEPS} decode steps (torch.profiler) and record which SDPA "
        "backend (flash, efficient, cudnn, math) each layer ran, with or without a mask (hybrid_tools.sdpa_kernels)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of a --preset's random weights (default 0)")
    parser.add_argument("--image-seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for bench.csv and bench.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.decode_tokens < 0 or args.text_tokens < 0:
        parser.error("--repeats and --batch-size must be >= 1, --warmup, --decode-tokens and --text-tokens >= 0")
    unread = unread_settings(args)
    if unread:
        parser.error(unread)
    args.fastv_layer, args.scoring, args.budgets = args.fastv_layer or [2], args.scoring or ["row"], args.budgets or [64]
    args.position_mode = args.position_mode or ["logical"]
    args.seed = 0 if args.seed is None else args.seed
    args.dymu_images = 32 if args.dymu_images is None else args.dymu_images
    problem = bad_value(args)
    if problem:
        parser.error(problem)
    return args, parser


def unread_settings(args) -> str | None:
    """A setting given where no row reads it (it was ignored without a word)."""
    layer_readers = bool(args.fastv_k) or any(m in LAYER_METHODS for m in args.methods)
    if args.fastv_layer is not None and not layer_readers:
        return "--fastv-layer applies to the --fastv-k rows and to --methods fastv, random and dart; none is asked for"
    if args.scoring is not None and not (args.fastv_k or "fastv" in args.methods):
        return "--scoring applies to the --fastv-k rows and to --methods fastv; none is asked for"
    if args.budgets is not None and not args.methods:
        return "--budgets applies to the --methods rows; give --methods (FastV budgets are --fastv-k)"
    if args.position_mode is not None and not (args.fastv_k or args.methods or args.dymu or args.dymu_target):
        return "--position-mode applies to the --fastv-k, --methods, DyMU and hybrid rows; none is asked for"
    if args.seed is not None and args.model:
        return "--seed seeds a --preset's random weights; a --model checkpoint has its own (--image-seed picks the image)"
    if args.dymu_images is not None and not args.dymu_target:
        return "--dymu-images is the number of calibration images for --dymu-target, which is not given"
    return None


def bad_value(args) -> str | None:
    """A value no model load can make right, said before one: each named with what is accepted."""
    for k in args.fastv_k:
        try:
            parse_fastv_k(k)
        except ValueError as error:
            return f"--fastv-k {k}: {error}"
    for target in args.dymu_target:
        try:
            check_target_name(target)
        except ValueError as error:
            return f"--dymu-target: {error}"
    if args.dymu_images < 1:
        return f"--dymu-images {args.dymu_images}: use 1 or more images"
    if args.threads is not None and args.threads < 1:
        return f"--threads {args.threads}: use 1 or more"
    if args.out and (problem := out_dir_problem(Path(args.out))):
        return f"--out {args.out}: {problem}"
    return dymu_file_problem(args.dymu, args.dymu_target) or model_dir_problem(args.model)


def dymu_file_problem(paths: list[str], targets: list[str]) -> str | None:
    """--dymu files that are missing or malformed, or that would share a row name (the file's stem)
    with different thresholds: the later one's rows were dropped as repeats."""
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        return f"--dymu: no threshold file at {', '.join(missing)}"
    for path in paths:
        try:
            read_threshold_payload(path)
        except ValueError as error:
            return f"--dymu {path}: {error}"
    by_name: dict[str, str] = {}
    for path in paths:
        name = HybridConfig(dymu=path).describe()
        first = by_name.setdefault(name, path)
        if Path(first).read_bytes() != Path(path).read_bytes():
            return f"--dymu {first} {path}: different thresholds under one row name ({name}); rename one"
    clashes = [target for target in targets if HybridConfig(dymu=f"{target}.json").describe() in by_name]
    if clashes:
        return f"--dymu-target {clashes[0]}: its calibrated {clashes[0]}.json would share a row name with a --dymu file; rename that file"
    return None


def model_dir_problem(model: str | None) -> str | None:
    """A --model directory that holds no checkpoint this bench runs."""
    local = Path(model).expanduser() if model else None
    if local is None or looks_like_hub_id(model):
        return None
    if not (local / "config.json").is_file():
        return f"--model {model}: not a checkpoint directory (no config.json there)"
    try:
        model_type = json.loads((local / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        return f"--model {model}: its config.json is not a JSON object ({type(error).__name__}: {error})"
    if model_type not in BENCH_MODEL_TYPES:
        return (f"--model {model}: a llava-hf LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL checkpoint is needed (model_type "
                f"{', '.join(BENCH_MODEL_TYPES)}), this one is {model_type!r}")
    return None


BENCH_MODEL_TYPES = ("llava", "llava_next", "qwen2_5_vl")


def out_dir_problem(out: Path) -> str | None:
    """Why --out cannot become the bench's folder (checked before the model loads: the bench was
    measured in full, then lost at the write)."""
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file: name a folder for bench.json and bench.csv"
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


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
        if not args.out:  # removed when the bench ends (the rows name files nobody keeps without --out)
            args.scratch = tempfile.TemporaryDirectory(prefix="bench-dymu-")
        threshold_dir = Path(args.out) if args.out else Path(args.scratch.name)
        try:
            args.dymu = list(args.dymu) + calibrate_for_bench(model, processor, args.dymu_target, threshold_dir, device, dtype, args.dymu_images)
        except ValueError as error:  # a token count this tower cannot reach, known once it is loaded
            parser.error(str(error).replace("--target ", "--dymu-target ", 1))
        configs = build_configs(args)
        check_baseline(args.baseline, configs, parser)
    clock = Clock(device)
    bench = BenchRun(args, model, host_inputs, text_tokens, device, dtype, clock, LlmStartMark(model, clock))
    measure(bench, configs)
    bench.mark.remove()
    rows = summarize(configs, args.baseline)
    for row in rows:
        row["ratios_divide_by"] = args.baseline  # the CSV stands alone: what its ratios divide by
        for column in CSV_COLUMNS:
            row.setdefault(column, math.nan if column.endswith(("_ms", "_mb", "_ratio", "_theory", "_gmacs")) else None)
    meta = bench_meta(bench)
    print(
        f"# {meta['device']} {meta.get('gpu') or meta['cpu']} | torch {meta['torch']} transformers {meta['transformers']} "
        f"| threads {meta['torch_threads']} | {meta['preset'] or meta['model']} {meta['dtype']} batch {args.batch_size} "
        f"| text {text_tokens} tokens | times: median of {args.repeats} after {args.warmup} warm-up | ratios: ÷ {args.baseline}"
        + (f" | stopped by SIGTERM or Ctrl-C {bench.stopped}: each row's `repeats` says how many rounds it has" if bench.stopped else "")
    )
    print_table(rows)
    base = next(row for row in rows if row["config"] == args.baseline)
    if not timed(base):
        print(f"# no ratios: the baseline row {args.baseline} is {base['status']}", file=sys.stderr)
    if args.out:
        write_outputs(Path(args.out), rows, meta)
        print(f"# wrote {Path(args.out) / 'bench.csv'} and bench.json")
    return rows, bench.stopped


def check_baseline(baseline: str, configs: list[BenchConfig], parser) -> None:
    names = [config.name for config in configs]
    if baseline not in names:
        parser.error(f"--baseline {baseline!r} is not a row of this bench: use one of {', '.join(names)}")


def checked_device_dtype(args, parser) -> tuple[torch.device, torch.dtype]:
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as error:  # torch.device("foo") raises RuntimeError
        parser.error(f"--device {args.device}: {error}")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, memory stats and sync-debug act on the current device
    if args.preset in GPU_PRESETS and not args.model and device.type != "cuda":
        parser.error(
            f"preset {args.preset} allocates ~7B random weights (~14 GB in bf16, ~28 GB in fp32) and runs "
            "2 x 4 TMAC prefills: it is meant for a GPU. Pass --device cuda on a CUDA machine, or use "
            "--preset mid (or next-mid) on CPU."
        )
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device, resolve_dtype(args.dtype, device, model_type_of(args.preset, args.model))


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
    args, hybrid = bench.args, config.hybrid
    prunes = getattr(hybrid, "prunes", False)
    at_a_layer = prunes and hybrid.llm_method in methods_at_a_layer()  # pdrop's and sparsevlm's stages have their own layers
    row = dict(
        config=config.name, status=config.status, method=config.method, note=config.note,
        fastv_k=getattr(hybrid, "fastv_k", None), fastv_layer=hybrid.fastv_layer if at_a_layer else None,
        scoring=hybrid.scoring if at_a_layer and hybrid.staged_method is None and hybrid.fastv_select == "attention" else None,
        position_mode=getattr(hybrid, "position_mode", None),
        dymu=portable(getattr(hybrid, "dymu", None)), mask_read=getattr(hybrid, "mask_read", None),
        batch_size=args.batch_size, text_tokens=bench.text_tokens,
        repeats=len(config.runs),
    )
    if config.status != "ok":
        return row
    if not config.runs:
        row.update(status="stopped", note=f"not timed: the bench was stopped by SIGTERM or Ctrl-C {bench.stopped}")
        return row
    activate(bench.model, config)
    for key in ("vision_ms", "llm_prefill_ms", "prefill_ms", "decode_ms_per_token"):
        row[key] = _median([run[key] for run in config.runs if key in run])
    for key in ("prefill_host_ms", "decode_host_ms_per_token"):
        if any(key in run for run in config.runs):
            row[key] = _median([run[key] for run in config.runs if key in run])
    prefill_times = [run["prefill_ms"] for run in config.runs]
    row.update(prefill_ms_min=min(prefill_times), prefill_ms_max=max(prefill_times), runs=config.runs)
    row["generate_tokens_per_s"] = generate_tokens_per_s(config.runs, args.batch_size, args.decode_tokens)
    row["kv_cache_mb_prompt"] = config.kv_bytes_prompt / 2**20
    row.update(count_columns(config.counts))
    row.update(theory_columns(bench, config, row))
    if hybrid is not None and hybrid.dymu:
        row["note"] = (
            IDEAL_THEORY_NOTE
            if config.counts["vit_counts"] is not None
            else f"vision MACs counted unmerged: the per-layer CLIP counts could not be taken ({config.counts['vit_counts_error']})"
        )
    if hybrid is not None and hybrid.dymu and isinstance(hybrid.fastv_k, int) and hybrid.fastv_k >= max(config.counts["visual"]):
        row["note"] = with_note(row["note"], f"K={hybrid.fastv_k} (--fastv-k) keeps every token DyMU left "
                                f"(at most {max(config.counts['visual'])}): nothing is pruned after DyMU here")
    if len(config.runs) < args.repeats:
        row["note"] = with_note(row["note"], f"{len(config.runs)} of {args.repeats} timed rounds: stopped by SIGTERM or Ctrl-C")
    if bench.stopped is None:
        try:
            row.update(row_passes(bench))
        except BenchStopped:
            bench.stopped = f"in the memory, sync and kernel passes of `{config.name}`"
        except Exception as error:  # noqa: BLE001 - its timings stand; the row is failed and says where
            row.update(status="failed", note=with_note(row["note"], f"{PASS_FAILED}: {type(error).__name__}: {error}"))
    if bench.stopped is not None:
        for key in ("mem_kind", "sync_debug"):
            row.setdefault(key, "not run: stopped by SIGTERM or Ctrl-C")
    return row


PASS_FAILED = "memory or sync pass"  # a failed row's note when only its untimed passes failed (`timed`)


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


def generate_tokens_per_s(runs: list[dict], batch: int, decode_tokens: int) -> float:
    """Median over runs of new tokens per second: a prefill gives each sample its first token, and
    every decode step one more, so batch x (decode_tokens + 1) tokens in prefill + decode time."""
    if not decode_tokens:
        return math.nan
    rates = [batch * (decode_tokens + 1) / ((run["prefill_ms"] + run["decode_ms_per_token"] * decode_tokens) / 1e3) for run in runs]
    return _median(rates)


def traced_kernels(bench: BenchRun) -> dict:
    """The SDPA backend of every layer in one profiled prefill + KERNEL_TRACE_DECODE_STEPS decode steps."""
    model, inputs = bench.model, bench.inputs
    calls = profile_sdpa(
        model, lambda: prefill(model, inputs), lambda output: decode(model, output, inputs["attention_mask"], KERNEL_TRACE_DECODE_STEPS),
        bench.device,
    )
    return kernel_summary(calls)


def prunes_nothing(config: BenchConfig) -> str | None:
    """A count FASTV_K above every sample's visual tokens would time the scoring with nothing pruned
    (run.py and the sweep refuse it on LLaVA-1.5 before loading; here the count is known once the
    input ran). Not with DyMU, whose merged count follows the image: a K above it is a setting too."""
    k, visual = getattr(config.hybrid, "fastv_k", None), max(config.counts["visual"])
    if getattr(config.hybrid, "dymu", None) is None and isinstance(k, int) and not isinstance(k, bool) and k > visual:
        return (f"K={k} (--fastv-k, or --budgets with --methods) is more than the {visual} visual tokens of this input, so nothing "
                f"is pruned: use 0 to {visual}, or a fraction pruned in [0, 1)")
    return None


def count_columns(counts: dict) -> dict:
    return dict(  # means over the batch's samples, as the evaluation's token counts are means over rows
        visual_in=statistics.fmean(counts["visual"]), visual_kept=statistics.fmean(counts["visual_kept"]),
        llm_tokens_in=statistics.fmean(t + v for t, v in zip(counts["text"], counts["visual"])),
        llm_tokens_kept=statistics.fmean(t + v for t, v in zip(counts["text"], counts["visual_kept"])),
        per_sample_counts=dict(counts),
    )


def theory_columns(bench: BenchRun, config: BenchConfig, row: dict) -> dict:
    shape, args = bench_shape(bench.model.config), bench.args
    macs = theory(shape, config.counts, config, args.decode_tokens, args.batch_size, torch.finfo(bench.dtype).bits // 8)
    return dict(
        vision_gmacs=macs["vision"] / 1e9, llm_prefill_gmacs=macs["llm"] / 1e9, prefill_gmacs=macs["prefill"] / 1e9,
        decode_gmacs_per_token=macs["decode"] / 1e9 if args.decode_tokens else math.nan,
        kv_cache_mb_theory=macs["kv"] / 2**20, kv_cache_mb_prompt_theory=macs["kv_prompt"] / 2**20,
        llm_prefill_gmacs_per_s=macs["llm"] / 1e9 / (row["llm_prefill_ms"] / 1e3) if row.get("llm_prefill_ms") else math.nan,
    )


def bench_meta(bench: BenchRun) -> dict:
    args = bench.args
    meta = environment(bench.device, args)
    meta.update(
        preset=None if args.model else args.preset, model=portable(args.model), dtype=str(bench.dtype).replace("torch.", ""),
        batch_size=args.batch_size, text_tokens=bench.text_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats,
        warmup=args.warmup, baseline=args.baseline, shape=asdict(bench_shape(bench.model.config)), stopped=bench.stopped,
        conventions="MACs per batch; causal attention (n(n+1)/2 pairs); lm_head on the last prompt token; see hybrid_vlm.flops",
        statistics=STATISTICS,
    )
    return meta


def cli(argv=None) -> int:
    """`python -m hybrid_tools.bench`: 1 when a configuration failed (its row says why) or a SIGTERM
    stopped the bench (what was measured is written), else 0."""
    rows, stopped = run(argv)
    return 1 if stopped or any(row["status"] == "failed" for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(cli())
