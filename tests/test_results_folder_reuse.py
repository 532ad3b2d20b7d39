"""A results folder is named by the method setting only, so a rerun with another checkpoint or
another --max-new-tokens would land in the same folder, and VLMEvalKit would reuse the earlier
predictions as the new run's. run.py refuses such a rerun, telling the two runs apart by the
checkpoint's content signature (not its path) and the generation length."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hybrid_vlm.provenance import checkpoint_signature
from hybrid_vlm.tiny import build_tiny_llava
from vlmeval_plugin import settings
from vlmeval_plugin.cli import reuse_conflict


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny checkpoints of one shape and config that differ only in their weights (seeds 0 and
    1: a same-shape fine-tune), and a byte-for-byte copy of the first at another path."""
    root = tmp_path_factory.mktemp("checkpoints")
    for seed in (0, 1):
        model, processor = build_tiny_llava(seed=seed)
        model.save_pretrained(root / f"seed{seed}")
        processor.save_pretrained(root / f"seed{seed}")
    shutil.copytree(root / "seed0", root / "moved" / "seed0")
    return root


def test_signature_follows_the_weights_and_config_not_the_path(checkpoints):
    original = checkpoint_signature(checkpoints / "seed0")
    config_a = json.loads((checkpoints / "seed0" / "config.json").read_text())
    config_b = json.loads((checkpoints / "seed1" / "config.json").read_text())
    sizes = [path.stat().st_size for path in (checkpoints / "seed0" / "model.safetensors", checkpoints / "seed1" / "model.safetensors")]
    assert config_a == config_b and sizes[0] == sizes[1]  # only the weights tell them apart
    assert checkpoint_signature(checkpoints / "moved" / "seed0") == original
    assert checkpoint_signature(checkpoints / "seed1") != original

    edited = checkpoints / "edited"
    shutil.copytree(checkpoints / "seed0", edited)
    config_a["text_config"]["rms_norm_eps"] = 1e-5 if config_a["text_config"].get("rms_norm_eps") != 1e-5 else 1e-6
    (edited / "config.json").write_text(json.dumps(config_a))
    assert checkpoint_signature(edited) != original


def test_signature_ignores_the_release_stamp_and_training_leftovers_not_a_projector_fine_tune(checkpoints):
    """Re-saved under another transformers (only `transformers_version` differs) or copied with a
    Trainer's leftovers beside it: the same weights. The projector alone trained: other weights."""
    from safetensors.torch import load_file, save_file

    original = checkpoint_signature(checkpoints / "seed0")
    resaved = checkpoints / "resaved"
    shutil.copytree(checkpoints / "seed0", resaved)
    config = json.loads((resaved / "config.json").read_text())
    config["transformers_version"] = "5.99.0"
    (resaved / "config.json").write_text(json.dumps(config, indent=4))
    (resaved / "optimizer.pt").write_bytes(b"adam state")
    (resaved / "training_args.bin").write_bytes(b"args")
    assert checkpoint_signature(resaved) == original

    projector = checkpoints / "projector-tuned"
    shutil.copytree(checkpoints / "seed0", projector)
    tensors = load_file(projector / "model.safetensors")
    names = [name for name in tensors if "multi_modal_projector" in name]
    assert names
    for name in names:
        tensors[name] = tensors[name] + 1e-3 * torch.randn_like(tensors[name])
    save_file(tensors, projector / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_signature(projector) != original


def plugin_model(checkpoint: Path, name: str = "llava_v1.5_7b_fastv"):
    """What reuse_conflict reads of a cli.PluginModel."""
    return SimpleNamespace(variant=settings.VARIANTS[name], checkpoint=checkpoint, signature=checkpoint_signature(checkpoint), config=None)


def results_folder(tmp_path: Path, records: list[dict], outputs: bool = True) -> Path:
    folder = tmp_path / "llava_v1.5_7b_fastv__fastv-k64-l2"
    folder.mkdir()
    (folder / "run_info.json").write_text(json.dumps({"runs": records}))
    (folder / "status.json").write_text("{}")
    if outputs:
        (folder / "T20261206-000000").mkdir()
        (folder / "T20261206-000000" / "llava_v1.5_7b_fastv__fastv-k64-l2_TinyCOCO.xlsx").write_bytes(b"x")
    return folder


def test_a_rerun_with_another_generation_length_is_refused_naming_both(tmp_path, checkpoints):
    item = plugin_model(checkpoints / "seed0")
    folder = results_folder(tmp_path, [{"checkpoint": "seed0", "checkpoint_signature": item.signature, "max_new_tokens": 8}])
    problem = reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=16))
    assert problem is not None
    assert "--max-new-tokens 8; this run asks for 16" in problem and folder.name in problem and "--work-dir" in problem
    assert reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=8)) is None


