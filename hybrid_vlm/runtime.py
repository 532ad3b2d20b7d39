"""Where and in what precision models run: one rule for calibration, the bench and the plugin (whose
Qwen2.5-VL names load their checkpoint's own dtype on CUDA, as VLMEvalKit does).

Default: the first CUDA device when there is one, else the CPU; on CUDA the model family's released
dtype (`CUDA_AUTO_DTYPES`: float16 for LLaVA-1.5 and LLaVA-NeXT, what VLMEvalKit's LLaVA wrapper
uses; bfloat16 for Qwen2.5-VL), float32 on CPU (CPU half-precision kernels are slow or missing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
# "auto" on CUDA, by config model_type, where it is not float16: Qwen2.5-VL's checkpoints are
# bfloat16 (Qwen/Qwen2.5-VL-7B-Instruct's config.json), and VLMEvalKit loads them so
CUDA_AUTO_DTYPES = {"qwen2_5_vl": torch.bfloat16}


def resolve_device(requested: str | None = None) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1"), else cuda if available, else cpu; a clear error for
    a CUDA device on a machine without CUDA. A CUDA device always carries its index (plain "cuda"
    is the current one): `torch.cuda.set_device` refuses a device without one."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} asked for CUDA, but CUDA is not available here: use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(requested: str | None, device: torch.device, model_type: str | None = None) -> torch.dtype:
    """`requested` (one of DTYPE_CHOICES; None = "auto") for `device` and a model of config
    `model_type` (None: an unknown one, float16 on CUDA)."""
    if requested in (None, "auto"):
        return CUDA_AUTO_DTYPES.get(model_type, torch.float16) if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[requested]


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host-built tensor (index maps, layouts) to `device` without a host sync: a plain
    copy from pageable memory to CUDA waits for the stream; from pinned memory it is asynchronous."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def require(condition: torch.Tensor, message: Callable[[], str]) -> None:
    """A 0-d bool tensor that must be true: a ValueError with `message()` on CPU (reading it is
    free), a device assert elsewhere (no host sync)."""
    if condition.device.type == "cpu":
        if not bool(condition):
            raise ValueError(message())
    else:
        torch._assert_async(condition)


class HostReads:
    """How many values the engine has read back to the host on purpose (`read_on_host`), so that a
    sync check can tell a designed read from an unintended one. A process-wide count: readers take
    the difference around the region they check."""

    count = 0


def read_on_host(condition: torch.Tensor) -> bool:
    """`bool(condition)` for a 0-d bool tensor, read on purpose: a host sync on an accelerator, and
    counted in `HostReads`."""
    HostReads.count += 1
    return bool(condition)
