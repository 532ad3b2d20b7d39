"""The LLaVA-NeXT names through run.py and the sweep, on a tiny LLaVA-NeXT saved to disk, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from hybrid_vlm import HybridConfig
from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from vlmeval_plugin import settings

from test_vlmeval_plugin import CAPTION_ROWS, MCQ_ROWS, needs_vlmeval, run_py, sandbox, sidecar  # noqa: F401  (sandbox: fixture)

METHOD_SUFFIXES = ["", "_fastv", "_dymu", "_hybrid", "_random", "_visionzip", "_vispruner", "_divprune", "_pdrop", "_dart"]
NEXT_NAMES = [f"llava_next_vicuna_7b{suffix}" for suffix in METHOD_SUFFIXES]


def test_next_names_are_registered_with_their_checkpoints(tmp_path):
    for family in settings.NEXT_FAMILIES:
        names = [name for name, variant in settings.VARIANTS.items() if variant.family == family]
        assert names == [f"{family}{suffix}" for suffix in METHOD_SUFFIXES]  # no pooling name
        assert all(settings.VARIANTS[name].next for name in names)
    assert [n for n, v in settings.VARIANTS.items() if v.family == "llava_next_vicuna_7b"] == NEXT_NAMES
    assert settings.FAMILY_CHECKPOINTS["llava_next_vicuna_7b"] == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert settings.hybrid_config_for("llava_next_vicuna_7b_fastv", {"FASTV_K": "320"}) == HybridConfig(fastv_k=320)
    with pytest.raises(settings.PluginError, match="FASTV_K='-3' is not valid"):
        settings.hybrid_config_for("llava_next_mistral_7b_fastv", {"FASTV_K": "-3"})
    with pytest.raises(settings.PluginError, match="llava-v1.6-mistral-7b-hf"):
        settings.resolve_checkpoint(None, settings.FAMILY_CHECKPOINTS["llava_next_mistral_7b"])
    # the inside-the-LLM names: DART's official NeXT default (320), PyramidDrop a share of each span
    assert settings.hybrid_config_for("llava_next_vicuna_7b_dart", {}) == HybridConfig(visual_method="dart", visual_budget=320)
    assert settings.hybrid_config_for("llava_next_vicuna_7b_pdrop", {}) == HybridConfig(visual_method="pdrop", visual_budget=0.11)


@pytest.fixture(scope="module")
def next_checkpoint(sandbox):  # noqa: F811
    """A tiny LLaVA-NeXT on disk, and DyMU thresholds calibrated on its crops."""
    import torch

    from hybrid_vlm.calibrate import calibrate_thresholds, write_threshold_file
    from hybrid_vlm.hf_compat.llava_next import anyres_layouts, crop_pixels
    from hybrid_vlm.tiny import build_next_processor, ensure_tiny_llava_next, synthetic_image

    path = ensure_tiny_llava_next(sandbox["root"] / "cache" / "tiny-llava-next-v1")  # reports recognise "tiny-llava" paths
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(path, **NO_HUB_KERNELS).eval()
    processor = build_next_processor()
    images = [synthetic_image(seed).resize((336, 220 + 20 * seed)) for seed in range(4)]
    inputs = processor(images=images, text=["USER: <image>\nx ASSISTANT:"] * 4, return_tensors="pt", padding=True)
    crops = crop_pixels(inputs["pixel_values"], anyres_layouts(model, inputs["image_sizes"]))
    thresholds = sandbox["root"] / "next-thresholds" / "next-200.json"
    with torch.no_grad():
        write_threshold_file(thresholds, calibrate_thresholds(model, [crops], target=200, progress=False))
    return path, thresholds


@needs_vlmeval
def test_next_hybrid_runs_end_to_end_batched(sandbox, next_checkpoint):  # noqa: F811
    path, thresholds = next_checkpoint
    work = sandbox["root"] / "next-work"
    result = run_py(
        sandbox,
        ["--model", "llava_next_vicuna_7b_hybrid", "--model-path", str(path), "--data", "TinyMMBench", "TinyCOCO",
         "--work-dir", str(work), "--batch-size", "4", "--max-new-tokens", "4"],
        extra_env={"DYMU_THRESHOLDS": str(thresholds), "FASTV_K": "0.5"},
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name = "llava_next_vicuna_7b_hybrid__dymu-next-200_fastv-r0.5-l2"
    for dataset, rows in (("TinyMMBench", MCQ_ROWS), ("TinyCOCO", CAPTION_ROWS)):
        records = sidecar(work, name, dataset)
        assert len(records) == rows and not any("error" in r for r in records)
        assert max(r["batch_size"] for r in records) > 1
        for record in records:  # FastV keeps half of each row's merged visual tokens (text stays)
            assert record["tokens_kept"] < record["tokens_in"]
    assert (work / name / f"{name}_TinyCOCO_score.json").is_file()


@needs_vlmeval
def test_next_fastv_sweep(sandbox, next_checkpoint, tmp_path):  # noqa: F811
    path, _ = next_checkpoint
    command = [sys.executable, "-m", "hybrid_tools.sweep", "--family", "llava_next_vicuna_7b", "--data", "TinyCOCO",
               "--fastv-k", "64", "--vanilla", "--work-dir", str(tmp_path / "work"), "--report", "next-sweep",
               "--", "--model-path", str(path), "--max-new-tokens", "3", "--limit", "2"]
    result = subprocess.run(command, env=sandbox["env"], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    table = pd.read_csv(next((tmp_path / "work").glob("sweep_*.csv")))
    rows = {row.model: row for row in table.itertuples()}
    assert list(rows) == ["llava_next_vicuna_7b", "llava_next_vicuna_7b_fastv__fastv-k64-l2"]  # one setting: CI time
    vanilla_visual = rows["llava_next_vicuna_7b"].tokens_in_mean - rows["llava_next_vicuna_7b"].tokens_kept_mean
    assert vanilla_visual == 0
    for k in (64,):
        fastv = rows[f"llava_next_vicuna_7b_fastv__fastv-k{k}-l2"]
        assert fastv.tokens_kept_mean < fastv.tokens_in_mean
    report = (tmp_path / "reports" / "next-sweep" / "report.md").read_text()
    assert "llava_next_vicuna_7b_fastv__fastv-k64-l2" in report and "Tiny random-weight model" in report


@needs_vlmeval
def test_prompts_match_vlmevalkit_llava_next(sandbox, next_checkpoint):  # noqa: F811
    """MCQ text and the chat-templated prompt equal what VLMEvalKit's LLaVA_Next builds, row by row:
    its generate_inner runs up to the processor call, which a stub captures."""
    from vlmeval_plugin.tiny_data import ensure_tiny_sets

    ensure_tiny_sets(sandbox["env"]["LMUData"])
    path, _ = next_checkpoint
    script = r"""
