"""The testbed: a small LLaVA-1.5-shaped model trained here on generated scenes, so that accuracy
against tokens kept means something on a laptop.

LLaVA-1.5's geometry where the methods act: a CLIP-layout ViT at 336 px with 14 px patches (576
patches + CLS, features from the second-to-last of 6 layers), a 2-layer GELU MLP projector, an
8-layer Llama with RoPE, the LLaVA-1.5 conversation, its own byte-level BPE tokenizer. It is a
stock `LlavaForConditionalGeneration`; the trained weights ship in `checkpoint/` (its README.md is the card).

    python -m hybrid_vlm.testbed train --out DIR        # train from scratch (seeded; about 55 min on 2 idle CPU cores: the shipped run took 54.2)
    python -m hybrid_vlm.testbed calibrate               # DyMU thresholds low/mid/high for the shipped weights
    python -m hybrid_vlm.testbed card                    # its card, from the committed log, thresholds and report
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
THRESHOLDS_DIR = CHECKPOINT_DIR / "dymu-thresholds"
VOCAB_SIZE = 640
TOKENIZER_SCENES = 3000


def _tokenizer_corpus() -> list[str]:
    from . import scenes
    from .prompts import CAPTION_PROMPT, conversation
    from .train import DIRECT_INSTRUCTION

    lines = [conversation(CAPTION_PROMPT)] * 100 + [conversation(DIRECT_INSTRUCTION)] * 100
    for index in range(TOKENIZER_SCENES):
        lines += [conversation(text) + target if text else target for text, target, _ in _text_segments(index)]
    lines += [" ".join(words) for words in (scenes.COLOURS, scenes.SHAPES, scenes.SIZES, scenes.BACKGROUNDS, scenes.NUMBER_WORDS)]
    return lines


def _text_segments(index: int):
    """The text of training scene `index` without rendering it (the tokenizer needs words only)."""
    from . import scenes
    from .prompts import LETTERS, mcq_text

    scene, rng = scenes.scene_for(scenes.TRAIN_STREAM, index)
    segments = []
    for kind in scenes.QUESTION_KINDS:
        question = scenes.ask(scene, kind, rng)
        if question is not None:
            segments.append((mcq_text(question.question, question.options), LETTERS[question.answer], 1.0))
    segments += [("", caption, 1.0) for caption in scenes.captions(scene)]
    return segments


def option_lines() -> list[str]:
    """Every option line a testbed MCQ can show, as the plugin writes it ("B. red")."""
    from . import scenes
    from .prompts import LETTERS

    return [f"{letter}. {value}" for letter in LETTERS for value in scenes.ANSWERS]


def add_option_tokens(tokenizer) -> None:
    """Each of `option_lines()` one added token, unnormalised (a `tokenizers.Tokenizer` or a fast HF tokenizer)."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(line, normalized=False) for line in option_lines()])


def build_tokenizer(option_tokens: bool = False):
    """Byte-level BPE (any text encodes) trained on the testbed's prompts, questions and captions.

    With `option_tokens`, each of `option_lines()` is also one added token, so that an MCQ's answer
    could be matched to its letter by one attention lookup instead of a copy across "B", "." and
    " red". Off by default and in the shipped tokenizer: on run6's weights it made the letters worse
    (reports/testbed-attempts/README.md)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..tiny import IMAGE_TOKEN

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer)
    if option_tokens:
        add_option_tokens(tokenizer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
    )
    fast.add_bos_token = True
    return fast


def testbed_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from ..tiny import IMAGE_TOKEN

    vision = CLIPVisionConfig(
        hidden_size=96, intermediate_size=384, num_hidden_layers=6, num_attention_heads=3,
        image_size=336, patch_size=14, projection_dim=96,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
        projector_hidden_act="gelu",
    )


def build_untrained(seed: int = 0, option_tokens: bool = False):
    """(model, processor): the testbed architecture with transformers' default initialisation."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from ..tiny import build_processor

    processor = build_processor(build_tokenizer(option_tokens))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(testbed_config(processor.tokenizer))
    model.set_attn_implementation("sdpa")
    return model, processor


def load_for_training(path, seed: int = 0):
    """(model, processor) of a saved testbed, fp32 with SDPA and torch seeded, to continue training it."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..hf_compat.loading import NO_HUB_KERNELS

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, **NO_HUB_KERNELS)
    model.set_attn_implementation("sdpa")
    return model, AutoProcessor.from_pretrained(path)


def testbed_checkpoint() -> Path:
    """The shipped checkpoint directory; a clear error if it is missing."""
    if not (CHECKPOINT_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the testbed checkpoint is missing from {CHECKPOINT_DIR} "
            "(it ships with the repository: restore it with `git checkout -- hybrid_vlm/testbed/checkpoint`), or make one with "
            "`python -m hybrid_vlm.testbed train --out DIR` and copy DIR there"
        )
    return CHECKPOINT_DIR
