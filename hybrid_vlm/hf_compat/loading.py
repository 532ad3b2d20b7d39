"""How hybrid-vlm asks transformers to load a checkpoint."""

from __future__ import annotations

from pathlib import Path

# transformers 5.25 requires the `kernels` package and kernelizes every from_pretrained model by
# default: inside LlamaAttention (and Qwen2.5-VL's) a hub rotary kernel replaces
# apply_rotary_pos_emb on CUDA, and kernels are fetched from the hub. The engine's layer loop calls
# the plain PyTorch functions, so a kernelized stock model would no longer be the reference the
# engine is compared with (parity, the bench's stock row), and an offline GPU machine would try the
# hub. Every model is loaded without them; 5.23 and 5.24 take the same argument (their default).
NO_HUB_KERNELS = {"use_kernels": False}


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` that is no local path: what from_pretrained would look up on the hub (or in its
    cache) rather than read from a folder. Anything else is a folder, missing or not."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).exists()


def check_not_kernelized(model) -> None:
    """Refuse a model loaded with hub kernels (transformers 5.25's default `from_pretrained`): the
    engine's layer loop runs the plain PyTorch functions, so it would run some kernels (the
    kernelized norms and activations it calls) and not others (the rotary kernel, active only
    inside LlavaAttention.forward), and no longer match the stock model it is compared with.
    `use_kernels` is a public property of every transformers 5.23-5.25 model. On 5.23 and 5.24, which
    kernelize only when asked and have no `reset_kernels`, setting it back to False clears the flag
    but, as upstream warns, not the kernels: such a model is not detected."""
    if getattr(model, "use_kernels", False):
        undo = " or call model.reset_kernels() first" if hasattr(model, "reset_kernels") else ""
        raise ValueError(
            "this model was loaded with hub kernels (transformers 5.25 kernelizes from_pretrained models by default); "
            "hybrid_vlm runs PyTorch's own maths: load it with from_pretrained(..., use_kernels=False) "
            f"(hybrid_vlm.hf_compat.NO_HUB_KERNELS){undo}"
        )


def check_on_one_device(model) -> None:
    """Refuse a model that accelerate dispatched over several devices or with offload (a
    `from_pretrained` device_map such as "auto" that spans more than one device). Its hook on the top
    module keeps the stock `forward` as an instance attribute, which wins over the class the engine
    swaps in, so the model would run stock while saying it is patched; and the hooks that move each
    layer's inputs between devices sit on module forwards the engine's layer loop does not call."""
    devices = {str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()}
    hooked = "forward" in vars(model) or getattr(model, "_hf_hook", None) is not None
    if hooked or len(devices) > 1:
        where = f"devices {sorted(devices)}" if len(devices) > 1 else "an accelerate hook on its forward"
        raise ValueError(
            f"this model is dispatched by accelerate ({where}); hybrid_vlm runs a model on one device: load it with "
            'from_pretrained(..., device_map={"": "cuda:0"}) or move it with .to(device), without offload'
        )