import inspect, sys
import pandas as pd
from PIL import Image
from transformers import AutoProcessor
from vlmeval.vlm.llava.llava import LLaVA_Next
from vlmeval_plugin.model import HybridLLaVANext, llava_mcq_prompt

processor = AutoProcessor.from_pretrained(sys.argv[2])
Image.new("RGB", (40, 30)).save("probe.png")

class Captured(Exception):
    pass

class Processor:
    def apply_chat_template(self, *args, **kwargs):
        return processor.apply_chat_template(*args, **kwargs)
    def __call__(self, *args, **kwargs):
        raise Captured(*args)

class Stub:
    processor = Processor()
    def use_custom_prompt(self, dataset):
        return True
    def dump_image(self, line, dataset):
        return ["probe.png"]

class Ours:
    processor = processor

data = pd.read_csv(sys.argv[1], sep="\t")
for _, line in data.iterrows():
    upstream = LLaVA_Next.build_prompt(Stub(), line, dataset="TinyMMBench")
    assert upstream[-1]["value"] == llava_mcq_prompt(line)
    try:
        LLaVA_Next.generate_inner(Stub(), upstream)
    except Captured as captured:
        prompt = captured.args[0]  # positional: transformers 5's processors take images first
    ours, images = HybridLLaVANext.conversation(Ours(), upstream)
    assert ours == prompt and images == ["probe.png"], (ours, prompt)
# the README's claim: on transformers 5, VLMEvalKit's own LLaVA_Next fails every image row, since its
# prompt lands in the processor's `images`
class Real(Stub):
    processor = processor
try:
    LLaVA_Next.generate_inner(Real(), upstream)
    raise SystemExit("VLMEvalKit's LLaVA_Next got past its processor call: update the README")
except ValueError as error:
    assert "Incorrect image source" in str(error), error
