"""A tiny LLaVA-1.5 built offline: real llava-hf layout and processor, toy sizes, random weights.

It has LLaVA-1.5's geometry where it matters (336 px images, 14 px patches, 576 visual tokens,
vision_feature_layer -2, "default" feature selection) and toy widths everywhere else. Linear
weights are drawn with a large gain so attention is peaked and greedy decoding is not constant,
which tests of pruning and caching need. The tokenizer is a byte-level BPE trained here on a
built-in corpus. Nothing is downloaded; `ensure_tiny_llava()` saves it with `save_pretrained`
so everything downstream exercises the real `from_pretrained` path.

    python -m hybrid_vlm.tiny --out DIR     # the model, its processor, and DyMU thresholds (mid)
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_VERSION = "v1"
# Bumped whenever calibration changes what a threshold file holds, so a cached file from an older
# calibration is never picked up. v2: DyMU's official split and schedule mapping; v3: the weight
# signature, without which a float16 load is refused; v4: fingerprint and signature cover every
# weight of the read layers.
TINY_THRESHOLDS_VERSION = "v4"
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS_WORDS = (
    "what is shown in the image answer with the option's letter from the given choices directly "
    "describe this picture briefly a photo of cat dog car tree house person red green blue yellow "
    "black white big small left right top bottom center one two three many there are is the of on "
    "question hint options A B C D which color shape circle square triangle background sky water "
    "USER ASSISTANT please provide short caption for it"
).split()


def default_cache_dir() -> Path:
    return Path(os.environ.get("HYBRID_VLM_CACHE", Path.home() / ".cache" / "hybrid_vlm"))


def build_tokenizer():
    """Byte-level BPE trained on a built-in corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(_CORPUS_WORDS, size=12)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    fast.add_bos_token = True
    return fast


# CLIP ViT-L/14-336's preprocessing, as both llava-hf processors configure it
CLIP_IMAGE_SETTINGS = dict(
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)


def processor_settings(tokenizer) -> dict:
    """What a LlavaProcessor and a LlavaNextProcessor share: tokenizer, 14 px patches, CLS dropped,
    the chat template ("USER: <image>\n... ASSISTANT:", llava-1.5's and llava-v1.6-vicuna's)."""
    return dict(
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer=None):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(do_center_crop=True, **CLIP_IMAGE_SETTINGS)
    return LlavaProcessor(image_processor=image_processor, **processor_settings(tokenizer))


def tiny_llava_config(tokenizer, text_layers: int = 4, kv_heads: int = 4, vision_layers: int = 3, text_hidden: int = 128):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=336, patch_size=14, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
    )


