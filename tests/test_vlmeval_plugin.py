"""run.py end to end on the tiny LLaVA and the bundled Tiny* sets, offline, on CPU.

Every VLMEvalKit run is a subprocess: `import vlmeval` switches autograd off and reseeds torch for
the whole process, which must not leak into the rest of the test session. The unit tests at the top
import only the vlmeval-free modules (settings, stats, tiny_data, hybrid_tools.sweep).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from hybrid_vlm import HybridConfig
from hybrid_vlm.testbed import CHECKPOINT_DIR as TESTBED_CHECKPOINT
from hybrid_vlm.tiny import build_tiny_llava
from vlmeval_plugin import settings, stats
from vlmeval_plugin.cli import DEMO_MODELS
from vlmeval_plugin.tiny_data import (
    CAPTION_IMAGES,
    CIRCULAR_OFFSET,
    MCQ_QUESTIONS,
    TINY_MCQ_NAME,
    build_caption_table,
    build_mcq_table,
    ensure_tiny_sets,
    image_to_base64,
    write_tsv,
)

from reference import official_keep_count

REPO = Path(__file__).resolve().parents[1]
RUN_PY = str(REPO / "run.py")
# a thresholds file's shape is read with the name's setting (its model only when a run loads it)
WELL_FORMED_THRESHOLDS = json.dumps({"format": "hybrid-vlm/dymu-thresholds/v2", "split": "official", "model": {}, "thresholds": [0.5]})
needs_vlmeval = pytest.mark.skipif(importlib.util.find_spec("vlmeval") is None, reason="ms-vlmeval is not installed")
# The end-to-end runs use short copies of the bundled sets (same generator, first questions and
# scenes) written into their sandbox's LMUData: the full sets are what `python run.py` evaluates.
SANDBOX_QUESTIONS = 10  # two of each kind: 4 circular copies each, 2 for the yes/no kind
SANDBOX_CAPTIONS = 8
MCQ_ROWS = len(build_mcq_table(SANDBOX_QUESTIONS))
CAPTION_ROWS = SANDBOX_CAPTIONS
FASTV_R05 = "llava_v1.5_7b_fastv__fastv-r0.5-l2"
FASTV_K72 = "llava_v1.5_7b_fastv__fastv-k72-l2"


# ---- unit tests: no vlmeval -------------------------------------------------------------------
def test_names_have_fixed_semantics_and_distinct_folders(tmp_path):
    assert settings.hybrid_config_for("llava_v1.5_7b", {"FASTV_K": "72"}) is None  # nothing patched
    fastv_default = settings.hybrid_config_for("llava_v1.5_7b_fastv", {})
    assert fastv_default == HybridConfig(fastv_k=0.5, fastv_layer=2)
    fastv_72 = settings.hybrid_config_for("llava_v1.5_7b_fastv", {"FASTV_K": "72", "DYMU_THRESHOLDS": "ignored.json"})
    assert fastv_72 == HybridConfig(fastv_k=72, fastv_layer=2)  # the fastv name never turns DyMU on
    names = {
        settings.effective_name("llava_v1.5_7b_fastv", settings.hybrid_config_for("llava_v1.5_7b_fastv", {"FASTV_K": k}))
        for k in ("576", "72", "0.5", "0.75")
    }
    assert names == {
        "llava_v1.5_7b_fastv__fastv-k576-l2",
        FASTV_K72,
        FASTV_R05,
        "llava_v1.5_7b_fastv__fastv-r0.75-l2",
    }
    thresholds = tmp_path / "mid.json"
    thresholds.write_text(WELL_FORMED_THRESHOLDS)
    dymu = settings.hybrid_config_for("llava_v1.5_7b_dymu", {"DYMU_THRESHOLDS": str(thresholds), "FASTV_K": "72"})
    assert dymu == HybridConfig(fastv_k=None, dymu=str(thresholds))
    hybrid = settings.hybrid_config_for("llava_v1.5_7b_hybrid", {"DYMU_THRESHOLDS": str(thresholds)})
    assert settings.effective_name("llava_v1.5_7b_hybrid", hybrid) == "llava_v1.5_7b_hybrid__dymu-mid_fastv-r0.5-l2"
    with pytest.raises(settings.PluginError, match="hybrid_vlm.calibrate"):
        settings.hybrid_config_for("llava_v1.5_7b_dymu", {})
    with pytest.raises(settings.PluginError, match="FASTV_K='1.5' is not valid"):
        settings.hybrid_config_for("llava_v1.5_7b_fastv", {"FASTV_K": "1.5"})


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion of a README name pattern: `a{,_b}{x,y}` -> a x, a y, a_b x, a_b y."""
    if "{" not in pattern:
        return [pattern]
    head, rest = pattern.split("{", 1)
    options, tail = rest.split("}", 1)
    return [head + option + name for option in options.split(",") for name in expand_braces(tail)]


