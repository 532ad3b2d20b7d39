"""The Qwen2.5-VL names through run.py and the sweep, on a tiny Qwen2.5-VL saved to disk, offline;
and upstream Qwen2VLChat's prompt building and resizing beside ours, row by row."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from hybrid_vlm import HybridConfig
from vlmeval_plugin import settings

from test_vlmeval_plugin import CAPTION_ROWS, MCQ_ROWS, needs_vlmeval, predictions, run_py, sandbox, sidecar  # noqa: F401  (sandbox: fixture)

QWEN = "Qwen2.5-VL-7B-Instruct"
FASTV = f"{QWEN}_fastv__fastv-r0.5-l2"


def test_qwen_names_are_registered_and_refuse_what_is_not_implemented():
    names = [name for name, variant in settings.VARIANTS.items() if variant.family == QWEN]
    assert names == [QWEN, f"{QWEN}_fastv", f"{QWEN}_random", f"{QWEN}_pool", f"{QWEN}_divprune", f"{QWEN}_pdrop", f"{QWEN}_dart"]
    assert all(settings.VARIANTS[name].qwen for name in names)
    assert settings.FAMILY_CHECKPOINTS[QWEN] == "Qwen/Qwen2.5-VL-7B-Instruct"
    config = settings.hybrid_config_for
    assert config(f"{QWEN}_fastv", {"FASTV_K": "320"}) == HybridConfig(fastv_k=320)
    assert config(f"{QWEN}_fastv", {}) == HybridConfig(fastv_k=0.5)
    assert config(f"{QWEN}_fastv", {"FASTV_SELECT": "random"}) == HybridConfig(fastv_k=0.5, fastv_select="random")
    assert config(f"{QWEN}_random", {}) == HybridConfig(fastv_k=0.5, fastv_select="random")
    assert config(f"{QWEN}_random", {"VISUAL_BUDGET": "0.25"}) == HybridConfig(fastv_k=0.75, fastv_select="random")
    # Qwen's defaults are fractions of each image (its token count follows the resolution)
    assert config(f"{QWEN}_divprune", {}) == HybridConfig(visual_method="divprune", visual_budget=0.098)
    assert config(f"{QWEN}_pool", {}) == HybridConfig(visual_method="pool", visual_budget=0.25)
    assert config(f"{QWEN}_pdrop", {}) == HybridConfig(visual_method="pdrop", visual_budget=0.11)
    assert config(f"{QWEN}_dart", {"FASTV_LAYER": "3"}) == HybridConfig(visual_method="dart", visual_budget=0.222, fastv_layer=3)
    assert config(f"{QWEN}_dart", {"VISUAL_BUDGET": "128"}) == HybridConfig(visual_method="dart", visual_budget=128)
    # a count above LLaVA-1.5's 576 patches is fine here: it is capped at each image's units
    assert config(f"{QWEN}_divprune", {"VISUAL_BUDGET": "2000"}) == HybridConfig(visual_method="divprune", visual_budget=2000)
    with pytest.raises(settings.PluginError, match="HYBRID_POSITIONS=renumbered"):
        config(f"{QWEN}_fastv", {"HYBRID_POSITIONS": "renumbered"})
    with pytest.raises(settings.PluginError, match="VISUAL_METHOD=visionzip conflicts with the name"):
        config(f"{QWEN}_divprune", {"VISUAL_METHOD": "visionzip"})
    with pytest.raises(settings.PluginError, match="VISUAL_BUDGET='1.5' is not valid"):
        config(f"{QWEN}_pool", {"VISUAL_BUDGET": "1.5"})


@pytest.fixture(scope="module")
def qwen_checkpoint(sandbox):  # noqa: F811
    from hybrid_vlm.tiny_qwen import TINY_QWEN_VERSION, ensure_tiny_qwen

    return ensure_tiny_qwen(sandbox["root"] / "cache" / f"tiny-qwen2.5-vl-{TINY_QWEN_VERSION}")


@needs_vlmeval
@pytest.mark.parametrize("dataset,min_pixels", [("OCRBench", 10 * 10 * 28 * 28), ("TinyMMBench", 1280 * 28 * 28)])
def test_the_checkpoints_processor_keeps_the_size_vlmevalkit_resized_to(qwen_checkpoint, tmp_path, dataset, min_pixels):
    """The wrapper resizes each image to VLMEvalKit's pixel range for its dataset (qwen_vl_utils'
    smart_resize), then the checkpoint's processor must leave that size alone. The tiny
    checkpoint's processor held VLMEvalKit's range, not the released one, and scaled an OCRBench
    image up a second time: 1,290 units where the 7B's processor gives 117."""
    from qwen_vl_utils import smart_resize
    from transformers import AutoProcessor

    from hybrid_vlm.tiny import synthetic_image
    from vlmeval_plugin.qwen import MAX_PIXELS, HybridQwen2VL

    path = tmp_path / "image.png"
    synthetic_image(0).resize((364, 252)).save(path)
    ours = object.__new__(HybridQwen2VL)
    ours.__dict__.update(processor=AutoProcessor.from_pretrained(qwen_checkpoint), min_pixels=1280 * 28 * 28, max_pixels=MAX_PIXELS, _dataset=dataset)
    inputs = HybridQwen2VL.processor_inputs(ours, [[{"type": "image", "value": str(path)}, {"type": "text", "value": "What is written?"}]])
    height, width = smart_resize(252, 364, 28, min_pixels, MAX_PIXELS)
    assert inputs["image_grid_thw"].tolist() == [[1, height // 14, width // 14]]


def expected_visual_tokens(lmu: Path, dataset: str) -> dict[str, int]:
    """Per row, t*h*w/4 from qwen_vl_utils' smart_resize of the row's image at VLMEvalKit's pixel range
    (an image is one temporal patch of 2 frames: t*h*w/4 = h'*w' / 28^2)."""
    return {index: rows * cols for index, (rows, cols) in expected_unit_grids(lmu, dataset).items()}


def expected_unit_grids(lmu: Path, dataset: str) -> dict[str, tuple[int, int]]:
    """Per row, the (rows, cols) of its image's merged 2x2 units: (h' / 28, w' / 28) after smart_resize."""
    from PIL import Image
    from qwen_vl_utils import smart_resize

    table = pd.read_csv(lmu / f"{dataset}.tsv", sep="\t", dtype={"index": str, "image": str})
    encoded = dict(zip(table["index"], table["image"]))
    counts = {}
    for row in table.itertuples():
        data = encoded.get(row.image, row.image)  # a circular copy names the row that holds its image
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        height, width = smart_resize(image.height, image.width, 28, 1280 * 28 * 28, 16384 * 28 * 28)
        counts[str(row.index)] = (height // 28, width // 28)
    return counts


@needs_vlmeval
def test_cuda_dtypes_are_the_ones_vlmevalkits_wrappers_load():
    """On a GPU, upstream loads Qwen2.5-VL in its checkpoint's dtype (bfloat16; float16 can overflow
    in it) and LLaVA in float16. Ours loaded every model in float16."""
    import inspect

    import vlmeval.vlm.llava.llava as upstream_llava
    import vlmeval.vlm.qwen2_vl.model as upstream_qwen

    from vlmeval_plugin.model import HybridLLaVA, HybridLLaVANext
    from vlmeval_plugin.qwen import HybridQwen2VL

    assert "torch_dtype='auto'" in inspect.getsource(upstream_qwen.Qwen2VLChat.__init__) and HybridQwen2VL.CUDA_DTYPE == "auto"
    assert "torch_dtype=torch.float16" in inspect.getsource(upstream_llava.LLaVA_Next.__init__)
    assert HybridLLaVA.CUDA_DTYPE == HybridLLaVANext.CUDA_DTYPE == "float16"


@needs_vlmeval
def test_qwen_fastv_runs_end_to_end_the_same_at_batch_1_and_4(sandbox, qwen_checkpoint):  # noqa: F811
    from hybrid_vlm import visual_keep_count

    lmu = Path(sandbox["env"]["LMUData"])
    outputs = {}
    for batch in (1, 4):
        work = sandbox["root"] / f"qwen-work-{batch}"
        # --limit 8: two batches of 4 per set are what batch == alone needs, and CI time is bounded
        result = run_py(sandbox, ["--model", f"{QWEN}_fastv", QWEN, "--model-path", str(qwen_checkpoint), "--data", "TinyMMBench",
                                  "TinyCOCO", "--work-dir", str(work), "--batch-size", str(batch), "--max-new-tokens", "4", "--limit", "8"],
                        extra_env={"FASTV_K": "0.5"}, timeout=1500)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[batch] = work
    for dataset, rows in (("TinyMMBench", min(MCQ_ROWS, 8)), ("TinyCOCO", min(CAPTION_ROWS, 8))):
        visual = expected_visual_tokens(lmu, dataset)
        for name in (FASTV, QWEN):
            one, four = (predictions(outputs[b], name, dataset) for b in (1, 4))
            assert len(one) == len(four) == rows and one["prediction"].tolist() == four["prediction"].tolist()
        stock = {r["index"]: r for r in sidecar(outputs[4], QWEN, dataset)}
        records = sidecar(outputs[4], FASTV, dataset)
        assert len(records) == rows and not any("error" in r for r in records)
        assert max(r["batch_size"] for r in records) > 1
        for record in records:
            assert record["visual_in"] == visual[record["index"]] >= 1280
            assert record["tokens_in"] == stock[record["index"]]["tokens_in"]  # text + sum of t*h*w/4
            text = record["tokens_in"] - record["visual_in"]
            assert record["tokens_kept"] == text + visual_keep_count(record["visual_in"], 0.5)
            assert 0 < record["prefill_gmacs"] < stock[record["index"]]["prefill_gmacs"]  # qwen_flops, per row


@needs_vlmeval
def test_qwen_method_names_run_the_same_at_batch_1_and_4_and_keep_their_quota(sandbox, qwen_checkpoint):  # noqa: F811
    """DivPrune and pooling on the merged units, and random selection: per row, the visual tokens
    kept are the quota of that row's image (pooling's window grid by enumeration, test_qwen_methods),
    and the tokens kept are its text plus them."""
    from test_qwen_methods import enumerated_pool_shape

    from hybrid_vlm import visual_keep_count

    names = [f"{QWEN}_divprune", f"{QWEN}_pool", f"{QWEN}_random", f"{QWEN}_dart"]
    effective = [f"{QWEN}_divprune__divprune-b0.098", f"{QWEN}_pool__pool-b0.25", f"{QWEN}_random__random-r0.5-l2", f"{QWEN}_dart__dart-b0.222-l2"]
    outputs = {}
    for batch in (1, 4):
        work = sandbox["root"] / f"qwen-methods-{batch}"
        result = run_py(sandbox, ["--model", *names, "--model-path", str(qwen_checkpoint), "--data", "TinyMMBench", "--limit", "8",
                                  "--work-dir", str(work), "--batch-size", str(batch), "--max-new-tokens", "3"], timeout=1500)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[batch] = work
    grids = expected_unit_grids(Path(sandbox["env"]["LMUData"]), "TinyMMBench")

    def quota(name: str, rows: int, cols: int) -> int:
        units = rows * cols
        if "divprune" in name:
            return max(1, round(units * 0.098))
        if "pool" in name:
            shape = enumerated_pool_shape(max(1, round(units * 0.25)), rows, cols)
            return shape[0] * shape[1]
        if "dart" in name:
            return min(4 + 8 * int(units * 0.222 / 8), units)  # official Qwen code: 4 image pivots, int(L (1 - r) / 8) per pivot
        return visual_keep_count(units, 0.5)

    for name in effective:
        one, four = (predictions(outputs[b], name, "TinyMMBench") for b in (1, 4))
        assert one["prediction"].tolist() == four["prediction"].tolist()
        records = sidecar(outputs[4], name, "TinyMMBench")
        assert records and not any("error" in r for r in records) and max(r["batch_size"] for r in records) > 1
        for record in records:
            rows, cols = grids[record["index"]]
            before_llm = "divprune" in name or "pool" in name  # what enters layer 0 is the quota (rule A), else every unit
            assert record["visual_in"] == (quota(name, rows, cols) if before_llm else rows * cols), (name, record)
            assert record["visual_kept"] == quota(name, rows, cols), (name, record)
            text = record["tokens_in"] - record["visual_in"]
            assert record["tokens_kept"] == text + record["visual_kept"], (name, record)
            assert (record["prefill_gmacs"] is None) == ("dart" in name)  # DART's per-layer counts are not recorded


@needs_vlmeval
def test_qwen_pdrop_fraction_runs_the_same_at_batch_1_and_4(sandbox, qwen_checkpoint):  # noqa: F811
    """PyramidDrop with a fraction: per row, the layer-averaged visual count (rule C) is within one
    token-layer step of that share of the row's units (its ratio lives on a 0.001 grid)."""
    name, effective = f"{QWEN}_pdrop", f"{QWEN}_pdrop__pdrop-b0.4"
    outputs = {}
    for batch in (1, 4):
        work = sandbox["root"] / f"qwen-pdrop-{batch}"
        result = run_py(sandbox, ["--model", name, "--model-path", str(qwen_checkpoint), "--data", "TinyMMBench", "--limit", "4",
                                  "--work-dir", str(work), "--batch-size", str(batch), "--max-new-tokens", "3"],
                        extra_env={"VISUAL_BUDGET": "0.4"}, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[batch] = work
    one, four = (predictions(outputs[b], effective, "TinyMMBench") for b in (1, 4))
    assert one["prediction"].tolist() == four["prediction"].tolist()
    grids = expected_unit_grids(Path(sandbox["env"]["LMUData"]), "TinyMMBench")
    for record in sidecar(outputs[4], effective, "TinyMMBench"):
        units = grids[record["index"]][0] * grids[record["index"]][1]
        assert record["visual_in"] == units and record["visual_kept"] < units
        assert abs(record["visual_layer_mean"] - 0.4 * units) <= units / 4 * 0.01 + 1, record  # 4 layers


@needs_vlmeval
def test_a_video_set_is_refused_for_the_qwen_names_before_anything_loads(sandbox, qwen_checkpoint):  # noqa: F811
    """VLMEvalKit's Qwen2.5-VL reads a clip as a video; ours would have got its frames as images."""
    work = sandbox["root"] / "qwen-video"
    result = run_py(sandbox, ["--model", QWEN, "--model-path", str(qwen_checkpoint), "--data", "TinyMMBench", "MVBench_8frame",
                              "MVBench", "--work-dir", str(work)])  # a video config, and a name of a video dataset class
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert f"{QWEN} on the video set(s) MVBench_8frame, MVBench: the Qwen2.5-VL names run image sets only" in result.stderr
    assert not work.exists() or not any(work.rglob("*.xlsx"))


@needs_vlmeval
def test_qwen_fastv_sweep(sandbox, qwen_checkpoint, tmp_path):  # noqa: F811
    command = [sys.executable, "-m", "hybrid_tools.sweep", "--family", QWEN, "--data", "TinyCOCO",
               "--fastv-k", "0.75", "--vanilla", "--work-dir", str(tmp_path / "work"), "--report", "qwen-sweep",
               "--", "--model-path", str(qwen_checkpoint), "--max-new-tokens", "3", "--limit", "2"]
    result = subprocess.run(command, env=sandbox["env"], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    table = pd.read_csv(next((tmp_path / "work").glob("sweep_*.csv")))
    rows = {row.model: row for row in table.itertuples()}
    assert list(rows) == [QWEN, f"{QWEN}_fastv__fastv-r0.75-l2"]  # one setting (a ratio; NeXT's sweep test takes a K): CI time
    assert rows[QWEN].tokens_kept_mean == rows[QWEN].tokens_in_mean
    for name in list(rows)[1:]:
        assert rows[name].tokens_kept_mean < rows[name].tokens_in_mean
    assert (tmp_path / "reports" / "qwen-sweep" / "report.md").is_file()


UPSTREAM_SCRIPT = r"""
import sys
import torch
import transformers
from transformers import AutoProcessor
from vlmeval.dataset import build_dataset
from vlmeval.vlm.qwen2_vl.model import Qwen2VLChat
from vlmeval_plugin.cli import register_caption_sets
from vlmeval_plugin.qwen import HybridQwen2VL

checkpoint = sys.argv[1]
processor = AutoProcessor.from_pretrained(checkpoint)

class Captured(Exception):
    pass

class CapturingModel:
    def generate(self, **inputs):
        raise Captured(inputs)

# upstream's object without its __init__ (which asserts a GPU and loads flash-attention 2): the
# attributes its __init__ sets for the Qwen2.5-VL-7B-Instruct entry of vlmeval/config.py
upstream = object.__new__(Qwen2VLChat)
upstream.__dict__.update(min_pixels=1280 * 28 * 28, max_pixels=16384 * 28 * 28, total_pixels=None, system_prompt=None,
                         verbose=False, post_process=False, model_path=checkpoint, processor=processor, model=CapturingModel(),
                         generate_kwargs={}, fps=2, nframe=128, use_vllm=False, use_lmdeploy=False)
transformers.BatchFeature.to = lambda self, *args, **kwargs: self  # upstream moves the inputs to 'cuda'

ours = object.__new__(HybridQwen2VL)
ours.__dict__.update(processor=processor, min_pixels=1280 * 28 * 28, max_pixels=16384 * 28 * 28, _dataset=None)
checked = 0
register_caption_sets(["TinyCOCO"])
for name in ("TinyMMBench", "TinyCOCO"):
    dataset = build_dataset(name)
    assert dataset is not None, name
    ours._dataset, ours.dump_image_func = name, dataset.dump_image
    for i in range(len(dataset.data)):
        line = dataset.data.iloc[i]
        message = dataset.build_prompt(line)  # use_custom_prompt=False upstream: the dataset's prompt
        assert HybridQwen2VL._message_for(ours, line, name) == message
        try:
            upstream.generate_inner(message, dataset=name)
        except Captured as captured:
            expected = captured.args[0]
        mine = HybridQwen2VL.processor_inputs(ours, [message])
        assert torch.equal(mine["input_ids"], expected["input_ids"]), (name, i)
        assert torch.equal(mine["image_grid_thw"], expected["image_grid_thw"]), (name, i)
        assert torch.equal(mine["pixel_values"], expected["pixel_values"]), (name, i)
        checked += 1
# interleaved text and two images of different shapes, under names whose pixel bounds differ (OCRBench's minimum)
from hybrid_vlm.tiny import synthetic_image
synthetic_image(1).resize((300, 200)).save("wide.png")
synthetic_image(2).resize((120, 500)).save("tall.png")
message = [dict(type="text", value="Look at"), dict(type="image", value="wide.png"), dict(type="text", value="and"),
           dict(type="image", value="tall.png"), dict(type="text", value="Are they the same? Answer yes or no.")]
for name in ("BLINK", "OCRBench", "HallusionBench"):
    ours._dataset = name
    try:
        upstream.generate_inner(message, dataset=name)
    except Captured as captured:
        expected = captured.args[0]
    mine = HybridQwen2VL.processor_inputs(ours, [message])
    for key in ("input_ids", "image_grid_thw", "pixel_values"):
        assert torch.equal(mine[key], expected[key]), (name, key)
    checked += 1
print("ok", checked)
"""


@needs_vlmeval
def test_prompts_and_resizing_match_upstream_qwen2vlchat(sandbox, qwen_checkpoint):  # noqa: F811
    """Chat-templated text (as token ids), image_grid_thw and pixels equal what upstream's
    Qwen2VLChat.generate_inner hands to model.generate, for every row of the bundled sets, and for
    an interleaved two-image message under BLINK, OCRBench and HallusionBench."""
    result = subprocess.run([sys.executable, "-c", UPSTREAM_SCRIPT, str(qwen_checkpoint)], env=sandbox["env"], cwd=sandbox["root"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["ok", str(MCQ_ROWS + CAPTION_ROWS + 3)]


GENERATION_SCRIPT = r"""
import inspect, json, shutil, sys
from pathlib import Path
import torch
from vlmeval.vlm.qwen2_vl.model import Qwen2VLChat
from vlmeval_plugin.qwen import HybridQwen2VL
from hybrid_vlm.tiny import synthetic_image

source, work = Path(sys.argv[1]), Path(sys.argv[2])
checkpoint = work / "checkpoint"
shutil.copytree(source, checkpoint)
shipped = json.loads((checkpoint / "generation_config.json").read_text())
# what Qwen2.5-VL-7B-Instruct's generation_config.json ships (its sampling defaults)
shipped.update(do_sample=True, repetition_penalty=1.05, temperature=0.1, top_k=1, top_p=0.001)
(checkpoint / "generation_config.json").write_text(json.dumps(shipped))
wrapper = HybridQwen2VL(str(checkpoint), max_new_tokens=24)
image = work / "frame.png"
synthetic_image(1).resize((300, 200)).save(image)
message = [dict(type="image", value=str(image)), dict(type="text", value="Describe this picture briefly.")]
inputs, _ = wrapper._device_inputs([message])
upstream_kwargs = {name: parameter.default for name, parameter in inspect.signature(Qwen2VLChat.__init__).parameters.items()
                   if name in ("top_p", "top_k", "temperature", "repetition_penalty", "do_sample")}
pad = wrapper.processor.tokenizer.pad_token_id
with torch.no_grad():
    upstream = wrapper.model.generate(**inputs, max_new_tokens=24, pad_token_id=pad, **upstream_kwargs)
    ours = wrapper.model.generate(**inputs, pad_token_id=pad, **wrapper.generate_kwargs)
    penalised = wrapper.model.generate(**inputs, max_new_tokens=24, pad_token_id=pad, do_sample=False, repetition_penalty=1.05)
print("tokens", torch.equal(ours, upstream), torch.equal(penalised, upstream))

grids, build = [], wrapper.processor_inputs
def recording(messages):
    built = build(messages)
    grids.append(built["image_grid_thw"].tolist())
    return built
wrapper.processor_inputs = recording
wrapper.generate_inner(message, dataset="TinyCOCO")
wrapper._dataset = "OCRBench"  # as after an OCRBench row was prompted
wrapper.generate_inner(message, dataset="TinyCOCO")
print("grids", grids[0] == grids[1])
"""


@needs_vlmeval
def test_generation_follows_qwen2vlchat_whatever_the_checkpoint_ships(sandbox, qwen_checkpoint, tmp_path):  # noqa: F811
    """Greedy tokens equal upstream Qwen2VLChat's generate settings (read from its signature) on a
    checkpoint that ships Qwen2.5-VL-Instruct's repetition_penalty 1.05, which would change them;
    and a direct generate_inner call resizes for its own dataset, not the last one prompted."""
    result = subprocess.run([sys.executable, "-c", GENERATION_SCRIPT, str(qwen_checkpoint), str(tmp_path)], env=sandbox["env"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "tokens True False" in lines and "grids True" in lines, lines
