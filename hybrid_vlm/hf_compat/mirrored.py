"""The upstream functions hybrid-vlm copies, calls for their maths, or overrides, fingerprinted per
supported transformers minor release.

The import gate (`versions.py`) accepts any patch release of a supported minor; a patch release that
changes one of these functions would pass it unnoticed. `tests/test_hf_compat.py` compares the
running release's fingerprints with the ones recorded here, so such a change fails the suite until
someone reads it and records the new fingerprint (the porting checklist in patches/README.md), and
the first `apply_hybrid` of a process warns, naming them (`warn_if_changed`, about a second).

    python -m hybrid_vlm.hf_compat.mirrored    # the running release's fingerprints, as a table entry
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import warnings

import transformers

from .versions import minor_release

DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
MODELS = "transformers.models"
MIRRORED = (
    # the decoder layer the engine's loop re-implements (`llava.llama_layer_forward`) and what it calls
    f"{MODELS}.llama.modeling_llama:apply_rotary_pos_emb",
    f"{MODELS}.llama.modeling_llama:rotate_half",
    f"{MODELS}.llama.modeling_llama:repeat_kv",
    f"{MODELS}.llama.modeling_llama:LlamaRMSNorm.forward",
    f"{MODELS}.llama.modeling_llama:LlamaMLP.forward",
    f"{MODELS}.llama.modeling_llama:LlamaAttention.forward",
    f"{MODELS}.llama.modeling_llama:LlamaDecoderLayer.forward",
    f"{MODELS}.llama.modeling_llama:LlamaRotaryEmbedding.forward",
    "transformers.modeling_rope_utils:dynamic_rope_update",  # its host read is what `rope_reads_positions_on_host` warns of
    f"{MODELS}.mistral.modeling_mistral:MistralAttention.forward",  # LLaVA-NeXT-Mistral's layers, driven the same way
    f"{MODELS}.mistral.modeling_mistral:MistralDecoderLayer.forward",
    "transformers.integrations.sdpa_attention:use_gqa_in_sdpa",
    "transformers.integrations.sdpa_attention:pack_gqa",
    "transformers.integrations.sdpa_attention:sdpa_attention_forward",
    # image features: LLaVA's, LLaVA-NeXT's packing, the CLIP layers DyMU's loop drives
    f"{MODELS}.llava.modeling_llava:LlavaModel.get_image_features",
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextModel.get_image_features",
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextModel.pack_image_features",
    f"{MODELS}.llava_next.modeling_llava_next:unpad_image",
    f"{MODELS}.llava_next.modeling_llava_next:image_size_to_num_patches",
    f"{MODELS}.llava_next.modeling_llava_next:get_anyres_image_grid_shape",
    f"{MODELS}.clip.modeling_clip:CLIPAttention.forward",
    f"{MODELS}.clip.modeling_clip:CLIPEncoderLayer.forward",
    f"{MODELS}.clip.modeling_clip:CLIPVisionEmbeddings.forward",
    # Qwen2.5-VL: the tower and its host-side inputs, the rotary, the layers, the ids the engine recomputes
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VisionTransformerPretrainedModel.forward",
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLRotaryEmbedding.forward",
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLAttention.forward",
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLDecoderLayer.forward",
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel.get_rope_index",
    "transformers.vision_utils:get_vision_cu_seqlens",
    "transformers.vision_utils:get_vision_position_ids",
    "transformers.vision_utils:get_vision_window_index",
    # generate's contract and the hooks the patched classes override or wrap
    "transformers.generation.utils:GenerationMixin._expand_inputs_for_generation",
    "transformers.generation.utils:GenerationMixin._prepare_position_ids_for_generation",
    "transformers.generation.utils:GenerationMixin._update_model_kwargs_for_generation",
    "transformers.generation.utils:GenerationMixin.prepare_inputs_for_generation",
    f"{MODELS}.llava.modeling_llava:LlavaForConditionalGeneration.prepare_inputs_for_generation",
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextForConditionalGeneration.prepare_inputs_for_generation",
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.prepare_inputs_for_generation",
    # GenerationHooks reaches the stock expansion through super(): GenerationMixin's, while no stock class overrides it
    f"{MODELS}.llava.modeling_llava:LlavaForConditionalGeneration._expand_inputs_for_generation",
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextForConditionalGeneration._expand_inputs_for_generation",
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._expand_inputs_for_generation",
    "transformers.generation.utils:GenerationMixin._prefill",  # slices a call over a filled cache (`continuation_length`)
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation",
    # the cache the engine fills layer by layer
    "transformers.cache_utils:DynamicLayer.update",
    "transformers.cache_utils:DynamicLayer.get_seq_length",
    "transformers.cache_utils:DynamicLayer.lazy_initialization",
    "transformers.cache_utils:DynamicSlidingWindowLayer.update",
    "transformers.cache_utils:DynamicCache.__init__",
    "transformers.cache_utils:Cache.get_seq_length",
    # the forwards the patched classes and DyMU's loop replace whole (what they must keep doing)
    f"{MODELS}.llama.modeling_llama:LlamaModel.forward",
    f"{MODELS}.mistral.modeling_mistral:MistralModel.forward",
    f"{MODELS}.llava.modeling_llava:LlavaModel.forward",
    f"{MODELS}.llava.modeling_llava:LlavaForConditionalGeneration.forward",
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextModel.forward",
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextForConditionalGeneration.forward",
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel.forward",
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLTextModel.forward",
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.forward",
    f"{MODELS}.clip.modeling_clip:CLIPEncoder.forward",
    f"{MODELS}.clip.modeling_clip:CLIPVisionModel.forward",
)

# Recorded after reading each release's source of every function above. 5.23 -> 5.24: the cache
# renamed from `past_key_values` to `cache` (layers, attention, generate's hooks and model kwargs:
# `CACHE_NAME`), `cache.update(..., kwargs=)`, the paged-cache update moved out of
# sdpa_attention_forward, the rotary forward's @torch.no_grad dropped (it has no parameters), the
# mask's `.contiguous()` only on tensors; the model forwards return `image_outputs` where they
# returned `image_hidden_states` (the engine's output class follows, `llava.py`); DynamicLayer's
# lazy_initialization takes the values' dtype from the values; generate's `_prefill` skips its
# slicing for all-linear-attention caches (the engine's is a DynamicCache); none changes what the
# engine computes. 5.24 -> 5.25: `_prefill` slices every cache again, and `Cache.get_seq_length`
# lost its branch for linear-attention layers: neither applies to a DynamicCache of attention layers.
FINGERPRINTS_5_25 = {
    f"{MODELS}.llama.modeling_llama:apply_rotary_pos_emb": 'a6dd2967da96713e',
    f"{MODELS}.llama.modeling_llama:rotate_half": 'c3e95bb5f330fa3c',
    f"{MODELS}.llama.modeling_llama:repeat_kv": 'd7cb84ea104d6a1d',
    f"{MODELS}.llama.modeling_llama:LlamaRMSNorm.forward": 'f2b1cef92c1f06bf',
    f"{MODELS}.llama.modeling_llama:LlamaMLP.forward": 'c175739048a2dbe3',
    f"{MODELS}.llama.modeling_llama:LlamaAttention.forward": '1489739e7577f988',
    f"{MODELS}.llama.modeling_llama:LlamaDecoderLayer.forward": '578dd0f2c50f1d12',
    f"{MODELS}.llama.modeling_llama:LlamaRotaryEmbedding.forward": '13fd3a77f964628e',
    'transformers.modeling_rope_utils:dynamic_rope_update': '08325dbe8de5e5f0',
    f"{MODELS}.mistral.modeling_mistral:MistralAttention.forward": 'ae2307bb04a6e0f0',
    f"{MODELS}.mistral.modeling_mistral:MistralDecoderLayer.forward": '578dd0f2c50f1d12',
    'transformers.integrations.sdpa_attention:use_gqa_in_sdpa': '5cb5b787e76f8e73',
    'transformers.integrations.sdpa_attention:pack_gqa': '5bdc6266c7818cb7',
    'transformers.integrations.sdpa_attention:sdpa_attention_forward': 'a2825ebbe8e42494',
    f"{MODELS}.llava.modeling_llava:LlavaModel.get_image_features": '3bff4c1e8c3351ef',
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextModel.get_image_features": 'd1c22f6622fe334f',
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextModel.pack_image_features": 'a4c1f7fa5f6d72c1',
    f"{MODELS}.llava_next.modeling_llava_next:unpad_image": 'eeff6d15ee20acb0',
    f"{MODELS}.llava_next.modeling_llava_next:image_size_to_num_patches": 'd96440182059d72e',
    f"{MODELS}.llava_next.modeling_llava_next:get_anyres_image_grid_shape": 'cb621bfc04bdd342',
    f"{MODELS}.clip.modeling_clip:CLIPAttention.forward": '9c417b71f12ced91',
    f"{MODELS}.clip.modeling_clip:CLIPEncoderLayer.forward": 'e1e22017cec41d0f',
    f"{MODELS}.clip.modeling_clip:CLIPVisionEmbeddings.forward": 'a6a62c3f8cf4ce80',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VisionTransformerPretrainedModel.forward": '1cb8ebe68ec008b3',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLRotaryEmbedding.forward": '6d9c6be8d5670cb4',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLAttention.forward": '3b19a1e4ff3eadc0',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLDecoderLayer.forward": 'a6e5dca83d12a945',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel.get_rope_index": '71a1a04e79d9402c',
    'transformers.vision_utils:get_vision_cu_seqlens': 'aee13f15c32efcfe',
    'transformers.vision_utils:get_vision_position_ids': '6d2193802eadae1c',
    'transformers.vision_utils:get_vision_window_index': '19616bef14c5cb1e',
    'transformers.generation.utils:GenerationMixin._expand_inputs_for_generation': '7480891fe3bf6a99',
    'transformers.generation.utils:GenerationMixin._prepare_position_ids_for_generation': '44c83105d3c5436e',
    'transformers.generation.utils:GenerationMixin._update_model_kwargs_for_generation': 'a842ba31fb4fd5a9',
    'transformers.generation.utils:GenerationMixin.prepare_inputs_for_generation': '6839ba3955ad431e',
    f"{MODELS}.llava.modeling_llava:LlavaForConditionalGeneration.prepare_inputs_for_generation": 'absent',
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextForConditionalGeneration.prepare_inputs_for_generation": 'absent',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.prepare_inputs_for_generation": 'absent',
    f"{MODELS}.llava.modeling_llava:LlavaForConditionalGeneration._expand_inputs_for_generation": 'absent',
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextForConditionalGeneration._expand_inputs_for_generation": 'absent',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._expand_inputs_for_generation": 'absent',
    'transformers.generation.utils:GenerationMixin._prefill': '1471a8976760f37a',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation": '34a391da8544ccb4',
    'transformers.cache_utils:DynamicLayer.update': 'c9d4538ca6392290',
    'transformers.cache_utils:DynamicLayer.get_seq_length': '079d68a3bcb81503',
    'transformers.cache_utils:DynamicLayer.lazy_initialization': '4d6e3415561f963b',
    'transformers.cache_utils:DynamicSlidingWindowLayer.update': 'f4f299404720469a',
    'transformers.cache_utils:DynamicCache.__init__': '26dc0888b09c83e3',
    'transformers.cache_utils:Cache.get_seq_length': '6e8f8dd5d70f874a',
    f"{MODELS}.llama.modeling_llama:LlamaModel.forward": '6a4696e0891319a3',
    f"{MODELS}.mistral.modeling_mistral:MistralModel.forward": 'd82d2a6b11133e08',
    f"{MODELS}.llava.modeling_llava:LlavaModel.forward": '018d723d1917a04c',
    f"{MODELS}.llava.modeling_llava:LlavaForConditionalGeneration.forward": '370a6905f13ca23a',
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextModel.forward": 'be8603d3b956dbb7',
    f"{MODELS}.llava_next.modeling_llava_next:LlavaNextForConditionalGeneration.forward": '68031aa674ba7494',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel.forward": 'e7c76b231a775980',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLTextModel.forward": '3d88f660f91f6262',
    f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.forward": '51779a331387b262',
    f"{MODELS}.clip.modeling_clip:CLIPEncoder.forward": '1ee14630a93940cf',
    f"{MODELS}.clip.modeling_clip:CLIPVisionModel.forward": 'a31569825154280d',
}
FINGERPRINTS: dict[str, dict[str, str]] = {
    "5.25": FINGERPRINTS_5_25,
    "5.24": {
        **FINGERPRINTS_5_25,
        'transformers.generation.utils:GenerationMixin._prefill': '4877a67a5c858cd3',
        'transformers.cache_utils:Cache.get_seq_length': '634f7af7a3bc6754',
    },
    "5.23": {
        **FINGERPRINTS_5_25,
        f"{MODELS}.llama.modeling_llama:LlamaAttention.forward": '0e885f95c05996db',
        f"{MODELS}.llama.modeling_llama:LlamaDecoderLayer.forward": 'f42bfd5c8b229783',
        f"{MODELS}.llama.modeling_llama:LlamaRotaryEmbedding.forward": '357e762a64c703c5',
        f"{MODELS}.mistral.modeling_mistral:MistralAttention.forward": 'ce8ca62968f927d9',
        f"{MODELS}.mistral.modeling_mistral:MistralDecoderLayer.forward": 'f42bfd5c8b229783',
        'transformers.integrations.sdpa_attention:sdpa_attention_forward': 'a030d39b9274fbb1',
        f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLRotaryEmbedding.forward": 'ad0978fa80ee5847',
        f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLAttention.forward": 'cef94cef3dbff7c1',
        f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLDecoderLayer.forward": '0adb656058855efc',
        'transformers.generation.utils:GenerationMixin._prepare_position_ids_for_generation': 'dd8c1a986f6692d5',
        'transformers.generation.utils:GenerationMixin._update_model_kwargs_for_generation': 'f522968ded2cfcac',
        'transformers.generation.utils:GenerationMixin.prepare_inputs_for_generation': '555b27a36e9db968',
        'transformers.generation.utils:GenerationMixin._prefill': 'b55245d5387c1ae5',
        f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation": '0abcec5a66c4acc5',
        'transformers.cache_utils:DynamicLayer.lazy_initialization': 'a68c8d155fdf1117',
        'transformers.cache_utils:Cache.get_seq_length': '634f7af7a3bc6754',
        f"{MODELS}.llama.modeling_llama:LlamaModel.forward": 'd99da9be0e8d7bdb',
        f"{MODELS}.mistral.modeling_mistral:MistralModel.forward": 'c19af80282cf7153',
        f"{MODELS}.llava.modeling_llava:LlavaModel.forward": 'cc5fb44c0cf8fb3a',
        f"{MODELS}.llava.modeling_llava:LlavaForConditionalGeneration.forward": '524bc7962fa2bc36',
        f"{MODELS}.llava_next.modeling_llava_next:LlavaNextModel.forward": 'd2e6c91aa6de3c2d',
        f"{MODELS}.llava_next.modeling_llava_next:LlavaNextForConditionalGeneration.forward": '7d95ab4bb2b84a98',
        f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel.forward": '7929aa262dcb2e2b',
        f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLTextModel.forward": '0ee5669dad609e0d',
        f"{MODELS}.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.forward": 'c61647557f5a77d6',
    },
}


def source_of(spec: str) -> str:
    """The source of the definition a `module:Qualified.name` spec names, decorators included, read
    from its module's file: 5.25 replaces some module functions with kernel wrappers at import
    (`apply_rotary_pos_emb` becomes a `Func` module), whose own source is not the function's."""
    module, _, qualified = spec.partition(":")
    text = inspect.getsource(importlib.import_module(module))
    body = ast.parse(text).body
    for name in qualified.split("."):
        node = next((n for n in body if isinstance(n, DEFINITIONS) and n.name == name), None)
        if node is None:
            raise LookupError(f"{spec}: no definition {name!r} in {module}")
        body = node.body
    first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
    return "\n".join(text.splitlines()[first - 1 : node.end_lineno])