@torch.no_grad()
def scale_weights(model: torch.nn.Module, gain: float = 3.0, seed: int = 0) -> None:
    """Redraw linear weights as N(0, gain^2 / fan_in) and embeddings as N(0, 1): peaked attention."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            std = gain / math.sqrt(module.in_features)
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
        elif isinstance(module, torch.nn.Embedding):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator))


def build_tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", **config_overrides):
    """(model, processor): a tiny LlavaForConditionalGeneration in eval mode, float32, on CPU."""
    from transformers import LlavaForConditionalGeneration

    processor = build_processor()
    config = tiny_llava_config(processor.tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    scale_weights(model, seed=seed)
    model.set_attn_implementation(attn_implementation)  # public API: dispatches to the text and vision configs
    return model.eval(), processor


def tiny_llava_dir() -> Path:
    """Where `ensure_tiny_llava` saves the tiny model by default (built or not)."""
    return default_cache_dir() / f"tiny-llava-{TINY_VERSION}"


def ensure_tiny_llava(path: str | Path | None = None) -> Path:
    """Save the tiny model (and its processor) once with save_pretrained; return the directory."""
    return _save_once(Path(path) if path is not None else tiny_llava_dir(), build_tiny_llava)


# Small anyres grids of 336 px crops: a base image plus 2 crops (1:2 and 2:1) or 4 (square).
TINY_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672]]


def build_next_processor(tokenizer=None, pinpoints=None):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(image_grid_pinpoints=pinpoints or TINY_NEXT_PINPOINTS, **CLIP_IMAGE_SETTINGS)
    return LlavaNextProcessor(image_processor=image_processor, **processor_settings(tokenizer))


def build_tiny_llava_next(
    seed: int = 0, attn_implementation: str = "sdpa", text_model: str = "llama", sliding_window: int | None = None, **config_overrides
):
    """(model, processor): a tiny LlavaNextForConditionalGeneration (anyres, TINY_NEXT_PINPOINTS),
    the same toy widths as the tiny LLaVA-1.5, eval mode, float32, on CPU. text_model "mistral"
    gives a Mistral LLM (llava-v1.6-mistral's layout) with `sliding_window`."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    from .hf_compat.llava_next import image_newline

    processor = build_next_processor()
    base = tiny_llava_config(processor.tokenizer, **config_overrides)
    text_config = base.text_config
    if text_model == "mistral":
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
        text_config = MistralConfig(**{name: getattr(text_config, name) for name in fields}, sliding_window=sliding_window)
    config = LlavaNextConfig(
        vision_config=base.vision_config, text_config=text_config, image_token_index=base.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=TINY_NEXT_PINPOINTS,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    scale_weights(model, seed=seed)
    with torch.no_grad():
        image_newline(model).normal_(generator=torch.Generator().manual_seed(seed))
    model.set_attn_implementation(attn_implementation)
    return model.eval(), processor


def ensure_tiny_llava_next(path: str | Path | None = None) -> Path:
    """Save the tiny LLaVA-NeXT (and its processor) once with save_pretrained; return the directory."""
    path = Path(path) if path is not None else default_cache_dir() / f"tiny-llava-next-{TINY_VERSION}"
    return _save_once(path, build_tiny_llava_next)


def _save_once(path: Path, build) -> Path:
    if (path / "config.json").exists() and (path / "processor_config.json").exists():
        return path
    model, processor = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    try:  # atomic: torchrun ranks may race to create it
        staging.rename(path)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return path


def tiny_thresholds_path(model_dir: Path, target: str = "mid", split: str = "official") -> Path:
    """Where the tiny model's cached thresholds live: versioned folder, stable file name (the file
    name is what a setting's tag shows, e.g. `dymu-tiny-mid`)."""
    return model_dir / f"dymu-thresholds-{TINY_THRESHOLDS_VERSION}-{split}" / f"tiny-{target}.json"


def ensure_tiny_thresholds(model_dir: str | Path | None = None, target: str = "mid", split: str = "official") -> Path:
    """Calibrate DyMU thresholds for the tiny model once (16 synthetic images) and return the file.

    The same calibration as `python -m hybrid_vlm.calibrate`, without image files on disk.
    """
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from .calibrate import calibrate_thresholds, count_summary, measure_token_counts, write_threshold_file
    from .hf_compat.loading import NO_HUB_KERNELS

    model_dir = ensure_tiny_llava(model_dir)
    path = tiny_thresholds_path(model_dir, target, split)
    if path.exists():
        return path
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, **NO_HUB_KERNELS).eval()
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    pixel_values = image_processor([synthetic_image(seed) for seed in range(1000, 1016)], return_tensors="pt").pixel_values
    payload = calibrate_thresholds(model, [pixel_values], target, split=split, progress=False)
    thresholds = torch.tensor(payload["thresholds"], dtype=torch.float32)
    payload["achieved"] = count_summary(measure_token_counts(model, [pixel_values], thresholds, progress=False, split=split))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    write_threshold_file(staging, payload)
    os.replace(staging, path)  # atomic, as above
    return path


def synthetic_image(seed: int, size: int = 336) -> Image.Image:
    """A deterministic picture of a few coloured shapes on a gradient: varied content, no download."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, 3)
    pixels = np.stack([base[c] * (0.5 + 0.5 * (x if c % 2 else y)) for c in range(3)], axis=-1)
    for _ in range(rng.integers(2, 6)):
        cx, cy, radius = rng.uniform(0.1, 0.9, 2).tolist() + [rng.uniform(0.05, 0.3)]
        inside = (x - cx) ** 2 + (y - cy) ** 2 < radius**2 if rng.random() < 0.5 else (
            (abs(x - cx) < radius) & (abs(y - cy) < radius)
        )
        pixels[inside] = rng.uniform(0, 255, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory (default: the hybrid_vlm cache)")
    path = ensure_tiny_llava(parser.parse_args().out)
    print(path, ensure_tiny_thresholds(path), sep="\n")


if __name__ == "__main__":
    main()