def test_readme_lists_every_plugin_name_and_no_other():
    """The README's row for the VLMEvalKit glue names exactly the registered plugin names."""
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| **`vlmeval_plugin/`**"))
    patterns = [code for code in row.split("`")[1::2] if "{" in code or code in settings.VARIANTS]
    listed = {name for pattern in patterns for name in expand_braces(pattern)}
    if "the same for `llava_tiny`" in row:
        listed |= {name.replace("llava_testbed", "llava_tiny") for name in listed if name.startswith("llava_testbed")}
    assert listed == set(settings.VARIANTS)


def test_dymu_split_is_read_by_the_dymu_names_only(tmp_path):
    thresholds = tmp_path / "mid.json"
    thresholds.write_text(WELL_FORMED_THRESHOLDS)
    for name in ("llava_v1.5_7b_dymu", "llava_v1.5_7b_hybrid"):
        env = {"DYMU_THRESHOLDS": str(thresholds), "DYMU_SPLIT": "slot"}
        config = settings.hybrid_config_for(name, env)
        assert config.dymu_split == "slot" and "dymu-mid_split-slot" in settings.effective_name(name, config)
        assert settings.hybrid_config_for(name, {"DYMU_THRESHOLDS": str(thresholds)}).dymu_split == "official"
        with pytest.raises(settings.PluginError, match="DYMU_SPLIT='raster' is not valid: use one of official, slot"):
            settings.hybrid_config_for(name, {**env, "DYMU_SPLIT": "raster"})
    fastv = settings.hybrid_config_for("llava_v1.5_7b_fastv", {"DYMU_SPLIT": "slot"})
    assert settings.effective_name("llava_v1.5_7b_fastv", fastv) == FASTV_R05  # no DyMU, no split in the name


