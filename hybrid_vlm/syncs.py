"""Does a forward read tensor values back to the host? One check, one meaning on every device.

What is checked: a prefill with a fresh cache, then `decode_steps` cached decode steps, as generate
runs them. On CUDA the steps run under `torch.cuda.set_sync_debug_mode("error")` after an untimed
warm-up (lazy initialisation may sync once); on CPU they run on a copy of the model on the `meta`
device, where tensors have no data, so any `.item()`, `bool(tensor)`, `nonzero` or boolean index
fails. Either way a host sync in the forward is a "fail: <what raised>".

DyMU is reported as not applicable: it reads one number per batch by design (the largest merged
token count, which sizes the LLM input), and its thresholds are matched to real weights.
"""

from __future__ import annotations

import torch

from .hf_compat import cache_kwarg, new_cache
from .model import HybridDecoder, apply_hybrid, stock_class

HOST_INPUTS = ("image_sizes", "image_grid_thw")  # LLaVA-NeXT's and Qwen2.5-VL's image layouts
NOT_APPLICABLE_DYMU = "not applicable: DyMU reads one count per batch by design"


def prefill_and_decode(model, inputs: dict, decode_steps: int = 1):
    """Prefill, then `decode_steps` greedy-shaped steps (token 0) over the cache; the last output."""
    device = next(model.parameters()).device
    # image layouts are metadata the engine reads on the host: they stay on the CPU (a stock model gets
    # them on the device, as users call it)
    on_host = HOST_INPUTS if isinstance(model, HybridDecoder) else ()
    inputs = {key: value if key in on_host else value.to(device) for key, value in inputs.items()}
    cache = new_cache(model)
    with torch.no_grad():
        output = model(**inputs, **cache_kwarg(cache), use_cache=True, logits_to_keep=1)
        attention_mask = inputs["attention_mask"]
        for _ in range(decode_steps):
            token = torch.zeros(attention_mask.shape[0], 1, dtype=torch.long, device=device)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            output = model(input_ids=token, attention_mask=attention_mask, **cache_kwarg(cache), use_cache=True, logits_to_keep=1)
    return output


def meta_copy(model):
    """The same architecture and engine setting on the meta device (no weights are copied)."""
    with torch.device("meta"):
        copy = stock_class(model)(model.config)
    if isinstance(model, HybridDecoder):
        apply_hybrid(copy, model.hybrid_config)
    return copy.eval()


def check_no_host_syncs(model, inputs: dict, decode_steps: int = 1) -> str:
    """"pass", "fail: <first line of the error>", or why the check does not apply."""
    if isinstance(model, HybridDecoder) and model.hybrid_config.dymu is not None:
        return NOT_APPLICABLE_DYMU
    device = next(model.parameters()).device
    try:
        if device.type == "cuda":
            prefill_and_decode(model, inputs, decode_steps)
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                prefill_and_decode(model, inputs, decode_steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            prefill_and_decode(meta_copy(model), inputs, decode_steps)
    except (RuntimeError, NotImplementedError) as error:
        return "fail: " + (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return "pass"
