"""HybridQwen2VL: Qwen2.5-VL for VLMEvalKit, stock or patched, as VLMEvalKit's `Qwen2VLChat` runs it.

What is the same as upstream's transformers path (vlmeval/vlm/qwen2_vl/model.py, Qwen2VLChat with
the Qwen2.5-VL entries of vlmeval/config.py):
- the dataset's own prompts (those entries set use_custom_prompt=False; the wrapper still builds
  every image prompt itself, through the dataset's `build_prompt`, to know each row's index);
- the message as upstream's `_prepare_content` writes it: images as `file://` items with min_pixels
  1280*28*28 and max_pixels 16384*28*28 (OCRBench: min 10*10*28*28), text items in order; no
  system message, so the chat template adds its default one;
- `processor.apply_chat_template(..., add_generation_prompt=True)`, then qwen_vl_utils'
  `process_vision_info` (its own smart_resize) and the processor;
- greedy decoding (upstream samples with top_k=1 and top_p=0.001: greedy up to exact ties for the
  top logit, which it breaks by its sort order and this by the lower id), max_new_tokens 2048.
Video sets are refused for these names (`cli.video_problem`): upstream reads a clip as a video.

What differs: it runs on CPU and on GPU with SDPA (upstream asserts a GPU and loads flash-attention
2), batches rows (`--batch-size`), keeps `image_grid_thw` on the host, and records per-row stats.
As for every name of this plugin, a prediction is stored without leading or trailing whitespace
(upstream stores Qwen's decoded text as it is), and an MCQ row without a question or options A and
B is a failed row naming the field, where upstream would prompt it.
"""

from __future__ import annotations

from hybrid_vlm.config import HybridConfig

from .model import HybridLLaVA

MIN_PIXELS, MAX_PIXELS = 1280 * 28 * 28, 16384 * 28 * 28  # VLMEvalKit's Qwen2.5-VL-7B-Instruct entry
OCRBENCH_MIN_PIXELS = 10 * 10 * 28 * 28


def image_item(path: str, dataset: str | None, min_pixels: int, max_pixels: int) -> dict:
    """One image of upstream's `_prepare_content`."""
    url = path if path.startswith(("http://", "https://", "file://", "data:image;")) else "file://" + path
    return {"type": "image", "image": url, "min_pixels": OCRBENCH_MIN_PIXELS if dataset == "OCRBench" else min_pixels,
            "max_pixels": max_pixels}


def qwen_content(message: list[dict], dataset: str | None, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> list[dict]:
    """Upstream's `_prepare_content` for images and text (videos and audio are not supported here)."""
    content = []
    for item in message:
        if item["type"] == "image":
            content.append(image_item(item["value"], dataset, min_pixels, max_pixels))
        elif item["type"] == "text":
            content.append({"type": "text", "text": item["value"]})
        else:
            raise ValueError(f"message item of type {item['type']!r}: this Qwen2.5-VL wrapper takes images and text")
    return content


class HybridQwen2VL(HybridLLaVA):
    """Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) for VLMEvalKit; see the module docstring."""

    MODEL_CLASS = "Qwen2_5_VLForConditionalGeneration"
    # the checkpoint's own dtype (bfloat16 for the released weights), as VLMEvalKit's Qwen2VLChat loads
    # it: in float16 Qwen2.5-VL's activations can overflow
    CUDA_DTYPE = "auto"

    def __init__(self, checkpoint: str, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, use_vllm: bool = False, **kwargs):
        # VLMEvalKit's infer_data passes use_vllm (its --use-vllm flag) to every name containing "Qwen2.5-VL"
        if use_vllm:
            raise ValueError("--use-vllm is not supported by the hybrid-vlm Qwen2.5-VL names: they run the transformers engine")
        super().__init__(checkpoint, **kwargs)
        # Qwen2VLChat passes repetition_penalty=1.0; without it generate applies the checkpoint's own
        # even greedily (the Instruct releases ship 1.05, as we recall them: not readable offline).
        self.generate_kwargs = {"repetition_penalty": 1.0, **self.generate_kwargs}
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self._dataset = None

    def generate_inner(self, message, dataset=None):
        # A call that was not prompted through build_prompt (VLMEvalKit's frames-as-images video
        # path, a direct call) must not resize with the last prompted dataset's pixel bounds.
        self._dataset = dataset
        return super().generate_inner(message, dataset)

    def use_custom_prompt(self, dataset):
        return self._dataset_object(dataset) is not None and super().use_custom_prompt(dataset)

    def _message_for(self, line, dataset):
        self._dataset = dataset
        return self._dataset_object(dataset).build_prompt(line)  # the dataset's prompt, as upstream gets it

    def _row_images(self, host_layouts: dict, batch: int) -> list:
        """Per row, its images' (t, h, w) grids, from the host copy of image_grid_thw."""
        from hybrid_vlm.qwen import sample_grids

        grid = host_layouts.get("image_grid_thw")
        return [[] for _ in range(batch)] if grid is None else sample_grids(grid, batch)

    def _prefill_gmacs(self, text_tokens: int, entered: int, kept: int, images=None) -> float | None:
        """Theoretical prefill GMACs of one row (`qwen_flops.qwen_method_prefill_macs`: windowed tower,
        merger, the method's scoring, the LLM); None for PyramidDrop and DART, whose per-layer counts
        follow each image and are not recorded per row."""
        from hybrid_vlm.qwen_flops import qwen_method_prefill_macs, qwen_shape_from_config

        config = self.hybrid or HybridConfig()
        if config.staged_method is not None:
            return None
        macs = qwen_method_prefill_macs(qwen_shape_from_config(self.model.config), config, images, text_tokens, int(entered), int(kept))
        return round(macs.total / 1e9, 4)

    def processor_inputs(self, messages: list[list[dict]]):
        from qwen_vl_utils import process_vision_info

        conversations = [[{"role": "user", "content": qwen_content(m, self._dataset, self.min_pixels, self.max_pixels)}] for m in messages]
        texts = [self.processor.apply_chat_template([c], tokenize=False, add_generation_prompt=True)[0] for c in conversations]
        images, _ = process_vision_info(conversations)
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt")
