"""Every reach into transformers internals lives in this package, checked against a tested range of releases.

hybrid-vlm drives the stock llava-hf modules with its own loops (the LLM decoder loop in
`hybrid_vlm.model`, the merging CLIP loop for DyMU). Those loops need module attribute names,
helpers and the cache API of specific transformers releases; they are collected here so that a
transformers upgrade means reading this package (and `patches/README.md`), not grepping the project.

- `versions.py`: the supported range (SUPPORTED_TRANSFORMERS) and the import gate.
- `llava.py`: LlavaForConditionalGeneration / LlamaModel / LlamaDecoderLayer / DynamicCache, and the
  cache-name shim (5.24 renamed `past_key_values` to `cache`).
- `llava_next.py`: LLaVA-NeXT's anyres layout (crops, unpadding, `image_newline`), learned from stock packing.
- `clip.py`: CLIPVisionModel internals (DyMU merging).
- `loading.py`: `NO_HUB_KERNELS`, the keyword every model load passes (5.25 kernelizes by default),
  and `check_not_kernelized`, which refuses a model loaded with them; `check_on_one_device`, which
  refuses a model accelerate dispatched over several devices (its hook would keep the stock forward).
- `generation.py`: generate's input expansion for beams, repeating each prompt's images whole.
- `qwen2_5_vl.py`: Qwen2.5-VL's module names, its M-RoPE rotary with the axes last, and the vision
  tower's grid-derived inputs precomputed on the host.
- `mirrored.py`: the upstream functions the engine copies, calls or overrides, with a fingerprint
  of their source per supported release (a test fails when a patch release changes one).

One code path where the releases agree; a small shim keyed on TRANSFORMERS_RELEASE where they do
not. Importing it on a release outside the range raises at once (a silent mismatch here would give
wrong logits, not an exception) unless HYBRID_VLM_ALLOW_UNTESTED_TRANSFORMERS=1, which exists to
run the test suite against a candidate release.
"""

from __future__ import annotations

from .versions import (
    SUPPORTED_TRANSFORMERS,
    TRANSFORMERS_RELEASE,
    UNTESTED_TRANSFORMERS_ENV,
    check_transformers_version,
    is_supported_transformers,
)

check_transformers_version()

from .clip import DymuImageFeatures, dymu_image_features, vision_fingerprint  # noqa: E402
from .llava import (  # noqa: E402
    CACHE_NAME,
    Cache,
    DynamicCache,
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaParts,
    cache_argument,
    cache_kwarg,
    cache_tensor_bytes,
    first_llm_module,
    layer_attention_row,
    layer_entry_modules,
    llama_layer_forward,
    llava_parts,
    new_cache,
    output_cache,
    stock_image_features,
    without_window_layers,
)
from .loading import NO_HUB_KERNELS, check_not_kernelized, check_on_one_device  # noqa: E402

__all__ = [
    "CACHE_NAME",
    "NO_HUB_KERNELS",
    "check_not_kernelized",
    "check_on_one_device",
    "SUPPORTED_TRANSFORMERS",
    "TRANSFORMERS_RELEASE",
    "UNTESTED_TRANSFORMERS_ENV",
    "Cache",
    "DymuImageFeatures",
    "DynamicCache",
    "LlavaCausalLMOutputWithPast",
    "LlavaForConditionalGeneration",
    "LlavaParts",
    "cache_argument",
    "cache_kwarg",
    "cache_tensor_bytes",
    "check_transformers_version",
    "dymu_image_features",
    "first_llm_module",
    "is_supported_transformers",
    "layer_attention_row",
    "layer_entry_modules",
    "llama_layer_forward",
    "llava_parts",
    "new_cache",
    "output_cache",
    "stock_image_features",
    "vision_fingerprint",
    "without_window_layers",
]
