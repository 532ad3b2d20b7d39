"""Every reach into transformers internals lives in this package, pinned to one transformers release.

hybrid-vlm drives the stock llava-hf modules with its own loops (the LLM decoder loop in
`hybrid_vlm.model`, the merging CLIP loop for DyMU). Those loops need module attribute names,
helpers and the cache API of one specific transformers release; they are collected here so that a
transformers upgrade means reading this package (and `patches/README.md`), not grepping the project.

- `llava.py`: LlavaForConditionalGeneration / LlamaModel / LlamaDecoderLayer / DynamicCache.
- `clip.py`: CLIPVisionModel internals (DyMU merging).

Importing it on any other transformers release raises at once: a silent mismatch here would give
wrong logits, not an exception.
"""

from __future__ import annotations

import transformers

SUPPORTED_TRANSFORMERS = "5.23"


def check_transformers_version(version: str | None = None) -> None:
    version = transformers.__version__ if version is None else version
    if not version.startswith(SUPPORTED_TRANSFORMERS + "."):
        raise ImportError(
            f"hybrid-vlm supports transformers {SUPPORTED_TRANSFORMERS}.x only, found {version}. "
            f"Install it with: pip install 'transformers=={SUPPORTED_TRANSFORMERS}.*'. "
            "Porting to another release means re-checking every item in hybrid_vlm/hf_compat/."
        )


check_transformers_version()

from .clip import DymuImageFeatures, dymu_image_features, vision_fingerprint  # noqa: E402
from .llava import (  # noqa: E402
    Cache,
    DynamicCache,
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaParts,
    first_llm_module,
    llama_layer_forward,
    llava_parts,
    new_cache,
    stock_image_features,
)

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "Cache",
    "DymuImageFeatures",
    "DynamicCache",
    "LlavaCausalLMOutputWithPast",
    "LlavaForConditionalGeneration",
    "LlavaParts",
    "check_transformers_version",
    "dymu_image_features",
    "first_llm_module",
    "llama_layer_forward",
    "llava_parts",
    "new_cache",
    "stock_image_features",
    "vision_fingerprint",
]
