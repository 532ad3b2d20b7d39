"""The bench's models and inputs: preset shapes (random weights, real layer sizes), built from
configs with no download, and processor inputs of one synthetic image and a prompt of a chosen
number of text tokens."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
)

from hybrid_vlm import flops
from hybrid_vlm.model import load_supported_model
from hybrid_vlm.qwen_flops import qwen_shape_from_config
from hybrid_vlm.tiny import IMAGE_TOKEN, build_next_processor, build_processor, build_tiny_llava, synthetic_image, tiny_llava_config
from hybrid_vlm.tiny_qwen import build_qwen_processor

PRESETS = ("tiny", "mid", "vit-l", "llava-1.5-7b", "next-mid", "llava-next-7b", "qwen-mid", "qwen2.5-vl-7b")
NEXT_PRESETS = ("next-mid", "llava-next-7b")
QWEN_PRESETS = ("qwen-mid", "qwen2.5-vl-7b")
GPU_PRESETS = ("llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b")
QWEN_IMAGE_SIZE = (1120, 896)  # width, height: 40 x 32 merged units = 1,280 tokens, VLMEvalKit's minimum
# llava-hf/llava-v1.6-vicuna-7b-hf's anyres resolutions, and the bench image for NeXT presets
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT_IMAGE_SIZE = (640, 480)  # width, height
PROMPT_WORDS = (
    "describe what is shown in the image and answer with the option's letter from the given choices "
    "which color is the big shape on the left of the picture a photo of a cat dog car tree house"
).split()


def preset_config(preset: str, tokenizer):
    """LlavaConfig of a preset; builds no weights. The tokenizer fixes the special-token ids."""

    if preset == "tiny":
        return tiny_llava_config(tokenizer)
    if preset in QWEN_PRESETS:
        return qwen_preset_config(preset, tokenizer)
    vit_l = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    mid_text = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, vocab_size=len(tokenizer))
    if preset in ("mid", "next-mid"):
        vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, projection_dim=384)
        text = mid_text
    elif preset == "vit-l":  # the real CLIP ViT-L/14-336 tower in front of the mid LLM: vision timings on CPU
        vision, text = vit_l, mid_text
    elif preset in ("llava-1.5-7b", "llava-next-7b"):
        vision = vit_l
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, rms_norm_eps=1e-5)
    else:
        raise ValueError(f"unknown preset {preset!r}: use one of {PRESETS}")
    common = dict(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **vision),
        text_config=LlamaConfig(
            max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **text,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
    )
    if preset in NEXT_PRESETS:
        return LlavaNextConfig(image_grid_pinpoints=NEXT_PINPOINTS, **common)
    return LlavaConfig(**common)


def qwen_preset_config(preset: str, tokenizer):
    """qwen2.5-vl-7b: Qwen/Qwen2.5-VL-7B-Instruct's shape (`hybrid_vlm.qwen_flops.QWEN25_VL_7B`); qwen-mid:
    a CPU-sized one with the same layout (GQA, windowed ViT with full blocks, 2 x 2 merger)."""
    from transformers import Qwen2_5_VLConfig

    from hybrid_vlm.tiny_qwen import tiny_qwen_config

    ids = tiny_qwen_config(tokenizer).to_dict()
    ids = {key: ids[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    if preset == "qwen2.5-vl-7b":
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    vocab_size=152064, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31])
    else:
        text = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=2,
                    vocab_size=len(tokenizer), rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
        vision = dict(depth=8, hidden_size=384, intermediate_size=1024, num_heads=6, out_hidden_size=1024, fullatt_block_indexes=[3, 7])
    text.update(max_position_embeddings=32768, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision.update(window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def model_type_of(preset: str, model: str | None = None) -> str | None:
    """The config model_type the bench will build (`runtime.resolve_dtype` picks "auto" by it): that
    of the --model checkpoint (a folder or a cached hub id; None if its config does not read), else
    the preset's."""
    if model:
        try:
            return AutoConfig.from_pretrained(model).model_type
        except (OSError, ValueError):
            return None  # from_pretrained will say what is wrong with it
    return "qwen2_5_vl" if preset in QWEN_PRESETS else "llava_next" if preset in NEXT_PRESETS else "llava"


def bench_shape(config):
    """The MACs model's shape of a benchmarked model (`hybrid_vlm.flops` or `hybrid_vlm.qwen_flops`)."""
    return qwen_shape_from_config(config) if config.model_type == "qwen2_5_vl" else flops.shape_from_config(config)


def build_model(args, device, dtype):
    """(model, processor) in eval mode on `device`; random weights unless --model."""
    if args.model:
        processor = AutoProcessor.from_pretrained(args.model)
        model = load_supported_model(args.model, dtype=dtype, attn_implementation="sdpa", device_map={"": device})
        return model.eval(), processor
    if args.preset == "tiny":
        model, processor = build_tiny_llava(seed=args.seed)
        return model.to(device=device, dtype=dtype).eval(), processor
    if args.preset in QWEN_PRESETS:
        processor = build_qwen_processor()
    else:
        processor = build_next_processor(pinpoints=NEXT_PINPOINTS) if args.preset in NEXT_PRESETS else build_processor()
    config = preset_config(args.preset, processor.tokenizer)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), processor


def bench_image(processor, seed: int):
    """The synthetic image the bench times for this processor's model, at its family's bench size;
    DyMU's thresholds for the bench are calibrated on the same size (`bench.calibrate_for_bench`)."""
    image = synthetic_image(seed)
    if hasattr(processor.image_processor, "image_grid_pinpoints"):
        return image.resize(NEXT_IMAGE_SIZE)  # LLaVA-NeXT: a typical 4:3 photo
    if hasattr(processor.image_processor, "merge_size"):
        return image.resize(QWEN_IMAGE_SIZE)  # Qwen2.5-VL: 1,280 tokens
    return image


def build_inputs(processor, text_tokens: int, batch_size: int, image_seed: int):
    """Processor inputs, on the CPU, for `batch_size` copies of one synthetic image + a prompt whose
    non-image tokens number `text_tokens` (or just above: words are added until the count is
    reached). `hybrid_vlm.inputs_for(model, inputs)` places them for a stock or patched model."""

    image = bench_image(processor, image_seed)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def encode(words: int):
        text = " ".join(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(words))
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[image] * batch_size, text=[prompt] * batch_size, return_tensors="pt")
        return inputs, int((inputs["input_ids"][0] != image_id).sum())

    words = 0
    inputs, count = encode(words)
    while count < text_tokens:
        words += max(1, (text_tokens - count) // 2)
        inputs, count = encode(words)
    return dict(inputs), count