def test_the_last_generating_record_is_what_a_rerun_is_held_to(tmp_path, checkpoints):
    """A folder generated at 8 tokens, then continued at 16: its outputs now hold 16-token rows, so a
    run at 16 continues and a run at 8 is refused (the first record is history)."""
    item = plugin_model(checkpoints / "seed0")
    run = {"checkpoint": "seed0", "checkpoint_signature": item.signature, "mode": "all"}
    folder = results_folder(tmp_path, [{**run, "max_new_tokens": 8}, {**run, "max_new_tokens": 16}])
    assert reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=16)) is None
    assert "--max-new-tokens 16; this run asks for 8" in reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=8))


def test_a_rerun_on_another_checkpoint_of_the_same_shape_is_refused_a_moved_one_is_not(tmp_path, checkpoints):
    earlier = plugin_model(checkpoints / "seed0")
    folder = results_folder(tmp_path, [{"checkpoint": "seed0", "checkpoint_signature": earlier.signature, "max_new_tokens": 8}])
    options = SimpleNamespace(max_new_tokens=8)
    problem = reuse_conflict(folder, plugin_model(checkpoints / "seed1"), options)
    assert problem is not None and f"content signature {earlier.signature}" in problem
    assert reuse_conflict(folder, plugin_model(checkpoints / "moved" / "seed0"), options) is None


def test_the_default_generation_length_is_what_an_older_record_ran(tmp_path, checkpoints):
    """Records written before the effective length was recorded hold the option as typed; None
    there was the variant's default, and they hold no signature, so the checkpoint is not judged."""
    item = plugin_model(checkpoints / "seed1")
    default = settings.max_new_tokens_for(item.variant)
    folder = results_folder(tmp_path, [{"checkpoint": "seed0", "options": {"max_new_tokens": None}}])
    assert reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=None)) is None
    assert reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=default)) is None
    assert f"--max-new-tokens {default}; this run asks for 3" in reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=3))


def test_a_folder_with_no_outputs_has_nothing_to_reuse(tmp_path, checkpoints):
    item = plugin_model(checkpoints / "seed1")
    folder = results_folder(tmp_path, [{"checkpoint": "seed0", "checkpoint_signature": "sha256:0", "max_new_tokens": 8}], outputs=False)
    assert reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=2)) is None
    assert reuse_conflict(tmp_path / "absent", item, SimpleNamespace(max_new_tokens=2)) is None
    import filelock

    with filelock.FileLock(str(folder / "status.json.lock")):  # the lock run.py gives VLMEvalKit leaves its file behind
        pass
    assert (folder / "status.json.lock").exists() and reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=2)) is None
    (folder / "run_info.json.4242.tmp").write_text("{")  # run_info's scratch file, left by a kill mid-write
    assert reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=2)) is None
    (folder / "m_Set.xlsx").write_text("")  # an output: now the record is compared
    assert "seed0" in reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=2))


def test_an_eval_only_record_is_not_what_the_predictions_were_made_with(tmp_path, checkpoints):
    """`--mode eval` generates nothing: its record (with the default length) neither blocks a resume
    of the run before it nor lets another length reuse that run's predictions."""
    item = plugin_model(checkpoints / "seed0")
    generated = {"checkpoint_signature": item.signature, "max_new_tokens": 16, "mode": "all"}
    folder = results_folder(tmp_path, [generated, {**generated, "max_new_tokens": 2048, "mode": "eval"}])
    assert reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=16)) is None
    assert "--max-new-tokens 16; this run asks for 2048" in reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=2048))


