"""The testbed: its scenes, its training input and a few steps of its trainer (the shipped checkpoint: test_testbed_checkpoint.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from hybrid_vlm.testbed import build_untrained, scenes
from hybrid_vlm.testbed.prompts import CAPTION_PROMPT, conversation, mcq_text
from hybrid_vlm.testbed.train import collate, pack, packed_logits, training_segments
from vlmeval_plugin.tiny_data import held_out_question

REPO = Path(__file__).resolve().parents[1]



# ---- scenes ----------------------------------------------------------------------------------
def test_answers_follow_from_the_scene_description():
    """Each question's answer is recomputed here from the objects, independently of `ask`."""
    for index in range(200):
        scene, rng = scenes.scene_for(scenes.TRAIN_STREAM, index)
        by_shape = {o.shape: o for o in scene.objects}
        by_colour = {o.colour: o for o in scene.objects}
        for kind in scenes.QUESTION_KINDS:
            question = scenes.ask(scene, kind, rng)
            if question is None:
                continue
            answer = question.options[question.answer]
            words = question.question.rstrip("?").split()
            assert len(set(question.options)) == len(question.options)
            if kind == "colour":
                assert by_shape[words[-1]].colour == answer
            elif kind == "shape":
                assert by_colour[words[-2]].shape == answer
            elif kind == "count":
                assert answer == ["one", "two", "three", "four"][len(scene.objects) - 1]
            elif kind == "relation":
                first, second = by_shape[words[4]], by_shape[words[-1]]
                dx, dy = first.center[0] - second.center[0], first.center[1] - second.center[1]
                expected = ("to the left" if dx < 0 else "to the right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
                assert answer == expected
            else:
                colour, shape = words[3], words[4]
                present = shape in by_shape and by_shape[shape].colour == colour
                assert answer == ("yes" if present else "no")


def test_small_objects_are_at_most_two_patches_across_and_are_drawn():
    small = total = 0
    for index in range(100):
        scene, _ = scenes.scene_for(scenes.TRAIN_STREAM, index)
        pixels = np.asarray(scenes.render(scene)).astype(int)
        for item in scene.objects:
            total += 1
            if item.size == "small":
                small += 1
                assert item.extent <= 2 * 14 - 6
            x, y = (int(round(c)) for c in item.center)
            if item.shape != "triangle":  # a triangle's centre can sit on its edge
                assert np.abs(pixels[y, x] - np.array(scenes.COLOURS[item.colour])).max() <= 16
    assert 0.3 <= small / total <= 0.5


def test_held_out_scenes_are_never_training_scenes():
    """TinyMMBench's, TinyCOCO's (the caption stream) and the calibration stream's scenes are none of
    the training scenes, nor of each other (a review made the caption and calibration streams the
    training stream and the MCQ-only version of this test still passed)."""
    def pixels(stream, count):
        return {np.asarray(scenes.render(scenes.scene_for(stream, i)[0])).tobytes() for i in range(count)}

    training = pixels(scenes.TRAIN_STREAM, 300)
    held_out = {np.asarray(held_out_question(index)[0]).tobytes() for index in range(20)}
    captions, calibration = pixels(scenes.CAPTION_STREAM, 40), pixels(scenes.CALIBRATION_STREAM, 40)
    assert len(held_out) == 20 and len(captions) == 40 and len(calibration) == 40
    assert not (held_out & training) and not (captions & training) and not (calibration & training)
    assert not (captions & calibration) and not (held_out & calibration)


def test_training_draws_only_from_the_training_stream_and_the_sets_never_from_it(tmp_path, monkeypatch):
    """The pixel test above compares streams; this one records which (stream, index) every consumer
    asks `scene_for` for: a short run of every training phase and the tokenizer's corpus must use the
    training stream alone, the held-out sets and the calibration images never (a trainer drawing its
    scenes from the MCQ stream passed the pixel test, which rebuilds training scenes itself)."""
    from hybrid_vlm import testbed
    from hybrid_vlm.testbed.calibration import calibration_pixels
    from hybrid_vlm.testbed.train import TrainSettings, train
    from vlmeval_plugin import tiny_data

    asked: list[tuple[str, int, int]] = []
    phase = ["none"]
    original = scenes.scene_for

    def recording(stream, index):
        asked.append((phase[0], stream, index))
        return original(stream, index)

    monkeypatch.setattr(scenes, "scene_for", recording)
    model, processor = build_untrained(0)
    phase[0] = "training"
    train(model, processor, TrainSettings(window_steps=1, window_batch_scenes=2, vision_steps=1, vision_batch_images=2, steps=1,
                                          batch_images=2, warmup_steps=1), tmp_path / "log.jsonl", progress=False)
    testbed._tokenizer_corpus()
    phase[0] = "sets"
    tiny_data.build_mcq_table(num_questions=5)
    tiny_data.build_caption_table(num_images=3)
    phase[0] = "calibration"
    calibration_pixels(processor.image_processor, 2)
    streams = {name: {stream for used, stream, _ in asked if used == name} for name in ("training", "sets", "calibration")}
    assert streams == {"training": {scenes.TRAIN_STREAM}, "sets": {scenes.MCQ_STREAM, scenes.CAPTION_STREAM},
                       "calibration": {scenes.CALIBRATION_STREAM}}
    assert len({scenes.TRAIN_STREAM, scenes.MCQ_STREAM, scenes.CAPTION_STREAM, scenes.CALIBRATION_STREAM}) == 4


# ---- training input --------------------------------------------------------------------------
def test_prompts_are_the_plugins(tmp_path):
    """The strings the testbed is trained on are those the VLMEvalKit plugin sends (in a subprocess:
    importing vlmeval changes torch's global state)."""
    script = (
        "import json, pandas as pd\n"
        "from vlmeval_plugin.model import HybridLLaVA, llava_mcq_prompt\n"
        "row = pd.Series({'question': 'What colour is the cross?', 'hint': None, 'A': 'red', 'B': 'blue', 'C': 'green', 'D': None})\n"
        "mcq, _ = HybridLLaVA.conversation(None, [{'type': 'image', 'value': 'x.jpg'}, {'type': 'text', 'value': llava_mcq_prompt(row)}])\n"
        "from vlmeval.dataset.image_caption import ImageCaptionDataset\n"
        "import inspect; source = inspect.getsource(ImageCaptionDataset.load_data)\n"
        "print(json.dumps({'mcq': mcq, 'caption_source': source}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    plugin = json.loads(result.stdout.strip().splitlines()[-1])
    assert plugin["mcq"] == conversation(mcq_text("What colour is the cross?", ("red", "blue", "green")))
    assert "Please describe this image in general. Directly provide the description, '" in plugin["caption_source"]
    assert CAPTION_PROMPT.startswith("Please describe this image in general. Directly provide the description, ")


@pytest.fixture(scope="module")
def untrained():
    model, processor = build_untrained(seed=3)
    return model.eval(), processor


def test_packed_segments_equal_each_prompt_alone(untrained):
    """A packed training sequence gives every segment the logits the stock forward gives that prompt alone."""
    model, processor = untrained
    image, segments, _ = training_segments(5)
    segments = segments[:3] + segments[-1:]
    packed = pack(processor.tokenizer, model.config.image_token_id, model.config.image_seq_length, segments)
    batch = collate([packed], processor.tokenizer.pad_token_id)
    pixel_values = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = packed_logits(model, pixel_values, batch, batch["target_rows"], batch["target_columns"])
        start = 0
        for text, target, *_ in segments:
            answer = processor.tokenizer(target, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
            inputs = processor(images=[image], text=[conversation(text)], return_tensors="pt")
            prompt_length = inputs["input_ids"].shape[1]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer[:-1]])], dim=1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            expected = model(**inputs).logits[0, prompt_length - 1 :]  # the logits that predict each answer token
            got = logits[start : start + len(answer)]
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
            start += len(answer)