assert ".convert(\"RGB\")" in inspect.getsource(LLaVA_Next.generate_inner)
assert "max_new_tokens=2048" in inspect.getsource(LLaVA_Next.__init__)
print("ok", len(data))
"""
    result = subprocess.run([sys.executable, "-c", script, str(Path(sandbox["env"]["LMUData"]) / "TinyMMBench.tsv"), str(path)],
                            env=sandbox["env"], cwd=sandbox["root"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


MISTRAL_STYLE_TEMPLATE = (  # llava-v1.6-mistral's turn markers, on the tiny tokenizer
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " [/INST]{% endif %}{% endfor %}"
)


@needs_vlmeval
@pytest.mark.parametrize("template", ["vicuna", "mistral"])
@pytest.mark.parametrize("answer", ["B", "A cat on a mat.", "B\nUSER: why? ASSISTANT: because", "B [/INST] more"])  # generate stops at </s>
def test_next_answers_are_cut_as_vlmevalkits_llava_next_cuts_them(template, answer):
    """VLMEvalKit's LLaVA_Next decodes the prompt and the answer together, special tokens kept, and
    keeps the text between the prompt's role marker and the next one (`output_process`). Ours decodes
    the new tokens alone: the same prediction for answers that run on into a new turn too."""
    from vlmeval.vlm.llava.llava import LLaVA_Next

    from hybrid_vlm.tiny import build_next_processor, synthetic_image
    from vlmeval_plugin.model import HybridLLaVANext

    processor = build_next_processor()
    if template == "mistral":
        processor.chat_template = MISTRAL_STYLE_TEMPLATE
    wrapper = HybridLLaVANext.__new__(HybridLLaVANext)
    wrapper.processor = processor
    message = [dict(type="image", value="unused.png"), dict(type="text", value="What is it?")]
    prompt, _ = wrapper.conversation(message)
    prompt_ids = processor(images=[synthetic_image(0)], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    new_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    upstream_text = processor.decode(prompt_ids + new_ids, skip_special_token=True)  # upstream's call, typo and all
    upstream = LLaVA_Next.output_process(None, upstream_text).replace("<unk>", "")
    ours = wrapper.answer(message, tokenizer.decode(new_ids, skip_special_tokens=True))
    assert ours == upstream


@needs_vlmeval
def test_a_next_template_without_role_markers_keeps_the_answer_alone():
    """Upstream's output_process finds no marker to split on and stores prompt and answer together."""
    from hybrid_vlm.tiny import build_next_processor
    from vlmeval_plugin.model import HybridLLaVANext

    processor = build_next_processor()
    processor.chat_template = "{% for message in messages %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endfor %}"
    wrapper = HybridLLaVANext.__new__(HybridLLaVANext)
    wrapper.processor = processor
    message = [dict(type="image", value="unused.png"), dict(type="text", value="What is it?")]
    assert wrapper.answer(message, " A cat. ") == "A cat."


NEXT_GMACS_SCRIPT = """
import json, sys
import torch
from vlmeval_plugin import robust
robust.install()
from hybrid_vlm import HybridConfig, flops
from hybrid_vlm.adapters import anyres_images
from hybrid_vlm.tiny import synthetic_image
from vlmeval_plugin.model import HybridLLaVANext
sizes = [(336, 200), (672, 22)]  # (width, height): a wide image, and a strip whose grid crops unpad to 48 patches
paths = []
for i, size in enumerate(sizes):
    paths.append(f"{sys.argv[2]}/image{i}.png")
    synthetic_image(i).resize(size).save(paths[-1])
configs = (None, HybridConfig(fastv_k=64), HybridConfig(visual_method="visionzip", visual_budget=60, budget_scope="crop"),
           HybridConfig(visual_method="divprune", visual_budget=0.1), HybridConfig(visual_method="dart", visual_budget=64))
rows = []
for hybrid in configs:
    wrapper = HybridLLaVANext(sys.argv[1], hybrid=hybrid, max_new_tokens=2)
    records = wrapper.generate_batch([[dict(type="image", value=p), dict(type="text", value="describe it")] for p in paths])
    shape, config = flops.shape_from_config(wrapper.model.config), hybrid or HybridConfig()
    for record, size in zip(records, sizes):
        image = anyres_images(wrapper.model, torch.tensor([[size[1], size[0]]]))
        text = record["tokens_in"] - record["visual_in"]
        expected = flops.next_method_prefill_macs(shape, config, image, text, visual_entered=record["visual_in"], visual_kept=record["visual_kept"])
        rows.append([record["prefill_gmacs"], round(expected.total / 1e9, 4)])
print(json.dumps(rows))
"""


@needs_vlmeval
def test_next_rows_record_the_macs_of_their_own_images(sandbox, next_checkpoint, tmp_path):  # noqa: F811
    """A LLaVA-NeXT batch of a wide image and a strip: each row's prefill_gmacs is the MACs model of
    its own image's crops and packed span (`flops.next_method_prefill_macs`, checked against
    FlopCounterMode in test_next_flops), under stock, FastV, a per-crop VisionZip, DivPrune and DART."""
    path, _ = next_checkpoint
    result = subprocess.run([sys.executable, "-c", NEXT_GMACS_SCRIPT, str(path), str(tmp_path)], env=sandbox["env"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rows) == 10
    for recorded, expected in rows:
        assert recorded == expected
    recorded = [row[0] for row in rows]
    assert all(recorded[i] != recorded[i + 1] for i in range(0, 10, 2))  # the two images cost differently
