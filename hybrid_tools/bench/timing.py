"""What the bench times and how: CUDA-event or wall clocks, the split of a prefill at LLM layer 0,
a prefill, greedy decode steps, and the untimed peak-memory pass."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import torch

from hybrid_vlm.hf_compat import cache_kwarg, first_llm_module, output_cache
from hybrid_vlm.hf_compat.qwen2_5_vl import reset_stock_rope_deltas, stock_decode_positions
from hybrid_vlm.model import HybridDecoder


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
    if not isinstance(model, HybridDecoder):
        reset_stock_rope_deltas(model, inputs)  # what its decode steps' positions add (`decode`)
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
