"""A tiny Qwen2.5-VL built offline: the real Qwen2_5_VLForConditionalGeneration layout, processor and
chat template, toy widths, random weights.

What it keeps from Qwen/Qwen2.5-VL-7B-Instruct: 14 px patches in 2x2 merge units, 112 px windows
with full-attention blocks between windowed ones, M-RoPE with (t, h, w) sections, q/k/v biases,
grouped KV heads, the image pixel range (`min_pixels` / `max_pixels`) and the ChatML template with
its default system message. Widths and depths are toy-sized. Linear weights are drawn with a large
gain (as for the tiny LLaVA) so attention is peaked and greedy decoding is not constant. The
tokenizer is a byte-level BPE trained here on a built-in corpus.

    python -m hybrid_vlm.tiny_qwen --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .tiny import _CORPUS_WORDS, _save_once, default_cache_dir, scale_weights

TINY_QWEN_VERSION = "v2"  # v2: the checkpoint's pixel range (v1 held VLMEvalKit's)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL-Instruct's template, images and text only (videos are refused by the engine)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' or 'image' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json: 4 to 16384 LLM tokens per image. VLMEvalKit's
# wrapper narrows the range per image before the processor sees it (1280 at least; 100 on OCRBench),
# so a processor holding VLMEvalKit's range instead resized OCRBench's images a second time.
MIN_PIXELS, MAX_PIXELS = 3136, 12845056


def build_qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    words = [*_CORPUS_WORDS, "system", "user", "assistant", "You", "are", "helpful", "Please", "select", "correct", "above"]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def build_qwen_processor(tokenizer=None, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer if tokenizer is not None else build_qwen_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen_config(tokenizer, text_layers: int = 4, text_hidden: int = 64, vision_depth: int = 4):
    from transformers import Qwen2_5_VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    )}
    head_dim = text_hidden // 4
    sections = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]  # 7B: 16/24/24 of 64
    text = dict(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_hidden,
        fullatt_block_indexes=list(range(1, vision_depth, 2)), window_size=112, tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def build_tiny_qwen(seed: int = 0, attn_implementation: str = "sdpa", min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                    **config_overrides):
    """(model, processor): a tiny Qwen2_5_VLForConditionalGeneration in eval mode, float32, on CPU."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = build_qwen_processor(min_pixels=min_pixels, max_pixels=max_pixels)
    config = tiny_qwen_config(processor.tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    scale_weights(model, seed=seed)
    model.set_attn_implementation(attn_implementation)
    return model.eval(), processor


def ensure_tiny_qwen(path: str | Path | None = None) -> Path:
    """Save the tiny Qwen2.5-VL (and its processor) once with save_pretrained; return the directory."""
    path = Path(path) if path is not None else default_cache_dir() / f"tiny-qwen2.5-vl-{TINY_QWEN_VERSION}"
    return _save_once(path, build_tiny_qwen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory (default: the hybrid_vlm cache)")
    print(ensure_tiny_qwen(parser.parse_args().out))


if __name__ == "__main__":
    main()
