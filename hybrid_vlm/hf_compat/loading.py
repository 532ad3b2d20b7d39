"""How hybrid-vlm asks transformers to load a checkpoint."""

from __future__ import annotations

# transformers 5.25 requires the `kernels` package and kernelizes every from_pretrained model by
# default: inside LlamaAttention (and Qwen2.5-VL's) a hub rotary kernel replaces
# apply_rotary_pos_emb on CUDA, and kernels are fetched from the hub. The engine's layer loop calls
# the plain PyTorch functions, so a kernelized stock model would no longer be the reference the
# engine is compared with (parity, the bench's stock row), and an offline GPU machine would try the
# hub. Every model is loaded without them; 5.23 and 5.24 take the same argument (their default).
NO_HUB_KERNELS = {"use_kernels": False}
