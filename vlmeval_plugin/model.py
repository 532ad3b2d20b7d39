"""HybridLLaVA: a VLMEvalKit BaseModel around the llava-hf LLaVA-1.5 and the hybrid_vlm engine.

Prompts match VLMEvalKit's own LLaVA wrapper (vlmeval/vlm/llava/llava.py, class LLaVA): for MCQ
sets the hint, question, lettered options and "Answer with the option's letter from the given
choices directly."; every other set uses the dataset's default prompt (COCO: "Please describe this
image in general. ..."); the conversation is
    "<system> USER: <content, ' <image> ' per image> ASSISTANT: "
and images are padded to a square with the processor's mean colour ("pad" aspect ratio), greedy.

Why the wrapper builds every image prompt itself (use_custom_prompt is True for all image sets):
`build_prompt` receives the dataset row, so each generate call knows its row index. That index keys
the per-row statistics (vlmeval_plugin.stats), lets an interrupted run answer finished rows from
them instead of generating again, and lets `batch_size > 1` look ahead in VLMEvalKit's row order.

Batching: VLMEvalKit 0.0.20 has no batch API: its loop (vlmeval.inference.infer_data) calls
generate() once per row, in a fixed order (rows rank, rank + world_size, ...). With batch_size B the
wrapper answers a call for row r by generating r and the next B - 1 unfinished rows of this rank's
share in one left-padded `model.generate`, records them all, and serves the following calls from
those records. Rows in one batch have the same number of images. Predictions and the loop are
VLMEvalKit's; only the grouping of the forward passes changes (prefill_s is then per batch).

Failures stay with their rows: a row whose prompt cannot be built (bad image, unusable text; see
vlmeval_plugin.robust) is answered with VLMEvalKit's failure marker and an "error" stats record; a
generate call that raises is retried on halves of its batch down to single rows, and only a single
row that still raises fails. Failed records are not reused, so a rerun generates those rows again.
"""

from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path

import torch
from PIL import Image
from vlmeval.dataset import DATASET_TYPE
from vlmeval.smp import cn_string, get_rank_and_world_size
from vlmeval.vlm.base import BaseModel

from hybrid_vlm import HybridConfig, apply_hybrid, flops, inputs_for
from hybrid_vlm.adapters import anyres_images
from hybrid_vlm.hf_compat import output_cache
from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from hybrid_vlm.images import expand_to_square, mean_colour
from hybrid_vlm.model import IMAGE_LAYOUTS, VisualCounts
from hybrid_vlm.runtime import resolve_device, resolve_dtype

from . import stats
from .robust import RowError, image_file_problem, image_type_problem, is_blank, storable_prediction

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
)


FAILED_ROW_TEXT = "(hybrid-vlm: this row failed before generation)"


def failure_marker(reason: str) -> str:
    """The prediction of a failed row: VLMEvalKit's INFER_FAIL_MSG, so infer_fail_rate counts it."""
    from vlmeval.smp.file import INFER_FAIL_MSG

    return f"{INFER_FAIL_MSG}: {reason}"


