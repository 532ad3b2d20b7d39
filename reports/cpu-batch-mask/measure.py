"""What the explicit mask costs the engine at batch 16 on CPU: stock transformers against the engine
with nothing cut, three ways: its default (MASK_READ=never: the mask a batch's attention_mask may
need is kept, no host read), MASK_READ=once (the mask read once, found unpadded, dropped), and no
attention_mask passed. Tiny preset, 16 identical unpadded prompts, prefill only, interleaved rounds
in one process; median prefill ms per variant.

    PYTHONPATH=. python reports/cpu-batch-mask/measure.py --out reports/cpu-batch-mask/raw/result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hybrid_tools import bench, presets
from hybrid_vlm import HybridConfig, apply_hybrid, remove_hybrid
from hybrid_vlm.provenance import git_state


def variants(model, inputs):
    """name -> (set up the model, the inputs to prefill)."""
    no_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}

    def engine_with(**settings):
        return lambda: apply_hybrid(model, HybridConfig(**settings))

    return {
        "stock": (lambda: remove_hybrid(model), inputs),
        "engine (MASK_READ=never, the default: the mask kept)": (engine_with(), inputs),
        "engine (MASK_READ=once: read, unpadded, dropped)": (engine_with(mask_read="once"), inputs),
        "engine (no attention_mask passed)": (engine_with(), no_mask),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    bench_args, _ = bench.parse_args(["--preset", "tiny"])
    model, processor = presets.build_model(bench_args, torch.device("cpu"), torch.float32)
    inputs, text_tokens = presets.build_inputs(processor, 60, args.batch_size, 0, torch.device("cpu"))
    runs = variants(model, inputs)
    times = {name: [] for name in runs}
    for round_index in range(args.rounds + 1):  # round 0 warms every variant up
        for name, (setup, batch) in runs.items():
            setup()
            start = time.perf_counter()
            bench.prefill(model, batch)
            if round_index:
                times[name].append((time.perf_counter() - start) * 1e3)
    commit, dirty = git_state()
    result = dict(
        batch_size=args.batch_size, text_tokens=text_tokens, rounds=args.rounds, torch_threads=torch.get_num_threads(),
        torch=torch.__version__, git_commit=commit, git_dirty=dirty,
        median_prefill_ms={name: statistics.median(values) for name, values in times.items()}, prefill_ms=times,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, value in result["median_prefill_ms"].items():
        print(f"{name:40s} {value:8.1f} ms")


if __name__ == "__main__":
    main()