def test_only_a_one_letter_answer_is_packed_as_an_option_choice(untrained):
    """`target in LETTERS` was a substring test: a caption "AB" or an empty answer counted as a letter."""
    model, processor = untrained
    image, segments, _ = training_segments(5)
    mcq = next(segment for segment in segments if len(segment.target) == 1)
    for target, letters in ((mcq.target, 1), ("AB", 0), ("", 0)):
        packed = pack(processor.tokenizer, model.config.image_token_id, model.config.image_seq_length, [mcq._replace(target=target)])
        assert len(packed.letter_positions) == letters


def test_window_features_are_the_stock_tower_on_that_window(untrained):
    """A window's features equal stock CLIP run on the window alone with the full grid's position
    embeddings at the window's patches (a stock CLIPVisionModel at 112 px given those rows)."""
    from transformers import CLIPVisionModel

    from hybrid_vlm.hf_compat.clip import window_image_features

    model, processor = untrained
    tower, config = model.model.vision_tower, model.config
    pixel_values = processor.image_processor([scenes.render(scenes.scene_for(scenes.TRAIN_STREAM, 7)[0])], return_tensors="pt")["pixel_values"]
    row, column, side = 5, 11, 8
    window = pixel_values[:, :, row * 14 : (row + side) * 14, column * 14 : (column + side) * 14]
    small = CLIPVisionModel(tower.config.__class__(**{**tower.config.to_dict(), "image_size": side * 14})).eval()
    state = {k: v for k, v in tower.state_dict().items() if "position_embedding" not in k}
    grid = torch.arange(24 * 24).reshape(24, 24)[row : row + side, column : column + side].flatten() + 1
    state["embeddings.position_embedding.weight"] = tower.embeddings.position_embedding.weight[torch.cat([torch.zeros(1, dtype=torch.long), grid])]
    small.load_state_dict(state, strict=False)
    with torch.no_grad():
        hidden = small(window, output_hidden_states=True).hidden_states[config.vision_feature_layer][:, 1:]
        expected = model.model.multi_modal_projector(hidden)
        got = window_image_features(model, window, torch.tensor([[row, column]]))
    assert got.shape == (1, side * side, config.text_config.hidden_size)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_each_window_holds_its_whole_object():
    """object_windows places one window per labelled object, inside the grid, covering every patch
    patch_objects gives that object; window_batch marks exactly those objects whole."""
    from hybrid_vlm.testbed.train import WINDOW, TrainSettings, object_windows, window_batch

    for index in range(40):
        scene, rng = scenes.scene_for(scenes.TRAIN_STREAM, index)
        owner = scenes.patch_objects(scene).reshape(24, 24)
        origins = object_windows(owner.flatten(), rng)
        labelled = [n for n in range(1, len(scene.objects) + 1) if (owner == n).any()]
        assert len(origins) == len(labelled)
        for number, (row, column) in zip(labelled, origins):
            assert 0 <= row <= 24 - WINDOW and 0 <= column <= 24 - WINDOW
            rows, columns = np.nonzero(owner == number)
            assert rows.min() >= row and rows.max() < row + WINDOW and columns.min() >= column and columns.max() < column + WINDOW
    _, processor = build_untrained(seed=3)
    windows, origins, (owners, objects, whole) = window_batch(0, TrainSettings(window_batch_scenes=4), processor)
    assert windows.shape[1:] == (3, WINDOW * 14, WINDOW * 14) and owners.shape[1] == WINDOW * WINDOW
    for window_owner, is_whole in zip(owners, whole):
        present = set(window_owner.unique().tolist()) - {0}
        assert all(is_whole[n - 1] <= (n in present) for n in range(1, 5))
        assert any(is_whole[n - 1] for n in present)  # its own object, at least