def row_error_text(error: Exception) -> str:
    if isinstance(error, RowError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def check_text_fields(line, dataset_type: str) -> None:
    """MCQ rows need a question, and options A and B where the set keeps its options in letter
    columns, to make a prompt. A set that keeps them elsewhere (an `options` column, as some upstream
    MCQ sets do) is prompted as upstream prompts it, its question alone (LLaVA) or its dataset's own
    prompt (Qwen2.5-VL). `dataset_type` is the running dataset's own TYPE: a custom TSV without
    options is a VQA set there, though VLMEvalKit's DATASET_TYPE calls every custom name without
    "openended" MCQ."""
    if dataset_type != "MCQ":
        return
    needed = ("question", "A", "B") if "A" in line else ("question",)
    unusable = [name for name in needed if name not in line or is_blank(line[name])]
    if unusable:
        raise RowError(f"unusable text field(s) {', '.join(unusable)}: an MCQ row needs a question"
                       + (" and options A and B" if "A" in line else ""))


def llava_mcq_prompt(line) -> str:
    """VLMEvalKit LLaVA.build_prompt's text: hint, question, options, answer instruction."""
    import string

    import pandas as pd

    question = line["question"]
    hint = line["hint"] if ("hint" in line and not pd.isna(line["hint"])) else None
    if hint is not None:
        question = hint + "\n" + question
    options = {
        letter: line[letter] for letter in string.ascii_uppercase if letter in line and not pd.isna(line[letter])
    }
    for letter, text in options.items():
        question += f"\n{letter}. {text}"
    prompt = question
    if len(options):
        prompt += (
            "\n请直接回答选项字母。" if cn_string(prompt) else "\nAnswer with the option's letter from the given choices directly."
        )
    else:
        prompt += "\n请直接回答问题。" if cn_string(prompt) else "\nAnswer the question directly."
    return prompt


def weak_hook(owner, method: str):
    """A module hook that calls `owner.<method>` without keeping `owner` alive. A bound method would
    make model -> hook -> wrapper -> model a cycle that only a full garbage collection frees, and
    VLMEvalKit drops one model before it builds the next (a 7B model would stay on the GPU)."""
    owner_ref = weakref.ref(owner)

    def hook(*args):
        alive = owner_ref()
        return None if alive is None else getattr(alive, method)(*args)

    return hook


class HybridLLaVA(BaseModel):
    """LLaVA-1.5 (llava-hf layout) for VLMEvalKit, stock or patched with hybrid_vlm.apply_hybrid.

    checkpoint: local directory of a llava-hf checkpoint (vlmeval_plugin.settings.resolve_checkpoint).
    hybrid: None = the stock model, nothing patched; else the HybridConfig given to apply_hybrid.
    stats_dir / model_name: where the per-row stats sidecar goes (<stats_dir>/<model_name>_<dataset>_stats.jsonl);
        None = keep records in memory only.
    batch_size: rows per generate call (see the module docstring). max_new_tokens: per row.
    """

    INSTALL_REQ = False
    INTERLEAVE = True
    MODEL_CLASS = "LlavaForConditionalGeneration"
    CUDA_DTYPE = "float16"  # VLMEvalKit's LLaVA wrappers load float16 (on the CPU: float32)

    def __init__(
        self,
        checkpoint: str,
        hybrid: HybridConfig | None = None,
        stats_dir: str | None = None,
        model_name: str | None = None,
        batch_size: int = 1,
        max_new_tokens: int = 2048,
        **generate_kwargs,
    ):
        super().__init__()
        import transformers
        from transformers import AutoProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.checkpoint = str(checkpoint)
        self.hybrid = hybrid
        self.setting = hybrid.describe() if hybrid is not None else "stock"
        self.stats_dir = stats_dir
        self.model_name = model_name
        self.batch_size = batch_size
        # Under torchrun VLMEvalKit has already narrowed CUDA_VISIBLE_DEVICES to this rank's GPUs.
        self.device = resolve_device()
        dtype = self.CUDA_DTYPE if self.device.type == "cuda" else resolve_dtype("auto", self.device)
        self.processor = AutoProcessor.from_pretrained(self.checkpoint)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues on the right
        model_class = getattr(transformers, self.MODEL_CLASS)
        # Straight onto the device: a CPU copy first would hold the whole checkpoint in host memory
        # once per torchrun rank (8 x 14 GB for a 7B in float16).
        model = model_class.from_pretrained(self.checkpoint, dtype=dtype, attn_implementation="sdpa",
                                            device_map={"": self.device}, **NO_HUB_KERNELS).eval()
        if hybrid is not None:
            model = apply_hybrid(model, hybrid)
            self.setting = hybrid.describe(num_layers=model.config.text_config.num_hidden_layers)
        self.model = model
        self.image_background = mean_colour(self.processor.image_processor)
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True)
        self.generate_kwargs.update(generate_kwargs)

        # Prefill timing: generate's first forward call is the prefill; hooks run outside forward.
        self._forward_calls = 0
        self._prefill_started = 0.0
        self._prefill_seconds = None
        self.model.register_forward_pre_hook(weak_hook(self, "_before_forward"))
        self.model.register_forward_hook(weak_hook(self, "_after_forward"))

        self._records: dict[str, dict[str, dict]] = {}  # dataset -> row index (str) -> stats record
        self._pending = None  # (row index, message, failure or None) from build_prompt, consumed by generate_inner
        self.rows_generated = 0
        self.rows_from_records = 0

    # ---- timing -------------------------------------------------------------------------------
    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _before_forward(self, module, args):
        if self._forward_calls == 0:
            self._synchronize()
            self._prefill_started = time.perf_counter()

    def _after_forward(self, module, args, output):
        if self._forward_calls == 0:
            self._synchronize()
            self._prefill_seconds = time.perf_counter() - self._prefill_started
        self._forward_calls += 1

    # ---- prompts ------------------------------------------------------------------------------
    def _dataset_object(self, dataset_name):
        """The dataset VLMEvalKit is running: infer_data hands us its bound `dataset.dump_image`."""
        owner = getattr(self.dump_image_func, "__self__", None)
        if owner is not None and getattr(owner, "dataset_name", None) == dataset_name:
            return owner
        return None

    def _dataset_type(self, dataset_name) -> str:
        """The running dataset's TYPE (MCQ, VQA, Caption ...), else VLMEvalKit's guess from its name."""
        owner = self._dataset_object(dataset_name)
        return getattr(owner, "TYPE", None) or DATASET_TYPE(dataset_name)

    def use_custom_prompt(self, dataset):
        owner = self._dataset_object(dataset)
        if owner is None:
            # Called outside infer_data's loop: VLMEvalKit's LLaVA rule.
            return DATASET_TYPE(dataset) == "MCQ"
        return getattr(owner, "MODALITY", "IMAGE") == "IMAGE" and getattr(owner, "TYPE", None) != "MT"

    def _message_for(self, line, dataset):
        if DATASET_TYPE(dataset) == "MCQ":
            image_paths = self.dump_image(line, dataset)
            message = [dict(type="image", value=path) for path in image_paths]
            message.append(dict(type="text", value=llava_mcq_prompt(line)))
            return message
        owner = self._dataset_object(dataset)
        return owner.build_prompt(line)  # exactly what infer_data would have done without us

    def _checked_message(self, line, dataset):
        """The row's message, once its text fields and every image file it names are usable; else
        the error naming what is not."""
        check_text_fields(line, self._dataset_type(dataset))
        message = self._message_for(line, dataset)
        for item in message:  # an image_path set names its files: upstream asserts on a missing one, ending the set
            if item["type"] == "image":
                problem = image_file_problem(str(item["value"])) or image_type_problem(str(item["value"]))
                if problem is not None:
                    raise RowError(problem)
        return message

    def build_prompt(self, line, dataset=None):
        """The row's message; a row whose prompt cannot be built becomes a failed row (a text-only
        stand-in message, answered by generate_inner with the failure marker), never a failed set."""
        try:
            message = self._checked_message(line, dataset)
        except Exception as error:
            message = [dict(type="text", value=FAILED_ROW_TEXT)]
            self._pending = (line["index"], message, row_error_text(error))
            return message
        self._pending = (line["index"], message, None)
        return message

    def conversation(self, message) -> tuple[str, list[str]]:
        """VLMEvalKit LLaVA's prompt string (' <image> ' where each image goes) and image paths."""
        content, image_paths = "", []
        for item in message:
            if item["type"] == "text":
                content += item["value"]
            elif item["type"] == "image":
                content += " <image> "
                image_paths.append(item["value"])
        return SYSTEM_PROMPT + "USER: " + content + " ASSISTANT: ", image_paths

    def answer(self, message, text: str) -> str:
        """The prediction stored for a row's decoded new tokens."""
        return text.strip()

    def load_image(self, path: str) -> Image.Image:
        """LLaVA-1.5's "pad": the image centred on a square of the processor's mean colour."""
        return expand_to_square(Image.open(path).convert("RGB"), self.image_background)

    # ---- records (the stats sidecar) ----------------------------------------------------------
    def _stats_file(self, dataset) -> Path | None:
        if self.stats_dir is None or self.model_name is None:
            return None
        return stats.stats_path(self.stats_dir, self.model_name, dataset)

    def _records_for(self, dataset) -> dict[str, dict]:
        """Rows answered from records: finished rows from the sidecar, plus every row of this run.
        Rows that failed in an earlier run are left out, so a rerun generates them again."""
        if dataset not in self._records:
            path = self._stats_file(dataset)
            found = stats.read_records(path) if path is not None else {}
            self._records[dataset] = {index: record for index, record in found.items() if "error" not in record}
            if self._records[dataset]:
                print(
                    f"[hybrid-vlm] {len(self._records[dataset])} rows of {dataset} already generated in {path}: "
                    "answering them from there (delete the model's results folder to recompute)",
                    flush=True,
                )
        return self._records[dataset]

    def _keep(self, dataset, record) -> None:
        self._records_for(dataset)[record["index"]] = record
        path = self._stats_file(dataset)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            stats.append_record(path, record)

    # ---- generation ---------------------------------------------------------------------------
    def _lookahead(self, index, dataset, message) -> list[tuple[object, list]]:
        """The next unfinished rows of this rank's share after `index`, for one batch."""
        owner = self._dataset_object(dataset)
        if self.batch_size <= 1 or owner is None:
            return []
        rank, world_size = get_rank_and_world_size()
        share = owner.data.iloc[list(range(rank, len(owner.data), world_size))]
        indices = [str(value) for value in share["index"]]
        if str(index) not in indices:
            return []
        records = self._records_for(dataset)
        images_wanted = sum(item["type"] == "image" for item in message)
        extra = []
        for position in range(indices.index(str(index)) + 1, len(indices)):
            if len(extra) == self.batch_size - 1:
                break
            if indices[position] in records:
                continue
            line = share.iloc[position]
            try:
                candidate = self.preproc_content(self._checked_message(line, dataset))
            except Exception:
                continue  # a bad row fails on its own turn, with its reason
            if sum(item["type"] == "image" for item in candidate) != images_wanted:
                break  # the engine wants the same image count in every row of a batch
            extra.append((line["index"], candidate))
        return extra

    def processor_inputs(self, messages: list[list[dict]]):
        """The processor's left-padded batch (on the CPU) for several messages."""
        prompts, images = [], []
        for message in messages:
            prompt, image_paths = self.conversation(message)
            prompts.append(prompt)
            images += [self.load_image(path) for path in image_paths]
        return self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)

    @torch.no_grad()
    def generate_batch(self, messages: list[list[dict]]) -> list[dict]:
        """One left-padded generate over several messages; a stats dict (with prediction) per message."""
        inputs, host_layouts = self._device_inputs(messages)
        self._check_context(host_layouts["prompt_tokens"])
        self._forward_calls = 0
        self._prefill_seconds = None
        self._synchronize()
        started = time.perf_counter()
        output = self.model.generate(
            **inputs,
            return_dict_in_generate=True,
            pad_token_id=self.processor.tokenizer.pad_token_id,
            **self.generate_kwargs,
        )
        self._synchronize()
        generate_seconds = time.perf_counter() - started

        prompt_length = inputs["input_ids"].shape[1]
        new_tokens = output.sequences[:, prompt_length:]
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        tokens_in, tokens_kept, visual = self._token_counts(output, inputs)
        new_token_counts = (new_tokens != self.processor.tokenizer.pad_token_id).sum(dim=1).tolist()
        rank, _ = get_rank_and_world_size()
        row_images = self._row_images(host_layouts, len(messages))
        return [
            dict(
                prediction=storable_prediction(self.answer(messages[row], texts[row])),
                tokens_in=int(tokens_in[row]),
                tokens_kept=int(tokens_kept[row]),
                visual_in=int(visual.entered[row]),
                visual_kept=int(visual.kept[row]),
                visual_layer_mean=round(float(visual.layer_mean[row]), 3),
                prefill_gmacs=self._prefill_gmacs(int(tokens_in[row]) - int(visual.entered[row]), visual.entered[row], visual.kept[row],
                                                  row_images[row]),
                prefill_s=round(self._prefill_seconds, 6) if self._prefill_seconds is not None else None,
                generate_s=round(generate_seconds, 6),
                new_tokens=int(new_token_counts[row]),
                batch_size=len(messages),
                batch_requested=self.batch_size,
                rank=rank,
                setting=self.setting,
            )
            for row in range(len(messages))
        ]

    def _device_inputs(self, messages: list[list[dict]]) -> tuple[dict, dict]:
        """(the processor's inputs as the model takes them, `hybrid_vlm.inputs_for`; the image
        layouts as the processor returned them, on the host)."""
        inputs = self.processor_inputs(messages)
        host_layouts = {key: inputs[key] for key in IMAGE_LAYOUTS if key in inputs}
        host_layouts["images"] = inputs["pixel_values"].shape[0] if inputs.get("pixel_values") is not None else 0
        mask = inputs.get("attention_mask")
        host_layouts["prompt_tokens"] = mask.sum(dim=1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * len(messages)
        return inputs_for(self.model, inputs), host_layouts

    def _check_context(self, prompt_tokens: list[int]) -> None:
        """A prompt longer than the LLM's positions (its image tokens included) is refused: generated
        past them, it ran silently with positions the model never saw. In a batch the refusal
        splits it (`_generate_or_split`) until that row fails alone."""
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        longest = max(prompt_tokens)
        if limit is not None and longest > limit:
            raise RowError(f"the prompt is {longest} tokens, images included, above the {limit} positions of this LLM "
                           "(max_position_embeddings): shorten the row's text or use fewer or smaller images")

    def _token_counts(self, output, inputs) -> tuple[list[int], list[int], VisualCounts]:
        """(prompt tokens in, prompt tokens kept, visual counts) per row: the engine's, from its
        cache state; for the stock model every real prompt token reaches every layer."""
        state = getattr(output_cache(output), "hybrid_state", None)
        if state is not None:
            return state.prompt_tokens.tolist(), state.prompt_tokens_kept.tolist(), state.visual_counts()
        tokens_in = inputs["attention_mask"].sum(dim=1).tolist()
        placeholders = ((inputs["input_ids"] == self.model.config.image_token_id) & inputs["attention_mask"].bool()).sum(dim=1).tolist()
        return tokens_in, list(tokens_in), VisualCounts(placeholders, placeholders, [float(p) for p in placeholders])

    def _row_images(self, host_layouts: dict, batch: int) -> list:
        """Per row, what the MACs model needs of its images beyond the counts (LLaVA-1.5: how many,
        split evenly over the prompts as the engine requires)."""
        return [host_layouts["images"] // batch] * batch

    def _prefill_gmacs(self, text_tokens: int, entered: int, kept: int, images=None) -> float | None:
        """Theoretical prefill GMACs of one row (`flops.method_prefill_macs`, the method's scoring
        included); None where the counts are data-dependent (DyMU)."""
        if self.hybrid is not None and self.hybrid.dymu is not None:
            return None
        shape = flops.shape_from_config(self.model.config)
        macs = flops.method_prefill_macs(shape, self.hybrid or HybridConfig(), text_tokens, visual_entered=entered, visual_kept=kept,
                                         images=max(images, 1))
        return round(macs.total / 1e9, 4)

    def _generate_or_split(self, batch: list[tuple[object, list]]) -> list[tuple[object, dict]]:
        """Generate a batch; if generate raises (e.g. CUDA out of memory), retry its rows in halves,
        down to single rows. A single row that still raises becomes a failed row."""
        try:
            results = self.generate_batch([message for _, message in batch])
            return [(index, result) for (index, _), result in zip(batch, results)]
        except Exception as error:
            reason, summary = row_error_text(error), f"{type(error).__name__}: {error}"
        # Retried only here, after the handler: inside it the exception's traceback keeps the failed
        # call's frames, with their activations and KV cache, alive, and a retry would run out of memory too.
        if self.device.type == "cuda":
            gc.collect()  # in case something still holds the failed call's frames in a cycle
            torch.cuda.empty_cache()
        if len(batch) == 1:
            return [(batch[0][0], self._failed_record(f"generate failed: {reason}"))]
        half = (len(batch) + 1) // 2
        print(f"[hybrid-vlm] generate failed for a batch of {len(batch)} rows ({summary}); retrying them {half} at a time", flush=True)
        return self._generate_or_split(batch[:half]) + self._generate_or_split(batch[half:])

    def _failed_record(self, reason: str) -> dict:
        rank, _ = get_rank_and_world_size()
        return dict(prediction=failure_marker(reason), error=reason, rank=rank, setting=self.setting)

    def generate_inner(self, message, dataset=None):
        index, failure = None, None
        if self._pending is not None and self._pending[1] is message:
            index, _, failure = self._pending
        self._pending = None
        if index is None:  # not from infer_data's loop (e.g. a direct call): no row, no records
            self.rows_generated += 1
            return self.generate_batch([message])[0]["prediction"]
        records = self._records_for(dataset)
        if str(index) in records:  # finished earlier (its answer needs no prompt now), or generated (or failed) in this run's batches
            self.rows_from_records += 1
            return records[str(index)]["prediction"]
        if failure is not None:
            record = dict(index=str(index), **self._failed_record(failure))
            self._keep(dataset, record)
            print(f"[hybrid-vlm] {dataset} row {index} failed: {failure}", flush=True)
            return record["prediction"]
        batch = [(index, message)] + self._lookahead(index, dataset, message)
        outcomes = self._generate_or_split(batch)
        for row_index, result in outcomes:
            self._keep(dataset, dict(index=str(row_index), **result))
            if "error" in result:
                print(f"[hybrid-vlm] {dataset} row {row_index} failed: {result['error']}", flush=True)
        self.rows_generated += len(batch)
        return outcomes[0][1]["prediction"]


# the assistant-turn markers upstream's `output_process` splits on: a template with none of them
# (a --model-path checkpoint's own) keeps the decoded new text as it is
NEXT_ROLE_MARKERS = ("[/INST]", "ASSISTANT:", "assistant\n", "<|end_header_id|>\n\n")


class HybridLLaVANext(HybridLLaVA):
    """LLaVA-NeXT (llava-hf v1.6, anyres) for VLMEvalKit, as VLMEvalKit's `LLaVA_Next` wrapper runs it:
    the same MCQ prompt as LLaVA-1.5, the checkpoint's own chat template over the message's items
    in order (text items as text, each image as an image item), images as RGB with no padding (the
    processor tiles them), greedy. Attention is SDPA: VLMEvalKit's wrapper switches to
    flash-attention-2 when flash_attn is installed; this one never does."""

    MODEL_CLASS = "LlavaNextForConditionalGeneration"

    def conversation(self, message) -> tuple[str, list[str]]:
        content, image_paths = [], []
        for item in message:
            if item["type"] == "text":
                content.append({"type": "text", "text": item["value"]})
            else:
                content.append({"type": "image"})
                image_paths.append(item["value"])
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return prompt, image_paths

    def load_image(self, path: str) -> Image.Image:
        return Image.open(path).convert("RGB")

    def answer(self, message, text: str) -> str:
        """VLMEvalKit's `LLaVA_Next.output_process` over the prompt and the new text, which it decodes
        together: an answer running on into a new turn ends at the template's next role marker."""
        from vlmeval.vlm.llava.llava import LLaVA_Next

        prompt, _ = self.conversation(message)
        if not any(marker in prompt for marker in NEXT_ROLE_MARKERS):  # upstream would store prompt and answer together
            return text.strip()
        return LLaVA_Next.output_process(self, prompt + text).replace("<unk>", "")

    def _row_images(self, host_layouts: dict, batch: int) -> list:
        """Per row, its images' crops and packed spans (`adapters.anyres_images`, from the host's image sizes)."""
        sizes = host_layouts.get("image_sizes")
        if sizes is None:
            return [[] for _ in range(batch)]
        images, per_row = anyres_images(self.model, sizes), len(sizes) // batch
        return [images[row * per_row : (row + 1) * per_row] for row in range(batch)]

    def _prefill_gmacs(self, text_tokens: int, entered: int, kept: int, images=None) -> float | None:
        """Theoretical prefill GMACs of one row (`flops.next_method_prefill_macs`: every crop through
        the tower, the method's reads per crop and scoring per selection); None for DyMU, whose tower
        counts are not recorded."""
        config = self.hybrid or HybridConfig()
        if config.dymu is not None:
            return None
        macs = flops.next_method_prefill_macs(flops.shape_from_config(self.model.config), config, images, text_tokens,
                                              visual_entered=int(entered), visual_kept=int(kept))
        return round(macs.total / 1e9, 4)
