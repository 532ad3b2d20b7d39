"""Parity on a bench model, in the run's own dtype and device: does the engine compute what stock
transformers computes, and does its mask-free SDPA path compute what its masked path computes?

1. The engine with nothing cut against stock transformers (batch 1, the processor's inputs).
2. FastV (default K = 64) without a mask against FastV with one: a batch of two identical prompts
   passed without an `attention_mask` (every key real: SDPA `is_causal`, then no mask) and with its
   all-ones `attention_mask` (by default, MASK_READ=never, the engine keeps that mask: it does not read it).

Each pair is compared on the last prompt token's logits (the largest difference, and that over the
largest logit of the reference), the prompt positions FastV kept (equal, and if not how many of a sample's reference positions the
other run dropped), and the greedy tokens of a
prefill plus --new-tokens decode steps (how many are shared before the two first part: after
that each continues its own history, so later agreement means little). In bf16 the
SDPA kernels differ between the pairs (flash against efficient or math), so small logit
differences are expected; a parting of greedy tokens where the reference's top two logits are
closer than the logit difference is a near-tie, not a bug. The reference's top-1 - top-2 margin at
the prompt's last token is recorded for that reading.

    python -m hybrid_tools.parity --preset llava-1.5-7b --device cuda --dtype bfloat16 --out parity.json
    python -m hybrid_tools.parity --preset tiny        # CPU, fp32: every difference should be ~1e-6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hybrid_vlm import HybridConfig, apply_hybrid, inputs_for, remove_hybrid
from hybrid_vlm.hf_compat import cache_kwarg, new_cache
from hybrid_vlm.hf_compat.qwen2_5_vl import reset_stock_rope_deltas
from hybrid_vlm.model import HybridDecoder
from hybrid_vlm.provenance import replace_file
from hybrid_vlm.runtime import DTYPE_CHOICES, resolve_device, resolve_dtype

from . import bench, presets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hybrid_tools.parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=presets.PRESETS, default="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: on CUDA float16, bfloat16 for Qwen2.5-VL; float32 on CPU")
    parser.add_argument("--fastv-k", type=int, default=64, help="visual tokens FastV keeps in the mask-free vs masked pair")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps after the prefill")
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the comparisons as JSON here")
    args = parser.parse_args(argv)
    if args.new_tokens < 0 or args.fastv_k < 1:
        parser.error("--new-tokens must be >= 0 and --fastv-k >= 1")
    return args


def greedy_run(model, inputs: dict, steps: int) -> dict:
    """The prefill's last-token logits [B, vocab] (float32), kept positions (None for stock), and
    the greedy tokens [B, steps + 1] of the prefill and `steps` decode steps over one cache, from
    the processor's batch on the CPU."""
    inputs = inputs_for(model, inputs)
    if not isinstance(model, HybridDecoder):
        reset_stock_rope_deltas(model, inputs)  # what bench.decode's stock positions add
    output = model(**inputs, **cache_kwarg(new_cache(model)), use_cache=True)
    logits = output.logits[:, -1].float()
    tokens = bench.decode(model, output, inputs.get("attention_mask"), steps)
    return dict(logits=logits, kept=getattr(output, "kept_positions", None), tokens=tokens)


def compare(reference: dict, candidate: dict) -> dict:
    """How far `candidate` is from `reference` (both from greedy_run)."""
    difference = (candidate["logits"] - reference["logits"]).abs().max().item()
    scale = reference["logits"].abs().max().item()
    top2 = reference["logits"].topk(2, dim=-1).values
    same = (candidate["tokens"] == reference["tokens"]).all(dim=0)  # per step, over the batch
    parted = (~same).nonzero()
    shared = int(parted[0].item()) if len(parted) else int(same.numel())  # after a parting the histories differ
    kept_equal = kept_differing = None
    if reference["kept"] is not None and candidate["kept"] is not None:
        kept_equal = bool(torch.equal(reference["kept"], candidate["kept"]))
        kept_differing = positions_not_kept_by(candidate["kept"], reference["kept"])
    return dict(
        max_abs_logit_diff=difference, max_abs_logit=scale, relative_logit_diff=difference / scale if scale else float("nan"),
        top1_margin=(top2[:, 0] - top2[:, 1]).min().item(), greedy_tokens=int(same.numel()),
        greedy_tokens_shared=shared, first_parting_step=shared if len(parted) else None,
        kept_positions_equal=kept_equal, kept_positions_differing=kept_differing,
    )


def positions_not_kept_by(candidate: torch.Tensor, reference: torch.Tensor) -> int:
    """The most positions of one sample's reference kept set [B, L] missing from the candidate's:
    1 or 2 at FastV's cut is a near-tie in the scores, many is a different selection."""
    missing = ~(reference.unsqueeze(-1) == candidate.unsqueeze(-2)).any(-1)  # [B, L_reference]
    return int(missing.sum(-1).max().item())


def engine_vs_stock(model, inputs: dict, steps: int) -> dict:
    remove_hybrid(model)
    stock = greedy_run(model, inputs, steps)
    apply_hybrid(model, HybridConfig())
    return compare(stock, greedy_run(model, inputs, steps))


def unmasked_vs_masked(model, inputs: dict, steps: int, fastv_k: int) -> dict:
    apply_hybrid(model, HybridConfig(fastv_k=fastv_k))
    pair = {key: torch.cat([value, value]) for key, value in inputs.items()}  # two identical prompts: no padding
    masked = greedy_run(model, pair, steps)
    unmasked = greedy_run(model, {key: value for key, value in pair.items() if key != "attention_mask"}, steps)
    return compare(masked, unmasked)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, presets.model_type_of(args.preset))
    torch.set_grad_enabled(False)
    model, processor = presets.build_model(argparse.Namespace(model=None, preset=args.preset, seed=args.seed), device, dtype)
    inputs, _ = presets.build_inputs(processor, args.text_tokens, 1, 0)
    meta = dict(bench.environment(device, args), preset=args.preset, dtype=str(dtype).replace("torch.", ""), new_tokens=args.new_tokens)
    report = dict(meta=meta, comparisons={}, complete=False)
    pairs = {
        "engine (nothing cut) vs stock transformers": lambda: engine_vs_stock(model, inputs, args.new_tokens),
        f"FastV K={args.fastv_k}: no mask vs its all-ones mask (batch 2)": lambda: unmasked_vs_masked(model, inputs, args.new_tokens, args.fastv_k),
    }
    with torch.inference_mode():
        for name, run in pairs.items():  # written after each: a time limit loses only the comparison it stops
            numbers = report["comparisons"][name] = run()
            print(f"{name}: " + ", ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}" for key, value in numbers.items()))
            report["complete"] = len(report["comparisons"]) == len(pairs)
            write_report(args.out, report)
    return report


def write_report(out: str | None, report: dict) -> None:
    """Replaced whole: a time limit that lands mid-write leaves the previous file, never a torn one."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        replace_file(out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
