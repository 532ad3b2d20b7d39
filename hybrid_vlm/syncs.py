"""Does a forward read tensor values back to the host? One check, one meaning on every device.

What is checked: a prefill with a fresh cache, then `decode_steps` cached decode steps, as generate
runs them. On CUDA the steps run under `torch.cuda.set_sync_debug_mode("error")` after an untimed
warm-up (lazy initialisation may sync once); on CPU they run on a copy of the model on the `meta`
device, where tensors have no data, so any `.item()`, `bool(tensor)`, `nonzero` or boolean index
fails. Either way a host sync in the forward is a "fail: <what raised>".

Two reads per prompt are made by design, and are counted instead of failing the check:
- DyMU reads one number per batch (the largest merged token count, which sizes the LLM input). On
  CUDA its syncs are counted (sync-debug mode "warn"). On CPU it is reported as not applicable: the
  meta device cannot run a forward that needs that number.
- `mask_read="once"` may read a batch's attention_mask in the prefill (does it hold padding?), through
  `runtime.read_on_host`, which counts it. On CUDA the syncs are counted as DyMU's are; on the meta
  device every `bool()` is answered True ("no padding") and counted, so the mask-free path that
  follows is checked like any other.
A check passes with no more syncs in the prefill than DyMU's one plus the reads the engine counted
there (none where it skipped the read: a batch of several prompts with filler slots, unequal quotas or DyMU's merged slots),
and none in the decode steps.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from .hf_compat import cache_kwarg, new_cache
from .model import HybridDecoder, apply_hybrid, inputs_for, stock_class
from .runtime import HostReads

NOT_APPLICABLE_DYMU = "not applicable on CPU: DyMU reads one count per batch by design"
DYMU_PROMPT_SYNCS = 1  # the largest merged token count, which sizes the LLM input


def prefill_and_decode(model, inputs: dict, decode_steps: int = 1):
    """Prefill, then `decode_steps` greedy-shaped steps (token 0) over the cache; the last output."""
    output, step = _prefill(model, inputs)
    for _ in range(decode_steps):
        output = step()
    return output


def _prefill(model, inputs: dict):
    """(the prefill's output, a function that runs one decode step over its cache)."""
    device = next(model.parameters()).device
    # a checked region must get its inputs already on the device: copying from host memory waits for
    # the copy, which sync-debug mode reports (a no-op for inputs already placed)
    inputs = inputs_for(model, inputs)
    cache = new_cache(model)
    masks = [inputs["attention_mask"]]

    def step():
        token = torch.zeros(masks[-1].shape[0], 1, dtype=torch.long, device=device)
        masks.append(torch.cat([masks[-1], torch.ones_like(token)], dim=1))
        with torch.no_grad():
            return model(input_ids=token, attention_mask=masks[-1], **cache_kwarg(cache), use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        return model(**inputs, **cache_kwarg(cache), use_cache=True, logits_to_keep=1), step


def count_cuda_syncs(model, inputs: dict, decode_steps: int) -> SyncCounts:
    """Host syncs in a prefill and in its `decode_steps` decode steps, counted as the warnings of
    CUDA sync-debug mode "warn" after an uncounted warm-up, beside the designed reads of each."""
    inputs = _warmed_up(model, inputs, decode_steps)
    ((_, step), prefill_syncs), prefill_designed = _with_designed_count(lambda: _with_sync_count(lambda: _prefill(model, inputs)))
    (_, decode_syncs), decode_designed = _with_designed_count(lambda: _with_sync_count(lambda: [step() for _ in range(decode_steps)]))
    return SyncCounts(prefill_syncs, decode_syncs, _allowed_in_prefill(model, prefill_designed), decode_designed)


@dataclass
class SyncCounts:
    prefill: int  # host syncs (CUDA) or value reads (meta) in the prefill
    decode: int  # the same over all decode steps
    allowed_in_prefill: int  # DyMU's count + the reads the engine counted in the prefill (`read_on_host`)
    designed_in_decode: int  # reads the engine counted in the decode steps: must be none


def _allowed_in_prefill(model, designed: int) -> int:
    return DYMU_PROMPT_SYNCS * merges_with_dymu(model) + designed


def merges_with_dymu(model) -> bool:
    """The engine with DyMU on (stock transformers has no hybrid_config: never)."""
    return isinstance(model, HybridDecoder) and model.hybrid_config.dymu is not None


def _with_designed_count(run):
    """(run(), how many designed reads `runtime.read_on_host` counted while it ran)."""
    before = HostReads.count
    result = run()
    return result, HostReads.count - before


def _warmed_up(model, inputs: dict, decode_steps: int) -> dict:
    """The inputs on the device after one unchecked prefill + decode (lazy initialisation may sync
    once) and a synchronize, so that a checked region starts from an idle device."""
    inputs = inputs_for(model, inputs)
    prefill_and_decode(model, inputs, decode_steps)
    torch.cuda.synchronize(next(model.parameters()).device)
    return inputs


def _with_sync_count(run):
    """(run(), how many host syncs CUDA sync-debug mode "warn" reported while it ran)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchronizing" in str(w.message) for w in caught)


def meta_copy(model):
    """The same architecture and engine setting on the meta device (no weights are copied)."""
    with torch.device("meta"):
        copy = stock_class(model)(model.config)
    if isinstance(model, HybridDecoder):
        apply_hybrid(copy, model.hybrid_config)
    return copy.eval()


def counts_designed_reads(model) -> bool:
    """Whether this model's forward may read a value on purpose (DyMU's count, MASK_READ=once)."""
    return merges_with_dymu(model) or (isinstance(model, HybridDecoder) and model.hybrid_config.mask_read == "once")


def check_no_host_syncs(model, inputs: dict, decode_steps: int = 1) -> str:
    """"pass", "fail: <first line of the error>", or why the check does not apply; with designed
    reads (`counts_designed_reads`), "pass: <counts>" or "fail: <counts>"."""
    device = next(model.parameters()).device
    if merges_with_dymu(model) and device.type != "cuda":
        return NOT_APPLICABLE_DYMU
    try:
        if counts_designed_reads(model):
            count = count_cuda_syncs if device.type == "cuda" else count_meta_reads
            return reads_verdict(count(model, inputs, decode_steps), decode_steps)
        if device.type == "cuda":
            inputs = _warmed_up(model, inputs, decode_steps)
            torch.cuda.set_sync_debug_mode("error")
            try:
                prefill_and_decode(model, inputs, decode_steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            prefill_and_decode(meta_copy(model), inputs, decode_steps)
    except (RuntimeError, NotImplementedError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        counted = device.type == "cuda" and not counts_designed_reads(model)
        return "fail: " + first + (counted_after_failure(model, inputs, decode_steps) if counted else "")
    return "pass"


def counted_after_failure(model, inputs: dict, decode_steps: int) -> str:
    """Mode "error" stops at the first sync, so a sync in the prefill would leave the decode steps
    unjudged: after a failure, a counting pass says where the syncs were."""
    try:
        counts = count_cuda_syncs(model, inputs, decode_steps)
    except Exception:  # a diagnostic only: the verdict stands without it
        return ""
    return f" (counted: {counts.prefill} sync(s) in the prefill, {counts.decode} in {decode_steps} decode steps)"


def reads_verdict(counts: SyncCounts, decode_steps: int) -> str:
    """No more syncs in the prefill than allowed and none in the decode steps is a pass; the counts
    and the allowance are in the verdict either way (`allowed_per_prompt` reads it back)."""
    text = (f"{counts.prefill} sync(s) in the prefill ({counts.allowed_in_prefill} allowed), "
            f"{counts.decode} in {decode_steps} decode steps (none allowed)")
    ok = counts.prefill <= counts.allowed_in_prefill and counts.decode == 0 and counts.designed_in_decode == 0
    return ("pass: " if ok else "fail: ") + text


COUNTED_VERDICT = re.compile(r"^(pass|fail): \d+ sync\(s\) in the prefill \((\d+) allowed\)")


def allowed_per_prompt(verdict: str) -> int | None:
    """The prefill's allowance a verdict of `check_no_host_syncs` was (or, for DyMU on the CPU, would
    be) judged by: the count in a `reads_verdict`, 0 for a plain "pass" (no designed read), DyMU's
    one read where the check does not apply, None where the verdict does not say."""
    if verdict == "pass":
        return 0
    if verdict == NOT_APPLICABLE_DYMU:
        return DYMU_PROMPT_SYNCS
    counted = COUNTED_VERDICT.match(verdict)
    return int(counted.group(2)) if counted else None


class AnswerReads(TorchFunctionMode):
    """On the meta device, answers `bool(tensor)` with True (for the mask read: "no padding") and
    counts it; every other read of a value (`item`, `tolist`, `nonzero`, ...) still fails."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__bool__ and args[0].device.type == "meta":
            self.reads += 1
            return True
        return func(*args, **(kwargs or {}))


def count_meta_reads(model, inputs: dict, decode_steps: int) -> SyncCounts:
    """Value reads in a prefill and in its `decode_steps` decode steps of the model's meta copy,
    beside the designed reads of each."""
    copy = meta_copy(model)
    with AnswerReads() as prefill:
        (_, step), prefill_designed = _with_designed_count(lambda: _prefill(copy, inputs))
    with AnswerReads() as decode:
        _, decode_designed = _with_designed_count(lambda: [step() for _ in range(decode_steps)])
    return SyncCounts(prefill.reads, decode.reads, _allowed_in_prefill(model, prefill_designed), decode_designed)