def test_training_is_seeded_and_runs_every_phase(tmp_path):
    """Two runs of a few steps of every phase from the same seed give identical weights and logs;
    the weights move, and what train() leaves loads with stock from_pretrained."""
    from transformers import LlavaForConditionalGeneration

    from hybrid_vlm.testbed.train import TrainSettings, train

    settings = TrainSettings(window_steps=2, window_batch_scenes=2, vision_steps=1, vision_batch_images=2, steps=1, batch_images=2, warmup_steps=1)
    runs = []
    for number in range(2):
        model, processor = build_untrained(settings.seed)
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        log = train(model, processor, settings, tmp_path / f"log{number}.jsonl", progress=False)
        runs.append((model.state_dict(), [{k: v for k, v in r.items() if k != "seconds"} for r in log]))
    assert [r["phase"] for r in runs[0][1]] == ["window", "window", "vision", "language"]
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][name], runs[1][0][name]) for name in runs[0][0])
    assert not torch.equal(before["model.vision_tower.embeddings.patch_embedding.weight"], runs[1][0]["model.vision_tower.embeddings.patch_embedding.weight"])
    model.save_pretrained(tmp_path / "checkpoint")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "checkpoint", **NO_HUB_KERNELS)
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in model.state_dict().items())


def test_language_learning_rate_sets_only_the_language_phase_peak(tmp_path):
    from hybrid_vlm.testbed.train import TrainSettings, train

    settings = TrainSettings(
        window_steps=1, window_batch_scenes=2, vision_steps=1, vision_batch_images=2, vision_warmup_steps=1,
        steps=1, batch_images=2, warmup_steps=1, learning_rate=2e-3, language_learning_rate=4e-4,
    )
    model, processor = build_untrained(settings.seed)
    log = train(model, processor, settings, tmp_path / "log.jsonl", progress=False)
    rates = {record["phase"]: record["lr"] for record in log}  # one step each: warm-up ends at the peak
    assert rates == pytest.approx({"window": 2e-3, "vision": 2e-3, "language": 4e-4})


