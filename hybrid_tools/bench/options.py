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
whose per-layer counts follow the image: their theory columns stay empty, as in the plugin's rows.
On LLaVA-NeXT every method is modelled (`flops.next_method_prefill_macs`): every crop through the
tower, a method before the LLM reading per crop and selecting per image (or per crop), PyramidDrop
and DART over the packed span.

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
import json
import os
from pathlib import Path

import torch

from hybrid_vlm import HybridConfig, parse_fastv_k
from hybrid_vlm.calibrate import read_threshold_payload
from hybrid_vlm.config import MASK_READS, parse_visual_budget
from hybrid_vlm.dymu import check_target_name
from hybrid_vlm.hf_compat.loading import looks_like_hub_id
from hybrid_vlm.runtime import DTYPE_CHOICES, resolve_device, resolve_dtype

from ..presets import GPU_PRESETS, PRESETS, model_type_of
from .configs import BENCH_METHODS, LAYER_METHODS, BenchConfig

SYNC_CHECK_DECODE_STEPS = 8


KERNEL_TRACE_DECODE_STEPS = 2


def parse_args(argv=None):
    """(the checked arguments, with each default filled in; the parser, for later usage errors)."""
    parser = build_parser()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_tools.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_options(parser)
    add_row_options(parser)
    add_measurement_options(parser)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """What runs where: a preset or a checkpoint, the device, dtype and threads."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, default="tiny", help="random-weight model shape (default tiny)")
    source.add_argument("--model", default=None, help="a llava-hf checkpoint directory instead of a preset")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto: on CUDA float16, bfloat16 for Qwen2.5-VL; float32 on CPU (hybrid_vlm.runtime)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")


def add_row_options(parser: argparse.ArgumentParser) -> None:
    """Which configurations become rows (FastV, methods, DyMU, their position rules and mask reads)."""
    parser.add_argument("--fastv-k", nargs="*", default=["288", "144", "64"], help="FastV budgets: ints keep n visual tokens, decimals in [0,1) prune a fraction (default 288 144 64; the flag with no values: no FastV rows)")
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
    parser.add_argument("--budgets", nargs="+", type=budget_argument, default=None,
                        help="visual tokens per image for --methods (default 64), or a kept share in (0, 1) of each image's, "
                             "as VISUAL_BUDGET takes it (fastv and random: FASTV_K = 1 - share, as the plugin converts it)")


def add_measurement_options(parser: argparse.ArgumentParser) -> None:
    """How each row is measured: the baseline, the prompt and batch, rounds, passes and outputs."""
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


def budget_argument(text: str) -> int | float:
    try:
        return parse_visual_budget(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("VISUAL_BUDGET=", "")) from None


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
    with different contents (as the sweep compares them): the later one's rows were dropped as repeats."""
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
            return f"--dymu {first} {path}: different contents under one row name ({name}); rename one"
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