def test_another_device_or_thresholds_content_is_refused(tmp_path, checkpoints):
    item = plugin_model(checkpoints / "seed0")
    now = {"checkpoint_signature": item.signature, "max_new_tokens": 8, "device": "cpu", "dymu_thresholds_sha256": None}
    folder = results_folder(tmp_path, [{**now, "device": "cuda"}])
    options = SimpleNamespace(max_new_tokens=8)
    assert "on cuda; this run is on cpu" in reuse_conflict(folder, item, options, now=now)
    (folder / "run_info.json").write_text(json.dumps({"runs": [{**now, "dymu_thresholds_sha256": "sha256:aa"}]}))
    item.config = SimpleNamespace(dymu=str(tmp_path / "mid.json"))
    assert "with DyMU thresholds of content sha256:aa" in reuse_conflict(folder, item, options, now={**now, "dymu_thresholds_sha256": "sha256:bb"})
    assert reuse_conflict(folder, item, options, now={**now, "dymu_thresholds_sha256": "sha256:aa"}) is None


def test_a_generation_length_below_one_is_refused_before_anything_loads(tmp_path, checkpoints, capsys, monkeypatch):
    """--max-new-tokens 0 loaded the model and turned every row into a failed row (exit 1); it is a
    usage error now. A folder an older run recorded with 0 is named with 0, not with the default
    (a falsy 0 fell through an `or` chain to it)."""
    from vlmeval_plugin.cli import main

    monkeypatch.chdir(tmp_path)  # where a regression's run would write its outputs
    for value in ("0", "-3"):
        assert main(["--data", "TinyCOCO", "--model", "llava_tiny", "--max-new-tokens", value]) == 2
        assert f"--max-new-tokens must be >= 1, got {value}" in capsys.readouterr().err
    item = plugin_model(checkpoints / "seed0")
    folder = results_folder(tmp_path, [{"checkpoint": "seed0", "checkpoint_signature": item.signature, "max_new_tokens": 0}])
    assert "--max-new-tokens 0; this run asks for 5" in reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=5))


def test_a_torn_run_record_beside_outputs_is_refused_not_taken_as_no_record(tmp_path, checkpoints):
    """A kill while run_info.json was written in place left it torn; it was then read as no record,
    and a run with another --max-new-tokens (or checkpoint) reused the outputs. It is now written
    whole (a temporary file, replaced), and a torn one beside outputs stops the run."""
    item = plugin_model(checkpoints / "seed0")
    folder = results_folder(tmp_path, [{"checkpoint": "seed0", "checkpoint_signature": item.signature, "max_new_tokens": 2}])
    text = (folder / "run_info.json").read_text()
    (folder / "run_info.json").write_text(text[: len(text) // 2])
    problem = reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=3))
    assert problem is not None and "run_info.json: a run record that cannot be read" in problem and "--work-dir" in problem


def test_a_torn_run_record_is_kept_aside_by_an_eval_run_and_still_refused(tmp_path, checkpoints):
    """--mode eval is not checked for reuse; it appended its record to a torn run_info.json by
    starting it over, which erased the guard for the next generating run."""
    from vlmeval_plugin.cli import write_run_info

    item = plugin_model(checkpoints / "seed0")
    folder = results_folder(tmp_path, [{"checkpoint": "seed0", "checkpoint_signature": item.signature, "max_new_tokens": 2}])
    torn = (folder / "run_info.json").read_text()[:40]
    (folder / "run_info.json").write_text(torn)
    write_run_info(str(tmp_path), [folder.name], {}, ["python", "run.py"], False, SimpleNamespace(data=["TinyCOCO"], mode="eval", judge=None),
                   SimpleNamespace(model_path=None, batch_size=1, max_new_tokens=None), {})
    assert (folder / "run_info.json.unreadable").read_text() == torn
    problem = reuse_conflict(folder, item, SimpleNamespace(max_new_tokens=3))
    assert problem is not None and "run_info.json.unreadable: a run record that cannot be read" in problem


def _append_records(path: str, tag: str, count: int, barrier) -> None:
    from vlmeval_plugin.cli import append_run_record

    barrier.wait()  # both start appending together, after their imports
    for number in range(count):
        append_run_record(Path(path), {"tag": tag, "number": number})


def test_two_processes_appending_run_records_keep_every_record(tmp_path):
    """Each run.py appends its record by reading the runs and writing them back: without a lock, two
    processes on one folder dropped each other's records."""
    import json
    import multiprocessing

    path = tmp_path / "m" / "run_info.json"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_append_records, args=(str(path), tag, 150, barrier)) for tag in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    runs = json.loads(path.read_text())["runs"]
    assert sorted((r["tag"], r["number"]) for r in runs) == sorted((tag, n) for tag in ("a", "b") for n in range(150))