@pytest.mark.parametrize("rate", [0.0, -1e-3])
def test_a_non_positive_language_learning_rate_is_refused_by_name(rate):
    from hybrid_vlm.testbed.train import TrainSettings

    with pytest.raises(ValueError, match="--language-lr"):
        TrainSettings(language_learning_rate=rate)


def test_a_training_run_records_what_a_bitwise_rerun_must_match(tmp_path):
    """train_summary.json records the code, the package builds, the CPU and the weights' hash (the
    shipped run's record lacked them, so its card's rerun condition could not be checked)."""
    import hashlib

    from hybrid_vlm.testbed import cli

    cli.main(["train", "--out", str(tmp_path), "--steps", "1", "--batch-images", "1", "--window-steps", "0", "--vision-steps", "0",
              "--threads", "1", "--quiet"])
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["weights_sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert summary["git"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "model name" in cpuinfo:
        assert f"model name\t: {summary['cpu']}" in cpuinfo
        assert all(f" {flag}" in cpuinfo for flag in summary["cpu_flags_bf16"])
    assert any("oneDNN" in line or "MKL" in line or "BLAS" in line for line in summary["torch_build"])
    assert "Build settings" not in (tmp_path / "train_summary.json").read_text()  # its build machine's paths
    assert summary["torch"] == torch.__version__ and summary["versions"]["numpy"] == np.__version__
    assert summary["scenes_drawn"] == {"window": 0, "vision": 0, "language": 1}


@pytest.mark.parametrize("argv,named", [
    (["train", "--out", "X", "--steps", "0"], "--steps"),
    (["train", "--out", "X", "--batch-images", "0"], "--batch-images"),
    (["train", "--out", "X", "--window-steps", "-1"], "--window-steps"),
    (["train", "--out", "X", "--threads", "0"], "--threads 0"),
    (["calibrate", "--out", "X", "--images", "0"], "--images 0"),
    (["calibrate", "--out", "X", "--targets", "mid", "bogus"], "--targets bogus"),
    (["calibrate", "--out", "X", "--model", "missing", "--targets", "bogus"], "--model missing"),  # was a traceback in from_pretrained
    (["calibrate", "--out", "X", "--remeasure"], "--remeasure"),  # no file to re-measure there
    (["train", "--out", "a-file"], "--out a-file"),  # was a FileExistsError traceback
])
def test_testbed_cli_refuses_bad_settings_before_any_work(tmp_path, monkeypatch, capsys, argv, named):
    """Each is a usage error (exit 2) naming the setting, before training or calibrating starts:
    --steps 0 trained and saved, then failed on an empty mean; --batch-images 0 failed after the
    first two phases (8 minutes); --targets mid bogus wrote the mid file, then failed."""
    from hybrid_vlm.testbed import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(cli, "train", lambda *a, **k: pytest.fail("training started"))
    import hybrid_vlm.testbed.calibration as calibration

    monkeypatch.setattr(calibration, "calibrate_testbed", lambda *a, **k: pytest.fail("calibration started"))
    monkeypatch.setattr(calibration, "remeasure_testbed", lambda *a, **k: pytest.fail("measuring started"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


def test_calibrating_another_checkpoint_writes_beside_it_not_into_the_shipped_one(tmp_path, monkeypatch):
    """--out defaulted to the shipped checkpoint's thresholds whatever --model was: calibrating a
    retrained testbed replaced the shipped files with ones the shipped model then refuses."""
    import shutil

    import hybrid_vlm.testbed.calibration as calibration
    from hybrid_vlm.testbed import CHECKPOINT_DIR, THRESHOLDS_DIR, cli

    other = tmp_path / "retrained"
    other.mkdir()
    shutil.copy(CHECKPOINT_DIR / "config.json", other / "config.json")
    written_to = []
    monkeypatch.setattr(calibration, "calibrate_testbed", lambda model, out, targets, images: written_to.append(Path(out)) or [])
    cli.main(["calibrate", "--model", str(other)])
    cli.main(["calibrate"])
    assert written_to == [other / "dymu-thresholds", THRESHOLDS_DIR]


@pytest.mark.parametrize("total,warmup", [(50, 100), (10, 20), (1, 20), (1800, 100)])
def test_every_phase_reaches_its_peak_rate(total, warmup):
    """The card says every phase warms up to its peak; a phase shorter than its warm-up (--steps 50
    against 100 warm-up steps) stopped at half the peak. A long one still ends at a tenth of it."""
    from hybrid_vlm.testbed.train import learning_rate

    rates = [learning_rate(step, 2e-3, warmup, total) for step in range(total)]
    assert max(rates) == pytest.approx(2e-3)
    if total > warmup:
        assert learning_rate(total, 2e-3, warmup, total) == pytest.approx(2e-4)


# ---- the named-object attention loss ------------------------------------------------------------
def test_each_question_is_about_the_objects_its_text_names():
    """`Question.about` checked against the question's own words, object by object."""
    for index in range(200):
        scene, rng = scenes.scene_for(scenes.TRAIN_STREAM, index)
        for kind in scenes.QUESTION_KINDS:
            question = scenes.ask(scene, kind, rng)
            if question is None:
                continue
            named = [scene.objects[number] for number in question.about]
            text = question.question
            if kind == "colour":
                assert [f"the {o.shape}?" in text for o in named] == [True]
            elif kind == "shape":
                assert [f"the {o.colour} object?" in text for o in named] == [True]
            elif kind == "relation":
                assert text == f"Where is the {named[0].name} relative to the {named[1].name}?"
            elif kind == "existence":  # the object of the named colour, if the scene has one
                colour = text.split()[3]
                assert [o.colour for o in named] == [o.colour for o in scene.objects if o.colour == colour]
            else:
                assert named == []


def test_watched_head_attention_is_the_stock_eager_attention_of_each_prompt_alone(untrained):
    """packed_head_attention from each question's last prompt token, in a packed sequence, equals
    the attention weights stock eager transformers returns for that prompt alone (its keys), and is
    exactly zero on the other segments' tokens."""
    from hybrid_vlm.testbed.train import packed_forward

    model, processor = untrained
    image, segments, _ = training_segments(11)
    segments = [segment for segment in segments if segment.about][:3] + segments[-1:]
    packed = pack(processor.tokenizer, model.config.image_token_id, model.config.image_seq_length, segments)
    batch = collate([packed, packed], processor.tokenizer.pad_token_id)
    pixel_values = processor.image_processor([image, image], return_tensors="pt")["pixel_values"]
    layer, head = 3, 2
    rows, columns = batch["looking_rows"], batch["looking_columns"]
    with torch.no_grad():
        looking = packed_forward(model, pixel_values, batch, rows, columns, watches={"looking": (layer, head)}).looking
        watched_full = _full_watched_rows(model, pixel_values, batch, layer, head)
    model.set_attn_implementation("eager")
    try:
        for number, segment in enumerate(segments[:3]):
            inputs = processor(images=[image], text=[conversation(segment.text)], return_tensors="pt")
            with torch.no_grad():
                stock = model(**inputs, output_attentions=True).attentions[layer][0, head, -1]  # [prompt length]
            got = watched_full[number]
            visible_mask = batch["attention_mask"][0, 0, columns[number]]
            visible = visible_mask.nonzero().flatten()
            assert torch.allclose(got[visible], stock, atol=1e-5)
            assert bool((got[~visible_mask] == 0).all())
            image_columns = slice(packed.image_start, packed.image_start + 576)
            assert torch.allclose(looking[number], got[image_columns])
    finally:
        model.set_attn_implementation("sdpa")


def _full_watched_rows(model, pixel_values, batch, layer, head):
    from hybrid_vlm.hf_compat.llava import llava_parts, packed_head_attention, stock_image_features

    parts = llava_parts(model)
    embeds = parts.embed_tokens(batch["input_ids"])
    slots = (batch["input_ids"] == parts.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(slots, stock_image_features(model, pixel_values))
    return packed_head_attention(
        model, embeds, batch["attention_mask"], batch["position_ids"], [(layer, head, batch["looking_rows"], batch["looking_columns"])]
    )[1][0]


def test_attention_loss_is_minus_log_of_the_mass_on_the_named_patches():
    """Hand-made attention: uniform over 576 patches, a question about object 2 owning 4 patches
    (mass 4/576), one about object 1 that owns none (no target: skipped)."""
    from hybrid_vlm.testbed.train import named_object_attention_loss

    owner = torch.zeros(1, 576, dtype=torch.long)
    owner[0, [10, 11, 34, 35]] = 2
    looking = torch.full((2, 576), 1 / 576)
    batch = dict(looking_rows=torch.tensor([0, 0]), looking_objects=torch.tensor([[2, 0, 0, 0], [1, 0, 0, 0]]))
    loss, mass = named_object_attention_loss(looking, owner, batch)
    assert float(loss) == pytest.approx(np.log(144.0))
    assert mass == pytest.approx(4 / 576)


def test_attention_loss_trains_only_when_weighted(tmp_path):
    """With a weight the language log carries the loss and the watched head's mass; without, neither."""
    from hybrid_vlm.testbed.train import TrainSettings, train

    logged = {}
    for weights in ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5)):
        settings = TrainSettings(
            window_steps=0, vision_steps=0, steps=1, batch_images=2, warmup_steps=1, attention_weight=weights[0], option_attention_weight=weights[1]
        )
        model, processor = build_untrained(settings.seed)
        logged[weights] = train(model, processor, settings, tmp_path / f"log{weights}.jsonl", progress=False)[-1]
    named, option = ("attention_loss", "named_attention"), ("option_attention_loss", "option_attention")
    assert not any(key in logged[0.0, 0.0] for key in named + option)
    assert logged[0.5, 0.0]["attention_loss"] > 0 and 0 < logged[0.5, 0.0]["named_attention"] < 1
    assert not any(key in logged[0.5, 0.0] for key in option) and not any(key in logged[0.0, 0.5] for key in named)
    assert logged[0.0, 0.5]["option_attention_loss"] > 0 and 0 < logged[0.0, 0.5]["option_attention"] < 1
    assert logged[0.5, 0.0]["answer_loss"] == pytest.approx(logged[0.0, 0.0]["answer_loss"])  # the same forward, before the step
    assert logged[0.0, 0.5]["answer_loss"] == pytest.approx(logged[0.0, 0.0]["answer_loss"])


@pytest.mark.parametrize("weight", [-0.1, float("nan")])
@pytest.mark.parametrize(
    "setting, flag",
    [("attention_weight", "--attention-weight"), ("option_attention_weight", "--option-attention-weight"), ("answer_probe_weight", "--answer-probe-weight")],
)
def test_a_negative_attention_weight_is_refused_by_name(weight, setting, flag):
    from hybrid_vlm.testbed.train import TrainSettings

    with pytest.raises(ValueError, match=flag):
        TrainSettings(**{setting: weight})


def test_the_right_options_span_holds_its_line_and_nothing_else(untrained):
    """Each MCQ segment's choosing span, decoded from the packed tokens, is its right option's line
    ("B. circle"), found here from the segment's own text."""
    model, processor = untrained
    _, segments, _ = training_segments(4)
    packed = pack(processor.tokenizer, model.config.image_token_id, model.config.image_seq_length, segments)
    questions = [segment for segment in segments if segment.target in "ABCD" and len(segment.target) == 1]
    assert len(packed.choosing_spans) == len(questions) > 0
    for segment, (start, end), query in zip(questions, packed.choosing_spans, packed.choosing_positions):
        line = next(text for text in segment.text.split("\n") if text.startswith(segment.target + ". "))
        assert processor.tokenizer.decode(packed.input_ids[start:end]).strip() == line
        assert start < query and packed.segment_ids[start] == packed.segment_ids[query]
    batch = collate([packed], processor.tokenizer.pad_token_id)
    assert batch["choosing_targets"].sum(-1).tolist() == [end - start for start, end in packed.choosing_spans]


def test_option_attention_loss_is_minus_log_of_the_mass_on_the_line():
    from hybrid_vlm.testbed.train import right_option_attention_loss

    choosing = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    targets = torch.tensor([[False, True, True, False], [True, False, False, False]])
    loss, mass = right_option_attention_loss(choosing, dict(choosing_targets=targets))
    assert float(loss) == pytest.approx(-(np.log(0.5) + np.log(0.25)) / 2)
    assert mass == pytest.approx(0.375)


def test_answer_states_are_the_stock_layer_input_of_each_prompt_alone(untrained):
    """The answer probe's states, in a packed sequence, equal the input of that LLM layer at the
    prompt's last token in stock transformers' `output_hidden_states` for each MCQ prompt alone, and
    each answer target is the words of the segment's right option line."""
    from hybrid_vlm.testbed.train import packed_forward

    model, processor = untrained
    image, segments, _ = training_segments(7)
    questions = [segment for segment in segments if segment.answer][:3]
    packed = pack(processor.tokenizer, model.config.image_token_id, model.config.image_seq_length, questions + segments[-1:])
    batch = collate([packed], processor.tokenizer.pad_token_id)
    pixel_values = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    layer = 5
    with torch.no_grad():
        states = packed_forward(model, pixel_values, batch, batch["target_rows"], batch["target_columns"], answer_layer=layer).answer_states
        assert states.shape == (len(questions), model.config.text_config.hidden_size)
        for number, segment in enumerate(questions):
            inputs = processor(images=[image], text=[conversation(segment.text)], return_tensors="pt")
            stock = model(**inputs, output_hidden_states=True).hidden_states[layer][0, -1]  # [i]: the input of layer i
            assert torch.allclose(states[number], stock, atol=1e-4, rtol=1e-4)
            line = next(text for text in segment.text.split("\n") if text.startswith(segment.target + ". "))
            assert scenes.ANSWERS[int(batch["answers"][number])] == line[3:]


def test_answer_probe_trains_only_when_weighted_and_leaves_the_forward_alone(tmp_path):
    """The first step's forward is the same with or without the probe; its gradient changes the second."""
    from hybrid_vlm.testbed.train import TrainSettings, train

    logged = {}
    for weight in (0.0, 0.5):
        settings = TrainSettings(window_steps=0, vision_steps=0, steps=2, batch_images=2, warmup_steps=1, answer_probe_weight=weight)
        model, processor = build_untrained(settings.seed)
        logged[weight] = train(model, processor, settings, tmp_path / f"log{weight}.jsonl", progress=False)
    assert not any("answer_probe_loss" in record or "answer_probe" in record for record in logged[0.0])
    assert logged[0.5][0]["answer_probe_loss"] > 0 and 0 <= logged[0.5][0]["answer_probe"] <= 1
    assert logged[0.5][0]["answer_loss"] == pytest.approx(logged[0.0][0]["answer_loss"])  # the same forward, before the step
    assert logged[0.5][1]["answer_loss"] != pytest.approx(logged[0.0][1]["answer_loss"], abs=1e-6)


def test_answer_probe_loss_skips_answers_not_given():
    from hybrid_vlm.testbed.train import answer_probe_loss_and_accuracy

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    loss, accuracy = answer_probe_loss_and_accuracy(logits, torch.tensor([0, -100, 1]))
    expected = (torch.logsumexp(logits[0], 0) - 2.0 + torch.logsumexp(logits[2], 0) - 0.0) / 2
    assert float(loss) == pytest.approx(float(expected)) and accuracy == 0.5
    loss, accuracy = answer_probe_loss_and_accuracy(logits, torch.tensor([-100, -100, -100]))
    assert float(loss) == 0.0 and np.isnan(accuracy)


def test_training_refuses_option_tokens_the_tokenizer_does_not_have(tmp_path):
    from hybrid_vlm.testbed.train import TrainSettings, train

    model, processor = build_untrained(0)
    with pytest.raises(ValueError, match="option_tokens"):
        train(model, processor, TrainSettings(window_steps=0, vision_steps=0, steps=1, option_tokens=True), tmp_path / "log.jsonl", progress=False)


def test_option_tokens_make_each_option_line_one_token_and_are_off_by_default():
    """With option tokens every option line of an MCQ prompt is one token that decodes to the line;
    by default the tokenizer is the shipped checkpoint's (no such token)."""
    from hybrid_vlm.testbed import CHECKPOINT_DIR, build_tokenizer

    merged, plain = build_tokenizer(option_tokens=True), build_tokenizer()
    assert len(merged) == len(plain) + 4 * len(scenes.ANSWERS)
    from transformers import AutoTokenizer

    assert plain.get_vocab() == AutoTokenizer.from_pretrained(CHECKPOINT_DIR).get_vocab()
    options = ("to the left", "above", "below", "to the right")
    text = conversation(mcq_text("Where is the red circle relative to the blue square?", options))
    pieces = [merged.decode([token]) for token in merged(text)["input_ids"]]
    for letter, option in zip("ABCD", options):
        assert f"{letter}. {option}" in pieces
        assert not any(f"{letter}. {option}" in piece for piece in (plain.decode([t]) for t in plain(text)["input_ids"]))
    assert merged.decode(merged(text, add_special_tokens=False)["input_ids"]) == text


def test_load_for_training_gives_back_the_saved_weights_in_fp32(tmp_path, untrained):
    from hybrid_vlm.testbed import load_for_training

    model, processor = untrained
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_for_training(tmp_path)
    assert loaded.config._attn_implementation == "sdpa"
    assert all(tensor.dtype == torch.float32 for tensor in loaded.state_dict().values() if tensor.is_floating_point())
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in model.state_dict().items())
    assert loaded_processor.tokenizer("a red circle")["input_ids"] == processor.tokenizer("a red circle")["input_ids"]


def test_continuing_the_language_phase_logs_each_step_and_saves_what_it_trained(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from hybrid_vlm.testbed.train import TrainSettings, continue_language_phase

    model, processor = build_untrained(seed=5)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    continue_language_phase(model, processor, TrainSettings(steps=2, batch_images=1, warmup_steps=1), tmp_path)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [("language", 0), ("language", 1)]
    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path, **NO_HUB_KERNELS).state_dict()
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())
    assert not torch.equal(saved["lm_head.weight"], before["lm_head.weight"])