def test_missing_checkpoint_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv(settings.MODEL_PATH_ENV, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(settings.PluginError) as raised:
        settings.resolve_checkpoint(None)
    message = str(raised.value)
    assert f"the Hugging Face cache {tmp_path / 'hub'}" in message and "hf download llava-hf/llava-1.5-7b-hf" in message
    with pytest.raises(settings.PluginError, match=r"/no/such/llava \(does not exist\)"):
        settings.resolve_checkpoint("/no/such/llava")
    monkeypatch.setenv(settings.MODEL_PATH_ENV, str(tmp_path))
    with pytest.raises(settings.PluginError, match=r"(?s)\$HYBRID_VLM_MODEL_PATH .*\(has no config.json"):
        settings.resolve_checkpoint(None)


def test_stats_sidecar_survives_a_torn_line(tmp_path):
    path = tmp_path / "m_d_stats.jsonl"
    stats.append_record(path, {"index": "1", "prediction": "A", "tokens_in": 10})
    with open(path, "a") as handle:
        handle.write('{"index": "2", "predic')  # a writer killed mid-line
    stats.append_record(path, {"index": "3", "prediction": "C", "tokens_in": 12})
    stats.append_record(path, {"index": "1", "prediction": "B", "tokens_in": 11})
    records = stats.read_records(path)
    assert sorted(records) == ["1", "3"]
    assert records["1"]["prediction"] == "B"  # the later line wins


def test_tiny_sets_follow_mmbench_and_coco_layouts(tmp_path):
    mcq = build_mcq_table()
    base_questions = mcq[mcq["index"] < CIRCULAR_OFFSET]
    assert len(base_questions) == MCQ_QUESTIONS >= 100
    assert base_questions["category"].value_counts().min() == MCQ_QUESTIONS // 5  # every kind equally
    assert list(mcq.columns[:8]) == ["index", "question", "hint", "A", "B", "C", "D", "answer"]
    for base in mcq[mcq["index"] < CIRCULAR_OFFSET].itertuples():
        copies = mcq[mcq["index"] % CIRCULAR_OFFSET == base.index]
        options = [getattr(base, letter) for letter in "ABCD" if isinstance(getattr(base, letter), str)]
        assert len(copies) == len(options)  # one circular copy per rotation
        correct_text = getattr(base, base.answer)
        for copy in copies.itertuples():
            assert getattr(copy, copy.answer) == correct_text  # the answer letter follows its option
            if copy.index != base.index:
                assert copy.image == str(base.index)  # copies point at the base row's image
    captions = build_caption_table()
    assert len(captions) == CAPTION_IMAGES >= 40 and list(captions.columns) == ["index", "image", "answer"]
    assert all(len(eval(answer)) >= 3 for answer in captions["answer"])  # several references per image
    written = ensure_tiny_sets(tmp_path)
    assert [path.name for path in written] == ["TinyMMBench.tsv", "TinyCOCO.tsv"]
    assert len(pd.read_csv(written[0], sep="\t")) == len(mcq)
    write_tsv(build_mcq_table(2), written[0])  # a short copy of the current set is kept as it is
    stale = captions.copy()
    stale["answer"] = repr(["a picture"])  # an older generator's set under the same name is replaced
    write_tsv(stale, written[1])
    ensure_tiny_sets(tmp_path)
    assert len(pd.read_csv(written[0], sep="\t")) == len(build_mcq_table(2))
    assert len(pd.read_csv(written[1], sep="\t")) == len(captions) and pd.read_csv(written[1], sep="\t")["answer"][0] == captions["answer"][0]


@needs_vlmeval
@pytest.mark.parametrize("change", ["image", "question"])
def test_a_stale_bundled_set_is_rewritten_and_its_cached_images_cleared(tmp_path, change):
    """A bundled set on disk whose later row differs from this generator's (an older renderer's
    image, another question) is rewritten: only row 0 was compared. The rewrite clears VLMEvalKit's
    cache of the set's images, which it reuses by index whenever a file there decodes, so the new
    questions were asked about the old scenes; a current set keeps its cache."""
    folder = subprocess.run([sys.executable, "-c", f"from vlmeval.dataset.image_base import img_root_map; print(img_root_map({TINY_MCQ_NAME!r}))"],
                            capture_output=True, text=True, timeout=300).stdout.split()[-1]  # vlmeval imported in a subprocess
    mcq = build_mcq_table()
    cache = tmp_path / "images" / folder  # where VLMEvalKit dumps the set's images
    ensure_tiny_sets(tmp_path, names=[TINY_MCQ_NAME])
    cache.mkdir(parents=True)
    (cache / "5.png").write_bytes(b"an image VLMEvalKit dumped")
    ensure_tiny_sets(tmp_path, names=[TINY_MCQ_NAME])
    assert (cache / "5.png").exists()  # current: nothing rewritten, nothing cleared
    stale = mcq.copy()
    if change == "image":
        stale.loc[5, "image"] = image_to_base64(Image.new("RGB", (336, 336), "white"))
    else:
        stale.loc[5, "question"] = "What is the old question?"
    write_tsv(stale, tmp_path / f"{TINY_MCQ_NAME}.tsv")
    ensure_tiny_sets(tmp_path, names=[TINY_MCQ_NAME])
    assert pd.read_csv(tmp_path / f"{TINY_MCQ_NAME}.tsv", sep="\t").equals(pd.read_csv(io.StringIO(mcq.to_csv(sep="\t", index=False)), sep="\t"))
    assert not cache.exists()


def test_sweep_rejects_a_malformed_setting_before_running_anything(capsys):
    from hybrid_tools import sweep

    assert sweep.main(["--data", "TinyCOCO", "--fastv-k", "72", "7x"]) == 2
    assert "FASTV_K='7x' is not valid" in capsys.readouterr().err


# ---- end to end: subprocesses -----------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A temporary LMUData, hybrid_vlm cache (tiny checkpoint) and HF cache; no judge keys."""
    root = tmp_path_factory.mktemp("vlmeval_plugin")
    env = {key: value for key, value in os.environ.items() if key not in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "LOCAL_LLM", "MMEVAL_ROOT", "PRED_FORMAT", "FASTV_K", "FASTV_LAYER", "DYMU_THRESHOLDS", "VISUAL_METHOD", "VISUAL_BUDGET", settings.MODEL_PATH_ENV)}
    (root / "LMUData").mkdir()
    write_tsv(build_mcq_table(SANDBOX_QUESTIONS), root / "LMUData" / "TinyMMBench.tsv")
    write_tsv(build_caption_table(SANDBOX_CAPTIONS), root / "LMUData" / "TinyCOCO.tsv")
    env.update(
        LMUData=str(root / "LMUData"),
        HYBRID_VLM_CACHE=str(root / "cache"),
        HF_HOME=str(root / "hf"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    from hybrid_vlm.tiny import TINY_VERSION, ensure_tiny_llava

    checkpoint = ensure_tiny_llava(root / "cache" / f"tiny-llava-{TINY_VERSION}")  # the path llava_tiny will use
    return dict(root=root, env=env, checkpoint=str(checkpoint))


def run_py(sandbox, args, extra_env=None, cwd=None, timeout=300):
    env = dict(sandbox["env"], **(extra_env or {}))
    return subprocess.run(
        [sys.executable, RUN_PY, *args], env=env, cwd=cwd or sandbox["root"], capture_output=True, text=True, timeout=timeout
    )


def sidecar(work_dir: Path, model: str, dataset: str) -> list[dict]:
    path = stats.stats_path(work_dir / model, model, dataset)
    return [json.loads(line) for line in path.read_text().splitlines()]


def predictions(work_dir: Path, model: str, dataset: str) -> pd.DataFrame:
    return pd.read_excel(work_dir / model / f"{model}_{dataset}.xlsx")


@needs_vlmeval
@pytest.mark.skipif(not (TESTBED_CHECKPOINT / "config.json").exists(), reason="no testbed checkpoint committed")
def test_default_run_is_the_testbed_demo_with_metrics_and_stats(sandbox):
    """`python run.py` with no arguments: the trained testbed, vanilla, FastV and hybrid, on
    TinyMMBench and TinyCOCO (here the sandbox's short copies), batch size 8."""
    demo_dir = sandbox["root"] / "demo"
    demo_dir.mkdir()
    started = time.perf_counter()
    result = run_py(sandbox, [], cwd=demo_dir)
    seconds = time.perf_counter() - started
    print(f"demo wall time {seconds:.1f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    work_dir = demo_dir / "outputs"
    configs = {base: settings.hybrid_config_for(base, {}) for base in DEMO_MODELS}
    names = {base: settings.effective_name(base, config) for base, config in configs.items()}
    for model in names.values():
        mcq = predictions(work_dir, model, "TinyMMBench")
        assert len(mcq) == MCQ_ROWS  # a prediction row for every dataset row
        accuracy = pd.read_csv(work_dir / model / f"{model}_TinyMMBench_acc.csv")
        assert 0.0 <= accuracy["Overall"].iloc[0] <= 1.0
        judged = pd.read_excel(work_dir / model / f"{model}_TinyMMBench_exact_matching_result.xlsx")
        assert len(judged) == SANDBOX_QUESTIONS  # circular evaluation: one verdict per base question
        captions = predictions(work_dir, model, "TinyCOCO")
        assert len(captions) == CAPTION_ROWS
        scores = json.loads((work_dir / model / f"{model}_TinyCOCO_score.json").read_text())
        assert len(scores["Bleu"]) == 4 and "CIDEr" in scores and "ROUGE_L" in scores
        for dataset, rows in (("TinyMMBench", MCQ_ROWS), ("TinyCOCO", CAPTION_ROWS)):
            records = sidecar(work_dir, model, dataset)
            predicted = set(predictions(work_dir, model, dataset)["index"].astype(str))
            assert len(records) == rows and {r["index"] for r in records} == predicted  # one record per row
            assert all(r["prefill_s"] > 0 and r["tokens_in"] > 0 and 1 <= r["batch_size"] <= 8 for r in records)
        assert str((work_dir / model).resolve()) in result.stdout  # prints where the results are
    vanilla_name = names["llava_testbed"]
    vanilla_accuracy = pd.read_csv(work_dir / vanilla_name / f"{vanilla_name}_TinyMMBench_acc.csv")
    assert vanilla_accuracy["Overall"].iloc[0] > 0  # trained weights: the counting questions are answered
    vanilla = sidecar(work_dir, vanilla_name, "TinyCOCO")
    assert all(r["tokens_kept"] == r["tokens_in"] for r in vanilla)
    text_tokens = {r["index"]: r["tokens_in"] - 576 for r in vanilla}
    for base in ("llava_testbed_fastv", "llava_testbed_hybrid"):  # FastV's quota on each row's (merged) count
        records = sidecar(work_dir, names[base], "TinyCOCO")
        entering = {r["index"]: r["tokens_in"] - text_tokens[r["index"]] for r in records}
        if configs[base].dymu is None:
            assert set(entering.values()) == {576}
        else:
            assert all(0 < count <= 576 for count in entering.values()) and min(entering.values()) < 576
        for r in records:
            assert r["tokens_kept"] - text_tokens[r["index"]] == official_keep_count(entering[r["index"]], configs[base].fastv_k)


def test_testbed_names_without_a_checkpoint_are_a_clear_error(monkeypatch, tmp_path):
    import hybrid_vlm.testbed as testbed
    from vlmeval_plugin.cli import PluginModel

    monkeypatch.setattr(testbed, "CHECKPOINT_DIR", tmp_path / "missing")
    with pytest.raises(settings.PluginError, match="python -m hybrid_vlm.testbed train"):
        PluginModel("llava_testbed", None)


def test_model_path_selects_a_retrained_testbed_and_is_refused_where_unused(tmp_path):
    """--model-path points a llava_testbed name at a retrained testbed directory (not silently the
    shipped one); a missing or non-LLaVA directory, or --model-path with a llava_tiny name, is a clear error."""
    from vlmeval_plugin.cli import PluginModel

    retrained = tmp_path / "retrained"
    retrained.mkdir()
    (retrained / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (retrained / "model.safetensors").write_bytes(b"")
    assert PluginModel("llava_testbed", str(retrained)).checkpoint == retrained
    with pytest.raises(settings.PluginError, match="--model-path"):
        PluginModel("llava_testbed", str(tmp_path / "missing"))
    (retrained / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(settings.PluginError, match="needs a llava checkpoint"):
        PluginModel("llava_testbed_fastv", str(retrained))
    with pytest.raises(settings.PluginError, match="not accepted with 'llava_tiny'"):
        PluginModel("llava_tiny", str(retrained))


@needs_vlmeval
def test_interrupted_run_resumes_without_redoing_rows(sandbox):
    """Kill a run mid-way (SIGKILL), run it again: every row generated exactly once, none lost."""
    work_dir = sandbox["root"] / "sweep"
    args = ["--data", "TinyMMBench", "--model", "llava_v1.5_7b_fastv", "--model-path", sandbox["checkpoint"],
            "--max-new-tokens", "4", "--work-dir", str(work_dir)]
    env = dict(sandbox["env"], FASTV_K="0.5")
    path = stats.stats_path(work_dir / FASTV_R05, FASTV_R05, "TinyMMBench")
    process = subprocess.Popen([sys.executable, RUN_PY, *args], env=env, cwd=sandbox["root"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= 12:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = stats.read_records(path)
    assert 12 <= len(finished) < MCQ_ROWS, f"the run was not interrupted mid-way ({len(finished)} rows)"
    assert (work_dir / FASTV_R05 / "01_TinyMMBench.pkl").exists()  # VLMEvalKit's own checkpoint (every 10 rows)

    result = subprocess.run([sys.executable, RUN_PY, *args], env=env, cwd=sandbox["root"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(finished)} rows of TinyMMBench already generated" in result.stdout
    lines = path.read_text().splitlines()
    indices = [json.loads(line)["index"] for line in lines]
    assert len(indices) == MCQ_ROWS and len(set(indices)) == MCQ_ROWS  # one generate per row, ever
    final = predictions(work_dir, FASTV_R05, "TinyMMBench")
    assert len(final) == MCQ_ROWS
    resumed = stats.read_records(path)
    assert all(resumed[index]["prediction"] == record["prediction"] for index, record in finished.items())
    assert (work_dir / FASTV_R05 / f"{FASTV_R05}_TinyMMBench_acc.csv").exists()


@needs_vlmeval
def test_fastv_settings_get_distinct_folders(sandbox):
    """Another FASTV_K under the same name and work dir lands in its own folder, leaving 0.5's alone."""
    work_dir = sandbox["root"] / "sweep"
    before = sorted(path.name for path in work_dir.glob(f"{FASTV_R05}/*"))
    result = run_py(
        sandbox,
        ["--data", "TinyCOCO", "--model", "llava_v1.5_7b_fastv", "--model-path", sandbox["checkpoint"],
         "--max-new-tokens", "4", "--work-dir", str(work_dir), "--mode", "infer", "--limit", "3"],
        extra_env={"FASTV_K": "72"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = sidecar(work_dir, FASTV_K72, "TinyCOCO")
    assert len(records) == 3 and all(r["tokens_in"] - r["tokens_kept"] == 576 - 72 for r in records)
    assert len(predictions(work_dir, FASTV_K72, "TinyCOCO")) == 3
    if before:  # the interrupted-run test filled the 0.5 folder first
        assert sorted(path.name for path in work_dir.glob(f"{FASTV_R05}/*")) == before


@needs_vlmeval
def test_a_rerun_that_would_reuse_another_runs_predictions_is_refused(sandbox):
    """The same name, setting and work dir with another --max-new-tokens, or a same-shape checkpoint
    with other weights: exit 2 naming what changed, the folder untouched; the checkpoint copied
    elsewhere with the same length: resumes (rc 0)."""
    work_dir = sandbox["root"] / "reuse"
    args = ["--data", "TinyCOCO", "--model", "llava_v1.5_7b_fastv", "--work-dir", str(work_dir), "--mode", "infer", "--limit", "2"]
    env = {"FASTV_K": "72"}
    first = run_py(sandbox, [*args, "--model-path", sandbox["checkpoint"], "--max-new-tokens", "3"], extra_env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    folder = work_dir / FASTV_K72
    before = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}

    other_weights = sandbox["root"] / "reuse-other-weights"
    model, processor = build_tiny_llava(seed=1)
    model.save_pretrained(other_weights)
    processor.save_pretrained(other_weights)
    moved = sandbox["root"] / "reuse-moved" / "checkpoint"
    shutil.copytree(sandbox["checkpoint"], moved)
    longer = run_py(sandbox, [*args, "--model-path", sandbox["checkpoint"], "--max-new-tokens", "4"], extra_env=env)
    other = run_py(sandbox, [*args, "--model-path", str(other_weights), "--max-new-tokens", "3"], extra_env=env)
    assert longer.returncode == 2 and "--max-new-tokens 3; this run asks for 4" in longer.stderr, longer.stderr[-3000:]
    assert other.returncode == 2 and "content signature" in other.stderr, other.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*")} == before

    resumed = run_py(sandbox, [*args, "--model-path", str(moved), "--max-new-tokens", "3"], extra_env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert len(sidecar(work_dir, FASTV_K72, "TinyCOCO")) == 2  # nothing generated again


@needs_vlmeval
def test_a_prediction_file_torn_by_a_kill_is_set_aside_and_rebuilt_from_the_stats(sandbox):
    """A kill during VLMEvalKit's final write leaves a truncated .xlsx, which it would load and fail
    on at every rerun: the rerun moves it aside, says so, and rebuilds it without generating."""
    work_dir = sandbox["root"] / "torn"
    args = ["--data", "TinyCOCO", "--model", "llava_v1.5_7b_fastv", "--model-path", sandbox["checkpoint"], "--max-new-tokens", "3",
            "--work-dir", str(work_dir), "--mode", "infer", "--limit", "2"]
    first = run_py(sandbox, args, extra_env={"FASTV_K": "72"})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    written = predictions(work_dir, FASTV_K72, "TinyCOCO")
    path = work_dir / FASTV_K72 / f"{FASTV_K72}_TinyCOCO.xlsx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(zipfile.BadZipFile):  # what VLMEvalKit's load met
        pd.read_excel(path)

    rerun = run_py(sandbox, args, extra_env={"FASTV_K": "72"})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{path.name} could not be read" in rerun.stdout and path.with_name(path.name + ".unreadable").exists()
    assert predictions(work_dir, FASTV_K72, "TinyCOCO")["prediction"].tolist() == written["prediction"].tolist()
    assert len(sidecar(work_dir, FASTV_K72, "TinyCOCO")) == 2  # answered from the stats, none generated


@needs_vlmeval
def test_two_process_gloo_run_matches_one_process(sandbox):
    """torchrun --nproc-per-node=2 on CPU: ranks take alternating rows, rank 0 merges and evaluates."""
    work_dir = sandbox["root"] / "torchrun"
    env = dict(sandbox["env"], FASTV_K="0.5", CUDA_VISIBLE_DEVICES="0,1")  # no GPU here: VLMEvalKit narrows it per rank all the same
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", RUN_PY,
               "--data", "TinyMMBench", "--model", "llava_v1.5_7b_fastv", "--model-path", sandbox["checkpoint"],
               "--max-new-tokens", "4", "--work-dir", str(work_dir)]
    result = subprocess.run(command, env=env, cwd=sandbox["root"], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = sidecar(work_dir, FASTV_R05, "TinyMMBench")
    assert len(records) == MCQ_ROWS and {r["rank"] for r in records} == {0, 1}
    merged = predictions(work_dir, FASTV_R05, "TinyMMBench")
    assert len(merged) == MCQ_ROWS
    assert (work_dir / FASTV_R05 / f"{FASTV_R05}_TinyMMBench_acc.csv").exists()
    run_info = json.loads((work_dir / FASTV_R05 / "run_info.json").read_text())["runs"][-1]
    assert run_info["env"]["CUDA_VISIBLE_DEVICES"] == "0,1" and run_info["world_size"] == 2  # as launched, not rank 0's share
    single_path = stats.stats_path(sandbox["root"] / "sweep" / FASTV_R05, FASTV_R05, "TinyMMBench")
    if single_path.exists():  # same setting, one process (the interrupted-and-resumed run)
        single = stats.read_records(single_path)
        assert {r["index"]: r["prediction"] for r in records} == {k: v["prediction"] for k, v in single.items()}


FREED_MODEL_SCRIPT = """
import gc, sys, weakref
from vlmeval_plugin import robust
robust.install()
from vlmeval_plugin.model import HybridLLaVA
gc.disable()  # VLMEvalKit drops one model (model = None) and builds the next: no collection in between
wrapper = HybridLLaVA(sys.argv[1])
model = weakref.ref(wrapper.model)
wrapper.generate_batch([[dict(type="text", value="Hello")]])  # the timing hooks run
del wrapper
print(model() is None)
"""


TWO_IMAGE_GMACS_SCRIPT = """
import json, sys
from vlmeval_plugin import robust
robust.install()
from hybrid_vlm import HybridConfig, flops
from hybrid_vlm.tiny import synthetic_image
from vlmeval_plugin.model import HybridLLaVA
paths = []
for i in range(2):
    paths.append(f"{sys.argv[2]}/image{i}.png")
    synthetic_image(i).save(paths[-1])
rows = []
for hybrid in (None, HybridConfig(visual_method="divprune", visual_budget=64), HybridConfig(fastv_k=64)):
    wrapper = HybridLLaVA(sys.argv[1], hybrid=hybrid, max_new_tokens=2)
    record = wrapper.generate_batch([[dict(type="image", value=p) for p in paths] + [dict(type="text", value="compare them")]])[0]
    shape, config = flops.shape_from_config(wrapper.model.config), hybrid or HybridConfig()
    text = record["tokens_in"] - record["visual_in"]
    per_images = [flops.method_prefill_macs(shape, config, text, visual_entered=record["visual_in"], visual_kept=record["visual_kept"],
                                            images=n).total / 1e9 for n in (1, 2)]
    rows.append([record["visual_in"], record["prefill_gmacs"], *[round(v, 4) for v in per_images]])
print(json.dumps(rows))
"""


@needs_vlmeval
def test_a_row_of_two_images_records_the_macs_of_both(sandbox, tmp_path):
    """A LLaVA-1.5 row of two images: its prefill_gmacs counts the tower, the projector and the
    method's scoring for both (flops.method_prefill_macs with images=2, itself checked against
    FlopCounterMode in test_flops), not for one."""
    result = subprocess.run([sys.executable, "-c", TWO_IMAGE_GMACS_SCRIPT, sandbox["checkpoint"], str(tmp_path)], env=sandbox["env"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert [row[0] for row in rows] == [2 * 576, 2 * 64, 2 * 576]
    for _, recorded, one_image, two_images in rows:
        assert recorded == two_images and two_images > one_image


DEVICE_MAP_SCRIPT = """
import sys
from transformers import PreTrainedModel
seen = []
load = PreTrainedModel.from_pretrained.__func__
def spy(cls, *args, **kwargs):
    seen.append(kwargs.get("device_map"))
    return load(cls, *args, **kwargs)
PreTrainedModel.from_pretrained = classmethod(spy)
from vlmeval_plugin import robust
robust.install()
from vlmeval_plugin.model import HybridLLaVA
wrapper = HybridLLaVA(sys.argv[1])
print(seen, wrapper.device, {p.device for p in wrapper.model.parameters()})
"""


@needs_vlmeval
def test_the_model_is_loaded_straight_onto_its_device(sandbox):
    """Loaded to the CPU and then moved, a 7B checkpoint sat in host memory once per torchrun rank;
    the wrapper asks from_pretrained for its device instead (here the CPU, the only one there is)."""
    result = subprocess.run([sys.executable, "-c", DEVICE_MAP_SCRIPT, sandbox["checkpoint"]], env=sandbox["env"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[{'': device(type='cpu')}] cpu {device(type='cpu')}"


@needs_vlmeval
def test_a_dropped_wrapper_frees_its_model_without_a_garbage_collection(sandbox):
    """Its timing hooks were bound methods: model -> hook -> wrapper -> model, a cycle, so a dropped
    7B model stayed on the GPU until a full collection, beside the next one VLMEvalKit loads."""
    result = subprocess.run([sys.executable, "-c", FREED_MODEL_SCRIPT, sandbox["checkpoint"]], env=sandbox["env"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "True"


@needs_vlmeval
def test_bad_requests_exit_non_zero_with_a_clear_message(sandbox):
    checkpoint = ["--model-path", sandbox["checkpoint"]]
    cases = {
        "unknown model": (["--data", "TinyCOCO", "--model", "llava_v1.5_7b_turbo"], {}),
        "malformed FASTV_K": (["--data", "TinyCOCO", "--model", "llava_v1.5_7b_fastv", *checkpoint], {"FASTV_K": "7x"}),
        "missing checkpoint": (["--data", "TinyCOCO", "--model", "llava_v1.5_7b"], {}),
        "method conflicts with the name": (["--data", "TinyCOCO", "--model", "llava_v1.5_7b_visionzip", *checkpoint], {"VISUAL_METHOD": "divprune"}),
        "layer beyond the LLM": (["--data", "TinyCOCO", "--model", "llava_v1.5_7b_fastv", *checkpoint], {"FASTV_LAYER": "99"}),
        "no --data": (["--model", "llava_testbed"], {}),  # the README's retrained-testbed command lacked it: an assert in VLMEvalKit
    }
    processes = {
        case: subprocess.Popen([sys.executable, RUN_PY, *args], env=dict(sandbox["env"], **extra), cwd=sandbox["root"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case, (args, extra) in cases.items()
    }
    outcomes = {case: (process.wait(timeout=300), process.communicate()[1]) for case, process in processes.items()}
    for case, (code, stderr) in outcomes.items():
        assert code == 2, f"{case}: exit {code}\n{stderr[-2000:]}"
    assert "unknown model name(s) 'llava_v1.5_7b_turbo'" in outcomes["unknown model"][1]
    assert "llava_v1.5_7b_fastv" in outcomes["unknown model"][1]  # lists what exists
    assert "FASTV_K='7x' is not valid: use an integer n >= 0" in outcomes["malformed FASTV_K"][1]
    missing = outcomes["missing checkpoint"][1]
    assert "llava-hf/llava-1.5-7b-hf" in missing and str(Path(sandbox["env"]["HF_HOME"]) / "hub") in missing
    assert "hf download llava-hf/llava-1.5-7b-hf" in missing
    assert "VISUAL_METHOD=divprune conflicts with the name" in outcomes["method conflicts with the name"][1]
    assert "FASTV_LAYER=99 is not valid: use 1..3 for this 4-layer LLM" in outcomes["layer beyond the LLM"][1]
    assert "Loading weights" not in outcomes["layer beyond the LLM"][1]  # refused before the model loads
    assert "--data names the datasets to evaluate --model on, and is missing" in outcomes["no --data"][1]
    assert not any((sandbox["root"] / "outputs").glob("llava_v1.5_7b*"))  # nothing ran


@needs_vlmeval
def test_prompts_match_vlmevalkit_llava(sandbox):
    """The MCQ text and the conversation string equal VLMEvalKit's own LLaVA wrapper's."""
    ensure_tiny_sets(sandbox["env"]["LMUData"])
    script = r"""
import inspect, sys
import pandas as pd
from vlmeval.vlm.llava.llava import LLaVA
from vlmeval_plugin.model import SYSTEM_PROMPT, HybridLLaVA, llava_mcq_prompt

class Stub:
    def use_custom_prompt(self, dataset):
        return True
    def dump_image(self, line, dataset):
        return [f"/images/{line['index']}.png"]

data = pd.read_csv(sys.argv[1], sep="\t")
for _, line in data.iterrows():
    upstream = LLaVA.build_prompt(Stub(), line, dataset="TinyMMBench")
    assert upstream[-1]["value"] == llava_mcq_prompt(line), (upstream, llava_mcq_prompt(line))
    content, images = LLaVA.concat_tilist(None, upstream)
    ours, our_images = HybridLLaVA.conversation(None, upstream)
    assert ours == SYSTEM_PROMPT + "USER: " + content + " ASSISTANT: " and our_images == images
source = inspect.getsource(LLaVA.__init__)
assert all(part in source for part in SYSTEM_PROMPT.split("assistant. ")), "system prompt drifted"
print("ok", len(data))
"""
    result = subprocess.run([sys.executable, "-c", script, str(Path(sandbox["env"]["LMUData"]) / "TinyMMBench.tsv")],
                            env=sandbox["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and f"ok {MCQ_ROWS}" in result.stdout, result.stderr[-3000:]


@needs_vlmeval
def test_sparsevlm_runs_through_the_plugin_and_its_rows_name_the_stage_layers(sandbox):
    """llava_tiny_sparsevlm at 64 on the 4-layer tiny model: stages from layers 1 / 2 / 3 keep
    66+16, 30+2 and 17+1 visual tokens (the published schedule), so every row records 576 in, 18
    kept after the last stage and (576 + 82 + 32 + 18) / 4 = 177 layer-averaged."""
    work_dir = sandbox["root"] / "sparsevlm"
    result = run_py(sandbox, ["--data", "TinyMMBench", "--model", "llava_tiny_sparsevlm", "--max-new-tokens", "2",
                              "--work-dir", str(work_dir)], extra_env=dict(VISUAL_BUDGET="64"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = sidecar(work_dir, "llava_tiny_sparsevlm__sparsevlm-b64", "TinyMMBench")
    assert len(records) == MCQ_ROWS
    assert {r["setting"] for r in records} == {"sparsevlm-b64-l1.2.3"}
    assert {(r["visual_in"], r["visual_kept"], r["visual_layer_mean"]) for r in records} == {(576, 18, 177.0)}


@needs_vlmeval
def test_mask_read_once_predicts_what_the_default_predicts_in_its_own_folder(sandbox):
    """TinyCOCO's rows share one prompt, so a batch of them is unpadded: under MASK_READ=once the
    engine runs it without a mask; the captions and token counts are the default's, in a folder of
    their own (the setting is in the name)."""
    work_dir = sandbox["root"] / "mask-read"
    args = ["--data", "TinyCOCO", "--model", "llava_v1.5_7b_fastv", "--model-path", sandbox["checkpoint"], "--max-new-tokens", "6",
            "--batch-size", "4", "--work-dir", str(work_dir), "--mode", "infer", "--limit", "4"]
    folders = {}
    for mask_read in ("never", "once"):
        result = run_py(sandbox, args, extra_env={"FASTV_K": "72", "MASK_READ": mask_read})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        config = settings.hybrid_config_for("llava_v1.5_7b_fastv", {"FASTV_K": "72", "MASK_READ": mask_read})
        folders[mask_read] = settings.effective_name("llava_v1.5_7b_fastv", config)
    assert folders["once"] == folders["never"] + "_mask-read-once"
    default, once = (predictions(work_dir, folders[m], "TinyCOCO") for m in ("never", "once"))
    assert len(default) == 4 and default["prediction"].tolist() == once["prediction"].tolist()
    records = {m: sidecar(work_dir, folders[m], "TinyCOCO") for m in folders}
    assert max(r["batch_size"] for r in records["once"]) == 4
    assert [(r["index"], r["tokens_in"], r["tokens_kept"]) for r in records["never"]] == [(r["index"], r["tokens_in"], r["tokens_kept"]) for r in records["once"]]


LOCK_SCRIPT = r"""
import sys
from vlmeval_plugin import robust

robust.install()
from vlmeval.smp.status_report import upsert_run_status

upsert_run_status(sys.argv[1], model_name="m")
print("status written")
"""


@needs_vlmeval
def test_a_status_lock_left_by_a_killed_run_does_not_hang_the_next(tmp_path):
    """VLMEvalKit's status.json lock was a SoftFileLock (the file's existence, waited on without a
    timeout): a run killed while holding it left every later run of the folder hanging silently."""
    (tmp_path / "status.json.lock").write_text("")  # what a SIGTERM mid-update left behind
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", LOCK_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and "status written" in result.stdout, result.stderr[-2000:]
    assert (tmp_path / "status.json").exists()


def test_an_mcq_set_keeping_its_options_in_another_column_is_prompted_not_failed():
    """Upstream MCQ sets such as EmbSpatialBench keep their choices in an `options` column, with no
    A/B columns: every row was failed as "needs options A and B", where upstream's LLaVA asks the
    question alone (and Qwen2.5-VL takes the dataset's prompt). Letter columns, where a set has them,
    must still hold A and B."""
    import pandas as pd

    from vlmeval_plugin.model import RowError, check_text_fields, llava_mcq_prompt

    row = pd.Series({"index": 0, "question": "Which object is left of the chair?", "options": "['table', 'lamp', 'sofa']", "answer": "A"})
    check_text_fields(row, "MCQ")
    assert llava_mcq_prompt(row) == "Which object is left of the chair?\nAnswer the question directly."  # upstream LLaVA's text
    with pytest.raises(RowError, match="unusable text field.s. B: an MCQ row needs a question and options A and B"):
        check_text_fields(pd.Series({"index": 1, "question": "q", "A": "x", "B": None}), "MCQ")
    with pytest.raises(RowError, match="unusable text field.s. question: an MCQ row needs a question$"):
        check_text_fields(row.drop("question"), "MCQ")
