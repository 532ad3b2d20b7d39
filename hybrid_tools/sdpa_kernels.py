"""Which SDPA implementation each layer ran, read from a `torch.profiler` trace of one prefill and
its decode steps.

`torch.nn.functional.scaled_dot_product_attention` dispatches to one backend op per call, and the
profiler records that op under the call: its name says flash, memory-efficient, cuDNN or math.
Layer boundaries come from zero-length markers that a pre-hook on each LLM layer's input norm
records (`hf_compat.layer_entry_modules`), so the same trace reading works for the stock forward
and the hybrid engine. SDPA calls before LLM layer 0 of a phase are the vision tower's.

What comes out per phase ("prefill", "decode"): runs of consecutive layers with the same
(backend, masked) pair, e.g. `L0-1 flash`, `L2-31 efficient+mask`, and the vision tower's calls
counted by backend. On CUDA the device kernels launched under each SDPA call are kept too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from hybrid_vlm.hf_compat import layer_entry_modules

SDPA_CALL = "aten::scaled_dot_product_attention"
SDPA_BACKENDS = {  # the op SDPA dispatched to -> its short name
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
LAYER_MARKER = "hybrid_bench.llm_layer."
PHASES = ("prefill", "decode")
VISION = "vision"


@dataclass(frozen=True)
class SdpaCall:
    phase: str  # "prefill" | "decode"
    layer: int | None  # LLM layer index; None: before LLM layer 0 (the vision tower)
    backend: str  # a value of SDPA_BACKENDS, or the op's own name when unknown
    masked: bool  # an explicit attn_mask was passed
    kernels: tuple[str, ...] = ()  # device kernels launched under the call (CUDA only)


@dataclass
class LayerMarkers:
    """Pre-hooks that record a zero-length profiler range as each LLM layer starts."""

    model: object
    handles: list = field(default_factory=list)

    def __enter__(self):
        for index, module in enumerate(layer_entry_modules(self.model)):
            self.handles.append(module.register_forward_pre_hook(_marker_hook(index)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _marker_hook(index: int):
    def hook(module, inputs):
        with record_function(f"{LAYER_MARKER}{index}"):
            pass

    return hook


def profile_sdpa(model, run_prefill, run_decode, device: torch.device) -> list[SdpaCall]:
    """Profile `run_prefill()` then `run_decode(prefill_output)`; every SDPA call, in order."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with LayerMarkers(model), profile(activities=activities, record_shapes=True) as trace:
        with record_function("prefill"):
            output = run_prefill()
        with record_function("decode"):
            run_decode(output)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return sdpa_calls(trace.events())


def sdpa_calls(events) -> list[SdpaCall]:
    """The SDPA calls of a profiler event list, each placed in its phase and LLM layer."""
    # host-side events only: with CUDA activity the trace also holds device events (kernels, and
    # copies of the phase ranges on the GPU's clock) that must not move the phase boundaries
    ordered = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.time_range.start)
    phases = [(e.name, e.time_range.start, e.time_range.end) for e in ordered if e.name in PHASES]
    calls, layer, phase = [], None, None
    for event in ordered:
        now = event.time_range.start
        current = next((name for name, start, end in phases if start <= now <= end), None)
        if current != phase:
            phase, layer = current, None
        if event.name.startswith(LAYER_MARKER):
            layer = int(event.name[len(LAYER_MARKER):])
        elif event.name == SDPA_CALL and phase is not None and not _inside_sdpa(event):
            calls.append(_call(event, phase, layer))
    return calls


def _inside_sdpa(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == SDPA_CALL:
            return True
        parent = parent.cpu_parent
    return False


def _call(event, phase: str, layer: int | None) -> SdpaCall:
    subtree = list(_descendants(event))
    backend = next((SDPA_BACKENDS[e.name] for e in subtree if e.name in SDPA_BACKENDS), None)
    if backend is None:  # a backend this table does not know: its op name, so it shows
        backend = next((e.name for e in event.cpu_children if e.name.startswith("aten::_scaled_dot_product")), "unknown")
    shapes = event.input_shapes or []
    masked = len(shapes) > 3 and bool(shapes[3])  # (query, key, value, attn_mask, ...): [] when None
    kernels = tuple(sorted({k.name for e in [event, *subtree] for k in getattr(e, "kernels", [])}))
    return SdpaCall(phase, layer, backend, masked, kernels)


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def label(call: SdpaCall) -> str:
    return call.backend + ("+mask" if call.masked else "")


def summarize_phase(calls: list[SdpaCall], phase: str) -> str:
    """One phase in a line: 'vision 24x math; L0-1 flash; L2-31 efficient+mask'. Decode steps that
    agree collapse to one; layers that ran differently in different steps list every label."""
    phase_calls = [c for c in calls if c.phase == phase]
    if not phase_calls:
        return "no SDPA calls"
    parts = []
    vision = [label(c) for c in phase_calls if c.layer is None]
    for name in sorted(set(vision)):
        parts.append(f"{VISION} {vision.count(name)}x {name}")
    per_layer: dict[int, set[str]] = {}
    for call in phase_calls:
        if call.layer is not None:
            per_layer.setdefault(call.layer, set()).add(label(call))
    for first, last, labels in _runs(per_layer):
        span = f"L{first}" if first == last else f"L{first}-{last}"
        parts.append(f"{span} {'/'.join(sorted(labels))}")
    return "; ".join(parts)


def _runs(per_layer: dict[int, set[str]]):
    """(first layer, last layer, labels) for each run of consecutive layers with the same labels."""
    runs = []
    for layer in sorted(per_layer):
        labels = per_layer[layer]
        if runs and runs[-1][1] == layer - 1 and runs[-1][2] == labels:
            runs[-1] = (runs[-1][0], layer, labels)
        else:
            runs.append((layer, layer, labels))
    return runs


def kernel_summary(calls: list[SdpaCall]) -> dict:
    """What a bench row keeps: each phase's line, and the CUDA kernel names seen per phase."""
    return {
        phase: dict(layers=summarize_phase(calls, phase), cuda_kernels=sorted({k for c in calls if c.phase == phase for k in c.kernels}))
        for phase in PHASES
    }