def test_the_card_prints_each_optional_training_flag_only_when_it_is_set(tmp_path):
    """The card's train command, from the shipped run's files with its settings edited: a set rate or
    a non-zero weight appears as its flag; the shipped run's defaults print none of them."""
    import shutil

    from hybrid_vlm.testbed import CHECKPOINT_DIR
    from hybrid_vlm.testbed.card import REPORT_DIR, card_text

    for name in ("train_summary.json", "train_log.jsonl", "config.json"):
        shutil.copy(CHECKPOINT_DIR / name, tmp_path / name)
    shipped = card_text(tmp_path, REPORT_DIR)
    flags = ("--language-lr", "--attention-weight", "--option-attention-weight", "--answer-probe-weight", "--option-tokens")
    assert not any(flag in shipped for flag in flags)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    summary["settings"] |= dict(language_learning_rate=0.001, attention_weight=0.3, attention_layer=4, attention_head=0, option_attention_weight=0.0)
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    edited = card_text(tmp_path, REPORT_DIR)
    assert " --language-lr 0.001 --attention-weight 0.3\n" in edited
    assert "--option-attention-weight" not in edited
    summary["settings"] |= dict(answer_probe_weight=0.3, answer_probe_layer=6, option_tokens=True)
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    probed = card_text(tmp_path, REPORT_DIR)
    assert " --attention-weight 0.3 --answer-probe-weight 0.3 --option-tokens\n" in probed
    assert "0.3 times a training-only linear probe" in probed and "training-only linear probe" not in edited