def fingerprint(spec: str) -> str:
    """The first 16 hex digits of the SHA-256 of the named definition's source; "absent" where the
    release does not define it there (a class that inherits the method), which is recorded too."""
    try:
        return hashlib.sha256(source_of(spec).encode()).hexdigest()[:16]
    except (LookupError, ImportError):  # not defined there, or its module moved: either way not what was read
        return "absent"


def running_release() -> str:
    return "{}.{}".format(*minor_release(transformers.__version__))


def changed_sources(release: str | None = None) -> list[str]:
    """The specs whose source differs from the fingerprint recorded for `release` (default: the
    running one's minor release); every spec when none is recorded for it."""
    recorded = FINGERPRINTS.get(release or running_release(), {})
    return [spec for spec in MIRRORED if recorded.get(spec) != fingerprint(spec)]


@functools.cache
def warn_if_changed() -> list[str]:
    """Once per process: warn, naming them, when the running release's sources differ from the ones
    read (a patch release of a supported minor passes the import gate unread). Returns them."""
    if running_release() not in FINGERPRINTS:  # an untested release, let in by the import gate's bypass, which warned
        return []
    try:
        changed = changed_sources()
    except (OSError, TypeError) as error:  # no source files to read (a frozen or bytecode-only install)
        warnings.warn(f"hybrid_vlm could not read transformers' sources to check them ({error}); "
                      "the engine is tested against 5.23-5.25 as released", stacklevel=3)
        return []
    if changed:
        warnings.warn(
            f"transformers {transformers.__version__} changed {len(changed)} upstream function(s) the engine mirrors or "
            f"overrides since {running_release()} was read: {', '.join(changed)}. Its results may no longer match stock "
            "transformers: see the porting checklist in patches/README.md (python -m hybrid_vlm.hf_compat.mirrored)",
            stacklevel=3,
        )
    return changed


def main() -> int:
    print(f"    {running_release()!r}: {{")
    for spec in MIRRORED:
        print(f"        {spec!r}: {fingerprint(spec)!r},")
    print("    },")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
