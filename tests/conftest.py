"""Shared fixtures: tiny LLaVA models built offline and prompts from the real LlavaProcessor."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.tiny import build_tiny_llava, synthetic_image


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per CPU this process may use, at most 8 (each builds its own tiny models).
    xdist's own count is physical cores, which is 1 on a 2-vCPU machine that shares one core's
    two threads: the suite would then run in one process."""
    return max(1, min(8, usable_cpus()))


# Under pytest-xdist the workers share the cores: each gets its slice, and so do the run.py
# processes its tests start (they read OMP_NUM_THREADS), instead of every process spinning a thread
# per core.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

QUESTIONS = [
    "What is shown in the image?",
    "Describe this picture briefly, which color is on the left?",
    "Which shape is in the center?",
]


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): the tiny LLaVA, unpatched. Tests patch deep copies."""
    torch.manual_seed(0)
    return build_tiny_llava()


@pytest.fixture(scope="session")
def tiny_gqa():
    """The tiny LLaVA with grouped-query attention (4 query heads, 2 KV heads)."""
    return build_tiny_llava(seed=1, kv_heads=2)


def hybrid_copy(model, **settings):
    return apply_hybrid(copy.deepcopy(model), HybridConfig(**settings))


def chat_prompt(processor, question: str, with_image: bool = True) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def image_inputs(processor, questions=QUESTIONS[:1], seeds=None):
    """Left-padded batch straight from the processor: one synthetic image per prompt."""
    seeds = list(range(len(questions))) if seeds is None else seeds
    prompts = [chat_prompt(processor, q) for q in questions]
    images = [synthetic_image(s) for s in seeds]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate() makes them: cumsum of the mask, padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def assert_batched_generation_equals_each_alone(hybrid, processor, new_tokens: int) -> None:
    """Greedy tokens of the left-padded batch of QUESTIONS equal each prompt generated alone."""
    batch_inputs = image_inputs(processor, QUESTIONS)
    assert (batch_inputs["attention_mask"] == 0).any(), "the batch must exercise left padding"
    with torch.no_grad():
        batched = hybrid.generate(**batch_inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        for i, question in enumerate(QUESTIONS):
            alone = hybrid.generate(**image_inputs(processor, [question], seeds=[i]), max_new_tokens=new_tokens,
                                    do_sample=False, min_new_tokens=new_tokens)
            assert torch.equal(batched[i, -new_tokens:], alone[0, -new_tokens:])


DEEP_LAYERS = 16  # deep enough for the three stages of PyramidDrop and SparseVLM at 64 tokens


@pytest.fixture(scope="session")
def deep():
    """(model, processor): the tiny LLaVA with a 16-layer LLM, unpatched (methods inside the LLM)."""
    return build_tiny_llava(text_layers=DEEP_LAYERS)


@pytest.fixture(scope="session")
def deep64(deep):
    """The same in float64, so near-ties cannot flip a kept set against a reference."""
    model, processor = deep
    return copy.deepcopy(model).double(), processor


# LLaVA-NeXT: images of different aspect ratios give different packed counts (1560, 1776, 1176 on
# the tiny model's pinpoints).
NEXT_SIZES = [(336, 200), (250, 500), (336, 336)]  # (width, height)


@pytest.fixture(scope="session")
def tiny_next():
    """(model, processor): the tiny LLaVA-NeXT, unpatched."""
    from hybrid_vlm.tiny import build_tiny_llava_next

    return build_tiny_llava_next()


def next_inputs(processor, questions=QUESTIONS[:1], indices=None):
    """Left-padded LLaVA-NeXT batch: prompt i gets synthetic image i at NEXT_SIZES[i]."""
    indices = list(range(len(questions))) if indices is None else indices
    images = [synthetic_image(i).resize(NEXT_SIZES[i]) for i in indices]
    prompts = [chat_prompt(processor, q) for q in questions]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


# Qwen2.5-VL: image sizes whose grids differ per sample (12x18 and its transpose 18x12 hold the same
# 54 tokens with different ids; 18x8 holds 36), under a small pixel cap so the tiny tower is fast.
QWEN_SIZES = [(300, 200), (200, 300), (120, 250)]
QWEN_PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)


@pytest.fixture(scope="session")
def tiny_qwen():
    """(model, processor): the tiny Qwen2.5-VL, unpatched."""
    from hybrid_vlm.tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(**QWEN_PIXELS)


def qwen_inputs(processor, questions=QUESTIONS[:1], indices=None, sizes=QWEN_SIZES):
    """Left-padded Qwen2.5-VL batch: prompt i gets synthetic image i at sizes[i]."""
    indices = list(range(len(questions))) if indices is None else indices
    images = [synthetic_image(i).resize(sizes[i]) for i in indices]
    prompts = [chat_prompt(processor, q) for q in questions]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def qwen_two_image_inputs(processor):
    """A left-padded Qwen2.5-VL batch of two prompts with two images each (four grids: 54, 36, 54
    and 36 units), the second prompt longer by one word."""
    content = [{"type": "image"}, {"type": "text", "text": "left"}, {"type": "image"}, {"type": "text", "text": "which color?"}]
    images = [synthetic_image(i).resize(size) for i, size in enumerate([(300, 200), (120, 250), (200, 300), (250, 120)])]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=images, text=[prompt, prompt.replace("left", "left one")], return_tensors="pt", padding=True)