def test_the_text_prior_reads_words_not_letters_and_the_readme_quotes_the_committed_floors():
    """The text prior's circular accuracy is its plain accuracy only if its choice follows the option's
    words through every rotation; and the README's image-blind floors are the committed file's."""
    import re
    from collections import Counter

    from hybrid_tools.blind_baselines import prior_choice

    seen = Counter({"red": 5, "blue": 9, "green": 9})
    options = ("red", "green", "blue", "yellow")
    chosen = {prior_choice(options[shift:] + options[:shift], seen) for shift in range(4)}
    assert len(chosen) == 1 and chosen <= {"blue", "green"}  # the most frequent, the same in every rotation
    assert prior_choice(("no", "yes"), Counter()) == prior_choice(("yes", "no"), Counter())

    repo = Path(__file__).resolve().parents[1]
    blind = json.loads((repo / "reports" / "testbed" / "blind_baselines.json").read_text())
    readme = " ".join((repo / "README.md").read_text().split())
    prior, constant = blind["TinyMMBench"], blind["TinyCOCO"]
    assert re.search(rf"on {prior['training_scenes']:,} training scenes scores {prior['circular_accuracy']:.1f}% circular "
                     rf"\(counting {prior['by_kind']['count']:.0f}%\)", readme)
    assert f"one training caption given to every image scores CIDEr {constant['cider']:.1f}" in readme
    fresh = prior["fresh_questions"]
    assert (f"on {fresh['questions']:,} fresh questions of the same kinds the rule scores {fresh['accuracy']:.1f}%, "
            f"counting {fresh['by_kind']['count']:.1f}%") in readme
