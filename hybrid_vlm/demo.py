"""One image question answered by vanilla LLaVA and by the FastV engine, on the bundled tiny model.

    python -m hybrid_vlm.demo [--model DIR] [--fastv-k 64]

The tiny model has random weights: its answers are noise. What the demo shows is the mechanics:
the same loading path as a real checkpoint, tokens entering the LLM, tokens kept, prefill time.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from . import HybridConfig, apply_hybrid
from .config import parse_fastv_k
from .hf_compat import output_cache
from .tiny import ensure_tiny_llava, synthetic_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a llava-hf checkpoint dir (default: the bundled tiny model)")
    parser.add_argument("--fastv-k", default="64", help="FASTV_K: int n keeps n visual tokens, 0.7 prunes 70%%")
    parser.add_argument("--question", default="What is shown in the image?")
    args = parser.parse_args()

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = args.model or ensure_tiny_llava()
    vanilla = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    hybrid = apply_hybrid(copy.deepcopy(vanilla), HybridConfig(fastv_k=parse_fastv_k(args.fastv_k)))

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[synthetic_image(0)], text=[prompt], return_tensors="pt")
    print(f"model: {path}\nprompt: {prompt!r} ({inputs['input_ids'].shape[1]} tokens with 576 image tokens)")
    for name, model in (("vanilla", vanilla), (f"hybrid {hybrid.hybrid_config.describe()}", hybrid)):
        with torch.inference_mode():
            model(**inputs)  # warm-up
            start = time.perf_counter()
            model(**inputs)
            prefill_ms = (time.perf_counter() - start) * 1e3
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
        state = getattr(output_cache(out), "hybrid_state", None)
        tokens_in = inputs["attention_mask"].sum().item()
        tokens_kept = state.prompt_tokens_kept.item() if state is not None else tokens_in
        answer = processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{name:>28}: tokens in {tokens_in}, kept {tokens_kept}, prefill {prefill_ms:.1f} ms, answer {answer!r}")


if __name__ == "__main__":
    main()
