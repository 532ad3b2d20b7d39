"""Bad input: bad rows fail alone, failed batches are retried smaller, malformed sets fail fast.

The end-to-end runs are subprocesses of run.py in the sandbox of test_vlmeval_plugin (temporary
LMUData, tiny checkpoint, HF offline), kept tiny: few rows, two new tokens.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import openpyxl
import pandas as pd
import pytest
from PIL import Image

from tests.test_vlmeval_plugin import RUN_PY, needs_vlmeval, run_py, sandbox  # noqa: F401 (sandbox is a fixture)
from vlmeval_plugin import layouts, results, robust, stats
from vlmeval_plugin.tiny_data import build_caption_table, build_mcq_table, image_to_base64

FAIL_PREFIX = "Failed to obtain answer"  # VLMEvalKit's INFER_FAIL_MSG, written out as the reference
MODEL = "llava_tiny"
TOKENS = ["--max-new-tokens", "2"]


def jpeg_base64(image: Image.Image, keep_bytes: int | None = None) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    data = buffer.getvalue()
    return base64.b64encode(data[:keep_bytes] if keep_bytes else data).decode("ascii")


def real_world_table(good_image: str) -> pd.DataFrame:
    """MMBench layout: good row, CMYK JPEG, truncated JPEG, empty image, dangling reference, good row,
    and a row with an image but an empty question."""
    base = build_mcq_table(num_questions=7)
    rows = base[base["index"] < 7].reset_index(drop=True).copy()  # base questions only: no circular copies
    picture = Image.new("RGB", (48, 32), (200, 40, 40))
    rows.loc[1, "image"] = jpeg_base64(picture.convert("CMYK"))
    rows.loc[2, "image"] = jpeg_base64(picture, keep_bytes=300)
    rows.loc[3, "image"] = None
    rows.loc[4, "image"] = "999"
    rows.loc[5, "image"] = good_image
    rows.loc[6, "question"] = " "
    return rows


BAD_ROWS = {"2": "cannot be decoded", "3": "the image cell is empty", "4": "refers to row 999", "6": "unusable text field(s) question"}


def write_set(sandbox, name: str, table: pd.DataFrame) -> Path:  # noqa: F811
    path = Path(sandbox["env"]["LMUData"]) / f"{name}.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


# ---- unit tests -------------------------------------------------------------------------------
def test_bad_image_cells_become_placeholders_with_reasons():
    good = image_to_base64(Image.new("RGB", (8, 8)))
    long_path = "/data/" + "nested/" * 10 + "cat.JPG"  # over the 64 characters of a row reference
    data = pd.DataFrame({"index": [1, 2, 3, 4, 5, 10, 11], "image": [good, "1", "7", None, "4", "img/cat.png", long_path]})
    marked = robust.mark_bad_image_cells(data, keep_empty_rows=True)
    reasons = [robust.bad_cell_reason(cell) for cell in marked["image"]]
    assert reasons[:2] == [None, None]  # a full image and a valid reference stay as they are
    assert "refers to row 7" in reasons[2] and reasons[3] == "the image cell is empty"
    assert "refers to row 4" in reasons[4]  # a reference to a row without an image
    for reason, path in zip(reasons[5:], ["img/cat.png", long_path]):  # read as a row reference or as base64 before
        assert reason.startswith(f"the image cell holds a file name or URL ({path}), not base64") and "image_path column" in reason
    assert all(len(cell) > 64 for cell in marked["image"][2:])  # VLMEvalKit must not read them as references
    official = robust.mark_bad_image_cells(data, keep_empty_rows=False)
    assert pd.isna(official["image"][3])  # official sets keep VLMEvalKit's own row selection


def test_cmyk_is_converted_and_truncated_data_is_a_row_error(tmp_path):
    picture = Image.new("RGB", (16, 16), (10, 200, 30))
    target = tmp_path / "cmyk.png"
    robust.decode_base64_to_image_file(jpeg_base64(picture.convert("CMYK")), str(target))
    saved = Image.open(target)
    assert saved.mode == "RGB" and max(abs(a - b) for a, b in zip(saved.getpixel((8, 8)), (10, 200, 30))) < 12
    with pytest.raises(robust.RowError, match="cannot be decoded"):
        robust.decode_base64_to_image_file(jpeg_base64(picture, keep_bytes=200), str(tmp_path / "cut.png"))
    assert not (tmp_path / "cut.png").exists()  # no broken file left for VLMEvalKit's read_ok to accept


@pytest.mark.parametrize("stray", ["A", "B"])
def test_one_option_column_is_a_vqa_set_as_vlmevalkit_reads_it(tmp_path, stray):
    """VLMEvalKit's build_dataset makes a custom set MCQ only with both A and B columns; with one it is
    a VQA set. check_tsv refused such a set, asking for the other option column."""
    path = tmp_path / "Mine.tsv"
    row = {"index": [1], "question": ["what is it?"], "answer": ["a cat"], "image_path": ["a.png"], stray: ["x"]}
    pd.DataFrame(row).to_csv(path, sep="\t", index=False)
    assert layouts.layout_of(set(row)) == "VQA" and layouts.check_tsv(path) is None


def test_malformed_headers_name_file_column_and_layout(tmp_path):
    path = tmp_path / "Mine.tsv"
    pd.DataFrame({"index": [1], "A": ["x"], "B": ["y"], "answer": ["A"], "image": ["..."]}).to_csv(path, sep="\t", index=False)
    message = layouts.check_tsv(path)
    assert str(path) in message and "missing column(s) question" in message and "MCQ (MMBench layout)" in message
    pd.DataFrame({"index": [1], "answer": ["['a cat']"]}).to_csv(path, sep="\t", index=False)
    message = layouts.check_tsv(path)
    assert "image or image_path" in message and "caption (COCO_VAL layout)" in message
    pd.DataFrame({"index": [1], "question": ["q"], "A": ["x"], "B": ["y"], "answer": ["A"], "image_path": ["a.png"]}).to_csv(
        path, sep="\t", index=False
    )
    assert layouts.check_tsv(path) is None


# ---- end to end -------------------------------------------------------------------------------
@needs_vlmeval
def test_bad_rows_fail_alone_and_a_fixed_rerun_regenerates_only_them(sandbox):  # noqa: F811
    good_image = build_mcq_table(num_questions=2)["image"][0]
    table = real_world_table(good_image)
    write_set(sandbox, "RealWorldMCQ", table)
    work_dir = sandbox["root"] / "bad_rows"
    args = ["--data", "RealWorldMCQ", "--model", MODEL, *TOKENS, "--work-dir", str(work_dir)]
    result = run_py(sandbox, args)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "Did not detect the .env file" not in output  # quiet start-up
    predicted = pd.read_excel(work_dir / MODEL / f"{MODEL}_RealWorldMCQ.xlsx")
    by_index = dict(zip(predicted["index"].astype(str), predicted["prediction"].astype(str)))
    assert sorted(by_index) == [str(i) for i in range(7)]  # every row is in the prediction file
    for index in ("0", "1", "5"):  # the good rows and the CMYK one (converted, not failed)
        assert not by_index[index].startswith(FAIL_PREFIX), by_index[index]
    for index, reason in BAD_ROWS.items():
        assert by_index[index].startswith(FAIL_PREFIX) and reason in by_index[index]
        assert f"{MODEL} x RealWorldMCQ: row {index} failed: " in result.stderr and reason in result.stderr
    judged = pd.read_excel(work_dir / MODEL / f"{MODEL}_RealWorldMCQ_exact_matching_result.xlsx")
    assert {"0", "1", "5"} <= set(judged["index"].astype(str))  # the good rows were scored
    assert (work_dir / MODEL / f"{MODEL}_RealWorldMCQ_acc.csv").exists()
    path = stats.stats_path(work_dir / MODEL, MODEL, "RealWorldMCQ")
    first = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["index"] for r in first if "error" in r} == set(BAD_ROWS)

    # --mode infer, then --mode eval elsewhere (a cluster's split): the failed rows are scored as
    # misses, as --mode all scored them; VLMEvalKit's eval skipped the set as an incomplete inference
    eval_dir = sandbox["root"] / "bad_rows_eval"
    (eval_dir / MODEL).mkdir(parents=True)
    for name in (f"{MODEL}_RealWorldMCQ.xlsx", path.name, "run_info.json"):
        shutil.copy(work_dir / MODEL / name, eval_dir / MODEL / name)
    evaluated = run_py(sandbox, ["--data", "RealWorldMCQ", "--model", MODEL, *TOKENS, "--work-dir", str(eval_dir), "--mode", "eval"])
    assert "Incomplete infer result" not in evaluated.stdout + evaluated.stderr
    assert (eval_dir / MODEL / f"{MODEL}_RealWorldMCQ_acc.csv").exists(), (evaluated.stdout + evaluated.stderr)[-3000:]

    fixed = table.copy()
    for index in ("2", "3", "4"):
        fixed.loc[int(index), "image"] = good_image
    fixed.loc[6, "question"] = table.loc[0, "question"]
    write_set(sandbox, "RealWorldMCQ", fixed)
    rerun = run_py(sandbox, args)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    added = [json.loads(line) for line in path.read_text().splitlines()][len(first):]
    assert sorted(r["index"] for r in added) == sorted(BAD_ROWS) and not any("error" in r for r in added)
    again = pd.read_excel(work_dir / MODEL / f"{MODEL}_RealWorldMCQ.xlsx")
    again_by_index = dict(zip(again["index"].astype(str), again["prediction"].astype(str)))
    assert all(again_by_index[i] == by_index[i] for i in ("0", "1", "5"))  # finished rows kept as they were
    assert not any(value.startswith(FAIL_PREFIX) for value in again_by_index.values())


def test_an_unreadable_image_file_ahead_stays_out_of_the_batch(sandbox, tmp_path):  # noqa: F811
    """A truncated file in an image_path row ahead was pulled into the batch (only base64 rows were
    checked there): the batch failed, was retried at half size twice, and the row was recorded as
    failed twice, with two reasons. It now fails once, on its own turn, and the others batch."""
    table = build_mcq_table(num_questions=6)
    table = table[table["index"] < 6].reset_index(drop=True)
    paths = [str(tmp_path / f"{index}.png") for index in table["index"]]
    for path, cell in zip(paths, table["image"]):
        robust.decode_base64_to_image_file(cell, path)
    whole = Path(paths[2]).read_bytes()
    Path(paths[2]).write_bytes(whole[: len(whole) // 2])
    write_set(sandbox, "TruncatedPathMCQ", table.drop(columns=["image"]).assign(image_path=paths))
    work_dir = sandbox["root"] / "truncated_path"
    result = run_py(sandbox, ["--data", "TruncatedPathMCQ", "--model", MODEL, *TOKENS, "--work-dir", str(work_dir), "--batch-size", "4"])
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "generate failed for a batch" not in output, output[-3000:]
    records = [json.loads(line) for line in stats.stats_path(work_dir / MODEL, MODEL, "TruncatedPathMCQ").read_text().splitlines()]
    assert [r["index"] for r in records if "error" in r] == ["2"] and "cannot be read" in output
    assert {r["batch_size"] for r in records if r["index"] in ("0", "1", "3", "4")} == {4}

FAULTY_RUN = r"""
import sys
import transformers

original = transformers.LlavaForConditionalGeneration.generate

def generate(self, *args, **kwargs):
    if kwargs["input_ids"].shape[0] > 2:
        raise RuntimeError("CUDA out of memory (injected for batches larger than 2)")
    return original(self, *args, **kwargs)

transformers.LlavaForConditionalGeneration.generate = generate
from vlmeval_plugin.cli import main
sys.exit(main(sys.argv[1:]))
"""


@needs_vlmeval
def test_failed_batches_are_retried_at_half_size_and_match_batch_one(sandbox):  # noqa: F811
    base = ["--data", "TinyCOCO", "--model", MODEL, *TOKENS, "--mode", "infer", "--limit", "5"]
    clean_dir, faulty_dir = sandbox["root"] / "batch1", sandbox["root"] / "faulty"
    clean = run_py(sandbox, [*base, "--work-dir", str(clean_dir)])
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-3000:]
    faulty = subprocess.run(
        [sys.executable, "-c", FAULTY_RUN, *base, "--batch-size", "4", "--work-dir", str(faulty_dir)],
        env=sandbox["env"], cwd=sandbox["root"], capture_output=True, text=True, timeout=300,
    )
    assert faulty.returncode == 0, (faulty.stdout + faulty.stderr)[-3000:]
    assert "generate failed for a batch of 4 rows" in faulty.stdout
    records = stats.read_records(stats.stats_path(faulty_dir / MODEL, MODEL, "TinyCOCO"))
    assert len(records) == 5 and not any("error" in r for r in records.values())
    assert {r["batch_size"] for r in records.values()} <= {1, 2}  # every row came from a retried, smaller batch
    assert {r["batch_requested"] for r in records.values()} == {4}  # the setting, which the report compares runs by
    reference = stats.read_records(stats.stats_path(clean_dir / MODEL, MODEL, "TinyCOCO"))
    assert {i: r["prediction"] for i, r in records.items()} == {i: r["prediction"] for i, r in reference.items()}
    assert pd.read_excel(faulty_dir / MODEL / f"{MODEL}_TinyCOCO.xlsx")["prediction"].tolist() == (
        pd.read_excel(clean_dir / MODEL / f"{MODEL}_TinyCOCO.xlsx")["prediction"].tolist()
    )


@needs_vlmeval
def test_a_set_missing_a_column_fails_before_any_model_loads(sandbox):  # noqa: F811
    table = build_mcq_table(num_questions=2).drop(columns=["question"])
    path = write_set(sandbox, "NoQuestionMCQ", table)
    work_dir = sandbox["root"] / "malformed"
    result = run_py(sandbox, ["--data", "NoQuestionMCQ", "--model", MODEL, *TOKENS, "--work-dir", str(work_dir)])
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert f"{path}: missing column(s) question" in result.stderr and "MCQ (MMBench layout)" in result.stderr
    assert not (work_dir / MODEL / f"{MODEL}_NoQuestionMCQ.xlsx").exists()
    assert "Infer " not in result.stderr + result.stdout  # VLMEvalKit's inference loop never started


@needs_vlmeval
def test_an_unknown_dataset_name_fails_before_any_model_loads_naming_the_close_ones(sandbox):  # noqa: F811
    """VLMEvalKit skips a set it cannot build with a warning and runs the others (run.py then exited
    1 after the whole run): a typo is refused first, with exit 2."""
    work_dir = sandbox["root"] / "typo"
    result = run_py(sandbox, ["--data", "TinyMMBench", "TinyCOCOO", "--model", MODEL, *TOKENS, "--work-dir", str(work_dir)])
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert "unknown dataset name(s) 'TinyCOCOO' (did you mean TinyCOCO" in result.stderr
    assert "NAME for a custom set at" in result.stderr
    assert not (work_dir / MODEL).exists() or not any((work_dir / MODEL).rglob("*.xlsx"))
    assert "Infer " not in result.stderr + result.stdout


@pytest.mark.parametrize("indices,needle", [
    (["0", "1", "2", "2"], "index 2 repeated: every row needs its own index"),
    (["0", "", "2", "3"], "empty index in data row(s) 2 (1 = the first row after the header): every row needs its own index"),
    (["0", "1", "01", "3"], "index 1 and 01 are the same number, as VLMEvalKit reads the column"),  # pandas reads 1, 1
    (["a", "1", "01", "3"], None),  # not all numbers: read as text, where 1 and 01 differ
    (["0", "1", "2", "3"], None),
])
def test_a_custom_set_needs_one_index_per_row(tmp_path, indices, needle):
    """A repeated index gave two rows (different questions or images) one answer with exit 0; an
    empty one made the index floats, and evaluation refused the whole set. Both are refused before
    any model loads (run.py's check of local sets)."""
    from vlmeval_plugin.layouts import check_tsv

    table = build_mcq_table(num_questions=1).head(4).assign(index=indices)
    path = tmp_path / "Custom.tsv"
    table.to_csv(path, sep="\t", index=False)
    problem = check_tsv(path)
    assert problem is None if needle is None else needle in problem


@pytest.mark.parametrize("answers,needle", [
    (["A", "", "C", "B"], "empty answer in the row(s) of index 1000000: every row of a MCQ (MMBench layout) set is scored against its answer"),
    (["A", " ", "C", None], "empty answer in the row(s) of index 1000000, 3000000"),
    (["A", "NA", "C", "B"], "empty answer in the row(s) of index 1000000"),  # VLMEvalKit reads "NA" as missing
    (["A", "B", "C", "D"], None),
])
def test_a_custom_set_needs_an_answer_in_every_row(tmp_path, answers, needle):
    """An empty answer was scored as a miss with no word (in a circular set, its whole group): a
    custom set with one is refused before any model loads, naming the rows."""
    from vlmeval_plugin.layouts import check_tsv

    table = build_mcq_table(num_questions=1).head(4).assign(answer=answers)
    path = tmp_path / "Custom.tsv"
    table.to_csv(path, sep="\t", index=False)
    problem = check_tsv(path)
    assert problem is None if needle is None else needle in problem
    assert check_tsv(path, scored=False) is None  # --mode infer generates only: unlabelled rows are fine
    table.drop(columns=["A", "B", "C", "D"]).to_csv(path, sep="\t", index=False)  # a VQA set: no scorer, answers unread
    assert check_tsv(path) is None



def test_a_row_is_named_by_its_index_even_after_a_field_of_several_lines(tmp_path):
    """The message named a file line as row + 2, one line a row: after a quoted field spanning lines
    (an MMBench-style hint) it named the wrong line."""
    from vlmeval_plugin.layouts import check_tsv

    table = build_mcq_table(num_questions=1).head(3).assign(index=["7", "8", "9"], answer=["A", "B", ""])
    table.loc[0, "question"] = "first line\nsecond line"
    path = tmp_path / "Custom.tsv"
    table.to_csv(path, sep="\t", index=False)
    assert len(path.read_text().splitlines()) == 5  # the header, three rows, one of them on two lines
    assert "empty answer in the row(s) of index 9:" in check_tsv(path)


@pytest.mark.parametrize("answer", ["a red circle at the top", "('a cat')", "[]", "['a cat', 3]"])
def test_a_caption_answer_vlmevalkits_scorer_cannot_read_is_refused_before_any_row_runs(tmp_path, answer):
    """VLMEvalKit's caption scorer evals each answer into a list of captions: a bare string, a string
    in parentheses or an empty list raised only after every row had been generated."""
    from vlmeval_plugin.layouts import check_tsv

    image = build_mcq_table(num_questions=1)["image"][0]
    good = "['a red circle at the top', 'a circle']"
    table = pd.DataFrame({"index": [0, 1], "image": [image, image], "answer": [good, answer]})
    path = tmp_path / "Captions.tsv"
    table.to_csv(path, sep="\t", index=False)
    assert "the answer of the row(s) of index 1 is not a non-empty list of captions" in check_tsv(path)
    table.assign(answer=[good, good]).to_csv(path, sep="\t", index=False)
    assert check_tsv(path) is None
    pytest.importorskip("vlmeval")
    from vlmeval.dataset.image_caption import ImageCaptionDataset

    predictions = tmp_path / "m_Captions.xlsx"  # the reference: VLMEvalKit's scorer on that answer
    pd.DataFrame({"index": [0, 1], "answer": [good, answer], "prediction": ["a red circle", "a cat"]}).to_excel(predictions, index=False)
    with pytest.raises((SyntaxError, AssertionError, AttributeError)):
        ImageCaptionDataset.evaluate(str(predictions))

def test_a_custom_vqa_set_is_prompted_and_its_missing_scorer_is_a_failure(sandbox):  # noqa: F811
    """A custom TSV with a question and no options is a VQA set to VLMEvalKit (CustomVQADataset),
    though DATASET_TYPE calls the name MCQ: every row failed as "needs options A and B". Its rows
    now generate as upstream LLaVA prompts them; VLMEvalKit has no scorer for it and raises a
    NotImplementedError without a message, which run.py let pass with exit 0."""
    table = build_mcq_table(num_questions=1).drop(columns=["A", "B", "C", "D", "hint"]).head(3)
    table["index"] = [str(i) for i in range(len(table))]
    write_set(sandbox, "MyVQA", table)
    work_dir = sandbox["root"] / "custom_vqa"
    result = run_py(sandbox, ["--data", "MyVQA", "--model", MODEL, *TOKENS, "--work-dir", str(work_dir)])
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert f"{MODEL} x MyVQA: raised an error without a message" in result.stderr
    predicted = pd.read_excel(work_dir / MODEL / f"{MODEL}_MyVQA.xlsx")
    assert len(predicted) == 3 and not predicted["prediction"].astype(str).str.startswith(FAIL_PREFIX).any()


SPLIT_SCRIPT = r"""
import json
import torch
from vlmeval_plugin.model import HybridLLaVA

model = HybridLLaVA.__new__(HybridLLaVA)  # no checkpoint: only the retry logic is exercised
model.device, model.setting = torch.device("cpu"), "stock"
sizes = []

def generate_batch(messages):
    sizes.append(len(messages))
    if len(messages) > 2 or "bad" in messages:
        raise RuntimeError("injected")
    return [dict(prediction=message.upper()) for message in messages]

model.generate_batch = generate_batch
outcomes = model._generate_or_split([(i, "bad" if i == 3 else f"row{i}") for i in range(6)])
print(json.dumps({"sizes": sizes, "outcomes": outcomes}))
"""


@needs_vlmeval
def test_only_a_row_that_fails_on_its_own_becomes_a_failed_row(sandbox):  # noqa: F811
    result = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT], env=sandbox["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    outcomes = {index: record for index, record in report["outcomes"]}
    assert sorted(outcomes) == list(range(6))  # every row answered once, in order
    assert outcomes[3]["prediction"].startswith(FAIL_PREFIX) and "generate failed: RuntimeError: injected" in outcomes[3]["error"]
    assert all(outcomes[i] == {"prediction": f"ROW{i}"} for i in (0, 1, 2, 4, 5))
    assert report["sizes"][0] == 6 and max(report["sizes"][1:]) <= 3 and report["sizes"].count(1) >= 1


FREED_SCRIPT = """
import json, weakref
import torch
from vlmeval_plugin.model import HybridLLaVA

model = HybridLLaVA.__new__(HybridLLaVA)
model.device, model.setting = torch.device("cpu"), "stock"
failed_calls, alive_at_retry = [], []

def generate_batch(messages):
    activations = torch.empty(1024)  # what a failed generate holds in its frames (a KV cache, on a GPU)
    if len(messages) > 1:
        failed_calls.append(weakref.ref(activations))
        raise RuntimeError("CUDA out of memory (injected)")
    alive_at_retry.append(sum(ref() is not None for ref in failed_calls))
    return [dict(prediction="ok")]

model.generate_batch = generate_batch
model._generate_or_split([(i, f"row{i}") for i in range(2)])
print(json.dumps(alive_at_retry))
"""


@needs_vlmeval
def test_a_failed_batch_is_freed_before_its_rows_are_retried(sandbox):  # noqa: F811
    """Retrying inside the except block kept the failed call's frames (its activations) alive through
    the exception's traceback, so the retry of an out-of-memory batch ran out of memory again."""
    result = subprocess.run([sys.executable, "-c", FREED_SCRIPT], env=sandbox["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [0, 0]


@needs_vlmeval
def test_circular_scoring_gets_a_scratch_file_of_its_own_and_removes_it(tmp_path, monkeypatch):
    """Upstream scores MMBench-style sets through a `<second>.xlsx` in the system's `/tmp`: two jobs finishing in the same
    second shared one file, and every evaluation left one behind. Two calls within one (frozen)
    second must write two different files, score from them, and leave neither."""
    import datetime

    import vlmeval.dataset.utils.multiple_choice as multiple_choice
    import vlmeval.smp.misc as misc

    for name in ("mcq_circular_eval", "timestr"):  # upstream's again after this test
        monkeypatch.setattr(multiple_choice, name, getattr(multiple_choice, name))
    robust._private_circular_scratch()
    frozen = datetime.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(misc, "datetime", type("FrozenDatetime", (), {"datetime": type("Now", (), {"now": staticmethod(lambda: frozen)})}))
    written = []
    upstream_dump = multiple_choice.dump

    def recording_dump(data, path, *args, **kwargs):
        if Path(path).parent == Path("/tmp"):
            written.append(str(path))
        return upstream_dump(data, path, *args, **kwargs)

    monkeypatch.setattr(multiple_choice, "dump", recording_dump)
    table = build_mcq_table(num_questions=2).drop(columns=["image"])
    hits = []
    for call, wrong_group in enumerate((None, 1)):
        predictions = table.assign(prediction=[("A" if group == wrong_group else answer) for group, answer in zip(table["index"] % 1_000_000, table["answer"])])
        scored = multiple_choice.mcq_circular_eval(None, predictions, table, 1, str(tmp_path / f"result{call}.pkl"))
        hits.append(scored.set_index("index")["hit"].to_dict())
    assert hits == [{0: 1, 1: 1}, {0: 1, 1: 0}]  # group 1's copies answered "A" in the second call: not all right
    assert len(written) == 2 and written[0] != written[1], written
    assert all("20260102030405" in path and not Path(path).exists() for path in written), written


@pytest.fixture
def installed(monkeypatch):
    """VLMEvalKit's scoring module after robust.install(), as run.py sets it up; undone after the test."""
    import vlmeval.dataset.image_base as image_base
    import vlmeval.dataset.utils.multiple_choice as multiple_choice
    import vlmeval.inference as inference
    import vlmeval.utils.mp_util as mp_util

    patched = {multiple_choice: ("mcq_circular_eval", "mcq_vanilla_eval", "extract_answer_from_item", "timestr", "dump"),
               image_base: ("decode_base64_to_image_file", "read_ok"), image_base.ImageBaseDataset: ("__init__",),
               inference: ("FAIL_MSG", "infer_data"), mp_util: ("dump",)}
    for owner, names in patched.items():
        for name in names:
            monkeypatch.setattr(owner, name, getattr(owner, name))
    robust.install()
    return multiple_choice


@pytest.mark.parametrize("circular", [False, True])
def test_a_regenerated_row_is_judged_again_not_read_from_the_verdict_cache(tmp_path, installed, circular):
    """Upstream caches each row's (circular: group's) verdict by index and never judges it again: a
    failed row fixed by a rerun kept its failed verdict. Every call must score as a fresh cache does,
    and a cache left by an earlier version (no record of what it judged) is judged afresh."""
    multiple_choice = installed
    evaluate = multiple_choice.mcq_circular_eval if circular else multiple_choice.mcq_vanilla_eval
    table = build_mcq_table(num_questions=3).drop(columns=["image"])
    if not circular:
        table = table[table["index"] < 1_000_000].reset_index(drop=True)
    failed = "Failed to obtain answer: a bad image cell"
    runs = [  # the first run fails question 1's rows; the rerun regenerates them, right; a third answers "A" everywhere
        [failed if index % 1_000_000 == 1 else answer for index, answer in zip(table["index"], table["answer"])],
        list(table["answer"]),
        ["A"] * len(table),
    ]
    cached, fresh = tmp_path / "cached.pkl", []
    for run, predictions in enumerate(runs):
        data = table.assign(prediction=predictions)
        scored = evaluate(None, data.copy(), table, 1, str(cached), "TinyMMBench")
        reference = evaluate(None, data.copy(), table, 1, str(tmp_path / f"fresh{run}.pkl"), "TinyMMBench")
        assert scored.set_index("index")["hit"].to_dict() == reference.set_index("index")["hit"].to_dict()
        fresh.append(reference["hit"].sum())
    assert fresh[0] < fresh[1] and fresh[2] < fresh[1]  # each call's predictions really change the verdicts
    Path(str(cached) + ".judged.json").unlink()  # a cache from before the record: judged afresh
    data = table.assign(prediction=runs[1])
    assert evaluate(None, data.copy(), table, 1, str(cached), "TinyMMBench")["hit"].sum() == fresh[1]


class Judge:
    """A judge model that answers "A" to every question, and goes down after `answers` calls."""

    def __init__(self, answers=None):
        self.calls, self.answers = 0, answers

    def generate(self, prompt):
        self.calls += 1
        if self.answers is not None and self.calls > self.answers:
            raise RuntimeError("the judge API went down")
        return "A"


def killed_after(saves: int):
    """upstream's track_progress_rich, one task at a time, killed once it has saved `saves` verdicts."""
    from vlmeval.smp import dump, load

    def track_progress_rich(func, tasks, nproc=1, save=None, keys=None, **kwargs):
        saved = load(save) if os.path.exists(save) else {}
        for count, (key, task) in enumerate(zip(keys, tasks)):
            if count == saves:
                raise KeyboardInterrupt
            saved[key] = func(**task)
            dump(saved, save)

    return track_progress_rich


def test_a_judging_run_cut_short_keeps_its_verdicts_and_exact_matching_ones_are_judged_again(tmp_path, installed, monkeypatch):
    """Upstream saves each verdict as it comes: a rerun after a kill asks the judge only about the
    rows it had not judged. Verdicts made by exact matching while the judge was down (into the
    judge's own cache) are judged by the judge once it answers, as on a fresh cache; the judge's
    verdicts stand through a later run where it is down again."""
    table = build_mcq_table(num_questions=6).drop(columns=["image"])
    table = table[table["index"] < 1_000_000].reset_index(drop=True)
    data = table.assign(prediction="I am not sure about this one")  # no letter: exact matching cannot decide
    fresh = Judge()
    expected = installed.mcq_vanilla_eval(fresh, data.copy(), table, 1, str(tmp_path / "fresh_gpt4_result.pkl"), "TinyMMBench")
    assert expected["hit"].sum() > 0  # the judge's verdicts differ from exact matching's (all 0)

    cache, killed = str(tmp_path / "m_TinyMMBench_gpt4_result.pkl"), Judge()
    upstream_track = installed.track_progress_rich
    monkeypatch.setattr(installed, "track_progress_rich", killed_after(4))
    with pytest.raises(KeyboardInterrupt):
        installed.mcq_vanilla_eval(killed, data.copy(), table, 1, cache, "TinyMMBench")
    monkeypatch.setattr(installed, "track_progress_rich", upstream_track)
    rerun = Judge()
    scored = installed.mcq_vanilla_eval(rerun, data.copy(), table, 1, cache, "TinyMMBench")
    assert 0 < killed.calls and rerun.calls == fresh.calls - killed.calls
    assert scored["hit"].tolist() == expected["hit"].tolist()

    fallback = str(tmp_path / "fallback_TinyMMBench_gpt4_result.pkl")
    installed.mcq_vanilla_eval(None, data.copy(), table, 1, fallback, "TinyMMBench")  # the judge was down: exact matching
    judged = Judge()
    scored = installed.mcq_vanilla_eval(judged, data.copy(), table, 1, fallback, "TinyMMBench")
    assert judged.calls == fresh.calls and scored["hit"].tolist() == expected["hit"].tolist()
    down_again = installed.mcq_vanilla_eval(None, data.copy(), table, 1, fallback, "TinyMMBench")
    assert down_again["hit"].tolist() == expected["hit"].tolist()  # the judge's verdicts stand while it is down


@pytest.mark.parametrize("circular", [False, True])
def test_an_empty_question_cell_is_scored_not_a_crash_of_the_whole_set(tmp_path, installed, circular):
    """An empty question reads back from the prediction .xlsx as NaN; upstream's answer extraction
    raised on it ("expected string or bytes-like object") and no row of the set was scored. Each
    row must score as the same row with an empty-string question does."""
    multiple_choice = installed
    evaluate = multiple_choice.mcq_circular_eval if circular else multiple_choice.mcq_vanilla_eval
    table = build_mcq_table(num_questions=3).drop(columns=["image"])
    if not circular:
        table = table[table["index"] < 1_000_000].reset_index(drop=True)
    predictions = ["Failed to obtain answer: empty question" if index % 1_000_000 == 1 else "the answer is unclear"
                   for index in table["index"]]
    blank = table.assign(prediction=predictions, question=["" if i % 1_000_000 == 1 else q for i, q in zip(table["index"], table["question"])])
    missing = blank.assign(question=[float("nan") if i % 1_000_000 == 1 else q for i, q in zip(table["index"], blank["question"])])
    expected = evaluate(None, blank.copy(), table, 1, str(tmp_path / "blank.pkl"), "TinyMMBench")
    scored = evaluate(None, missing.copy(), table, 1, str(tmp_path / "missing.pkl"), "TinyMMBench")
    assert scored.set_index("index")["hit"].to_dict() == expected.set_index("index")["hit"].to_dict()


SQUARE_SCRIPT = r"""
import resource
import numpy as np
from PIL import Image
from hybrid_vlm.images import MAX_SQUARE_SIDE, expand_to_square

background = (10, 20, 30)
photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
reference = np.zeros((300, 300, 3), dtype=np.uint8) + np.array(background, dtype=np.uint8)
reference[50:250] = np.asarray(photo)  # LLaVA's pad: centred on the mean colour
print("exact", np.array_equal(np.asarray(expand_to_square(photo, background)), reference))
strip = expand_to_square(Image.new("RGB", (1, 40_000), (255, 255, 255)), background)
white_columns = (np.asarray(strip) > 200).all(axis=2).all(axis=0)  # the strip, top to bottom
print("strip", strip.size == (MAX_SQUARE_SIDE, MAX_SQUARE_SIDE), int(white_columns.sum()) == 1)
try:  # this process's own high-water mark: ru_maxrss also keeps the parent's, from before exec (a pytest worker's)
    print("peak_gb", next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 2**20)
except OSError:
    print("peak_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


@needs_vlmeval
def test_a_very_long_image_is_padded_on_a_bounded_square(sandbox):  # noqa: F811
    """LLaVA's padding to a square is upstream's, pixel for pixel, for an ordinary image; a 1 x 40000
    strip (a few bytes of PNG) would have needed a 40000^2 canvas (about 5 GB) and killed the run on
    the same row at every rerun: it is shrunk to MAX_SQUARE_SIDE first, still centred and whole."""
    result = subprocess.run([sys.executable, "-c", SQUARE_SCRIPT], env=sandbox["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines()[-3:])
    assert lines["exact"] == "True" and lines["strip"] == "True True", lines
    assert float(lines["peak_gb"]) < 2.0, lines


def test_a_prediction_survives_vlmevalkits_xlsx_round_trip(tmp_path):
    """What the tiny random model wrote on TinyCOCO: "= gUSER\\ufffd\\t\\x08*". VLMEvalKit stored it as
    a formula and the control character made the file unreadable, costing the set its score."""
    from vlmeval.smp import dump, load

    from vlmeval_plugin.robust import storable_prediction

    raw = ["= gUSER\ufffd\t\x08*", "B", "=5", "a red\ncircle", "\x00\x1f"]
    broken = tmp_path / "raw.xlsx"
    dump(pd.DataFrame(dict(index=range(5), prediction=raw)), str(broken))
    with pytest.raises(Exception, match="not well-formed"):
        load(str(broken))
    stored = tmp_path / "stored.xlsx"
    dump(pd.DataFrame(dict(index=range(5), prediction=[storable_prediction(text) for text in raw])), str(stored))
    assert load(str(stored))["prediction"].fillna("").tolist() == [" = gUSER\ufffd\t*", "B", " =5", "a red\ncircle", ""]


@needs_vlmeval
def test_a_resumed_checkpoint_drops_its_failed_rows_and_sets_a_torn_one_aside(tmp_path, monkeypatch, capsys):
    """An interrupted run resumes from VLMEvalKit's rank checkpoint, which infer_data took whole: a
    row that failed before the interruption was never asked again, even once its input was fixed
    (an end-to-end kill, fix and rerun exited 1 with the same failed rows), and a checkpoint torn by
    a kill failed every rerun. The inner infer_data here records what it would read."""
    import pickle

    import vlmeval.inference as inference
    from vlmeval.smp.file import INFER_FAIL_MSG

    read = []

    def recording_infer_data(model, model_name, work_dir, dataset, out_file, verbose=False, api_nproc=4, use_vllm=False, retry_failed=True):
        read.append(pickle.loads(Path(out_file).read_bytes()) if Path(out_file).exists() else None)

    monkeypatch.setattr(inference, "infer_data", recording_infer_data)  # upstream's (or the plugin's) again after
    monkeypatch.setattr(inference, "FAIL_MSG", INFER_FAIL_MSG)  # as the plugin sets it
    robust._resume_checkpoints_cleanly()
    checkpoint = tmp_path / "01_Set.pkl"
    entries = {1: "A", 2: f"{INFER_FAIL_MSG}: row 2's image cannot be decoded", 3: "B"}
    checkpoint.write_bytes(pickle.dumps(entries))
    inference.infer_data(model=None, model_name="m", work_dir=str(tmp_path), dataset=None, out_file=str(checkpoint), retry_failed=False)
    inference.infer_data(model=None, model_name="m", work_dir=str(tmp_path), dataset=None, out_file=str(checkpoint))
    assert read == [entries, {1: "A", 3: "B"}]
    checkpoint.write_bytes(pickle.dumps(entries)[:20])  # a kill in the middle of VLMEvalKit's dump
    inference.infer_data(None, "m", str(tmp_path), None, str(checkpoint))
    assert read[-1] is None and (tmp_path / "01_Set.pkl.unreadable").is_file()
    assert f"the checkpoint {checkpoint} could not be read" in capsys.readouterr().out


def test_only_unreadable_prediction_files_are_set_aside(tmp_path):
    """A torn .xlsx and a table without a prediction column are moved aside; an empty set's `[]`
    (PRED_FORMAT=json) and a good table stay."""
    model = "m"
    pd.DataFrame({"index": [1, 2], "prediction": ["A", "B"]}).to_excel(tmp_path / f"{model}_Good.xlsx", index=False)
    torn = (tmp_path / f"{model}_Good.xlsx").read_bytes()[:300]
    (tmp_path / f"{model}_Torn.xlsx").write_bytes(torn)
    (tmp_path / f"{model}_Empty.json").write_text("[]")
    pd.DataFrame({"index": [1], "answer": ["A"]}).to_csv(tmp_path / f"{model}_NoPrediction.tsv", sep="\t", index=False)
    moved = robust.set_aside_unreadable_predictions(str(tmp_path), model, ["Good", "Torn", "Empty", "NoPrediction"])
    assert sorted(Path(path).name for path in moved) == [f"{model}_NoPrediction.tsv", f"{model}_Torn.xlsx"]
    assert (tmp_path / f"{model}_Good.xlsx").exists() and (tmp_path / f"{model}_Empty.json").exists()
    assert (tmp_path / f"{model}_Torn.xlsx.unreadable").exists()


def test_an_undecodable_image_fails_with_the_same_reason_every_run():
    """PIL names the buffer it could not read by its address (<_io.BytesIO object at 0x7f...>): the
    failed row's reason, in the prediction file and the report, changed from run to run."""
    from vlmeval_plugin.robust import RowError, decode_image

    with pytest.raises(RowError) as error:
        decode_image(base64.b64encode(b"not an image at all" * 8).decode())
    reason = str(error.value)
    assert "cannot identify image file" in reason and " at 0x" not in reason, reason


def test_a_torn_verdict_cache_is_set_aside_and_its_rows_judged_again(tmp_path, installed, capsys):
    """A kill (or a scheduler's SIGTERM) while upstream rewrote its verdict cache left it torn, and
    every later evaluation of the set failed loading it ("Ran out of input"). It is set aside, said
    so, and the rows are judged as on a fresh cache."""
    table = build_mcq_table(num_questions=3).drop(columns=["image"])
    table = table[table["index"] < 1_000_000].reset_index(drop=True)
    data = table.assign(prediction=list(table["answer"]))
    expected = installed.mcq_vanilla_eval(None, data.copy(), table, 1, str(tmp_path / "fresh.pkl"), "TinyMMBench")
    torn = tmp_path / "m_TinyMMBench_exact_matching_result.pkl"
    torn.write_bytes(b"")
    scored = installed.mcq_vanilla_eval(None, data.copy(), table, 1, str(torn), "TinyMMBench")
    assert scored["hit"].tolist() == expected["hit"].tolist() and expected["hit"].sum() == len(table)
    assert Path(f"{torn}.unreadable").exists() and "verdict cache" in capsys.readouterr().out


def test_dump_whole_keeps_upstreams_pkl_fallback_under_the_target_name(tmp_path):
    """Upstream's dump writes `<name>.pkl` where a table format fails: that file gets the target's name."""
    import pickle

    def falls_back(data, path):
        Path(path + ".pkl").write_bytes(pickle.dumps(data))

    robust.dump_whole(falls_back)({"a": 1}, str(tmp_path / "table.xlsx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.xlsx.pkl"]


def test_a_file_written_through_dump_whole_is_never_torn(tmp_path):
    """VLMEvalKit's dump, as the scoring and track_progress_rich use it after install(): a write
    cut short (here, an exception halfway) leaves the previous file whole and no scratch behind."""
    import pickle

    def cut_short(data, path):
        Path(path).write_bytes(pickle.dumps(data)[:5])
        raise KeyboardInterrupt

    target = tmp_path / "cache.pkl"
    target.write_bytes(pickle.dumps({"0": "A"}))
    with pytest.raises(KeyboardInterrupt):
        robust.dump_whole(cut_short)({"0": "A", "1": "B"}, str(target))
    assert pickle.loads(target.read_bytes()) == {"0": "A"} and [p.name for p in tmp_path.iterdir()] == ["cache.pkl"]
    robust.dump_whole(lambda data, path: Path(path).write_bytes(pickle.dumps(data)))({"0": "B"}, str(target))
    assert pickle.loads(target.read_bytes()) == {"0": "B"}


def test_a_torn_cached_image_is_written_again_not_failed_forever(tmp_path):
    """dump_image writes a set's image once and reuses it while upstream's read_ok says so; read_ok
    read the header only, so an image torn by a kill stayed cached and failed its row in every run.
    The whole image is decoded now, and writes go through a scratch file."""
    from vlmeval.smp.vlm import read_ok as upstream_read_ok

    cell = build_mcq_table(num_questions=1)["image"][0]
    path = tmp_path / "images" / "0.png"
    robust.decode_base64_to_image_file(cell, str(path))
    assert robust.read_ok(str(path)) and [p.name for p in path.parent.iterdir()] == ["0.png"]
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert upstream_read_ok(str(path)) and not robust.read_ok(str(path))  # the header survives, the image does not
    assert "cannot be read" in robust.image_file_problem(str(path))
    assert "does not exist" in robust.image_file_problem(str(tmp_path / "missing.png"))


@needs_vlmeval
def test_a_missing_file_in_an_image_path_set_fails_its_rows_alone(sandbox, tmp_path):  # noqa: F811
    """A set of image files (an `image_path` column, no `image` cells): upstream asserted on a path
    that does not exist and skipped the whole set. The rows naming it fail, with the reason; the
    others are answered and scored."""
    table = build_mcq_table(num_questions=2)
    files = []
    for index, cell in zip(table["index"], table["image"]):
        if index < 1_000_000:
            files.append(tmp_path / f"{index}.png")
            robust.decode_base64_to_image_file(cell, str(files[-1]))
    paths = {index % 1_000_000: str(tmp_path / f"{index % 1_000_000}.png") for index in table["index"]}
    paths[1] = str(tmp_path / "gone.png")
    table = table.drop(columns=["image"]).assign(image_path=[paths[index % 1_000_000] for index in table["index"]])
    write_set(sandbox, "PathMCQ", table)
    work_dir = sandbox["root"] / "image_path"
    result = run_py(sandbox, ["--data", "PathMCQ", "--model", MODEL, *TOKENS, "--work-dir", str(work_dir)])
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    predicted = pd.read_excel(work_dir / MODEL / f"{MODEL}_PathMCQ.xlsx")
    failed = {int(i) % 1_000_000 for i, p in zip(predicted["index"], predicted["prediction"].astype(str)) if p.startswith(FAIL_PREFIX)}
    assert failed == {1} and len(predicted) == len(table)
    assert "gone.png does not exist" in output
    assert (work_dir / MODEL / f"{MODEL}_PathMCQ_acc.csv").exists(), output[-3000:]


# ---- faults found by fault injection: torn files, reruns, resumes -------------------------------------

FORCED_FIRST_ANSWER = r"""
import os, sys
from vlmeval_plugin import model as m
original, calls = m.HybridLLaVA.answer, []
def answer(self, message, text):
    calls.append(1)
    return os.environ["FORCED"] if len(calls) == 1 else original(self, message, text)
m.HybridLLaVA.answer = answer
from vlmeval_plugin.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_stats_line_torn_inside_a_character_is_skipped_not_fatal(tmp_path):
    """A kill inside a multi-byte character (a caption with an accent, an MMBench_CN answer) raised
    UnicodeDecodeError at every later run: the set's predictions could not be rebuilt."""
    path = stats.stats_path(tmp_path, "m", "Set")
    stats.append_record(path, {"index": "0", "prediction": "ok"})
    torn = json.dumps({"index": "1", "prediction": "一只猫"}, ensure_ascii=False).encode()
    with open(path, "ab") as handle:
        handle.write(torn[: torn.index("一".encode()) + 1])  # a kill after one byte of a 3-byte character
    stats.append_record(path, {"index": "2", "prediction": "B"})
    assert sorted(stats.read_records(path)) == ["0", "2"]
    assert results.read_dataset(tmp_path, "m", "Set").stats_rows == 2


@needs_vlmeval
@pytest.mark.parametrize("forced", ["None", ""])
def test_a_rerun_keeps_a_finished_answer_pandas_reads_as_missing(sandbox, forced):  # noqa: F811
    """VLMEvalKit reloads the prediction file on a rerun: "None", "NA", "" came back NaN and were written as "nan"."""
    write_set(sandbox, f"NanCap{len(forced)}", build_caption_table(3))
    work_dir = sandbox["root"] / f"nan_rerun{len(forced)}"
    args = ["--data", f"NanCap{len(forced)}", "--model", MODEL, "--max-new-tokens", "3", "--work-dir", str(work_dir), "--mode", "infer"]
    first = subprocess.run([sys.executable, "-c", FORCED_FIRST_ANSWER, *args], env=dict(sandbox["env"], FORCED=forced),
                           cwd=sandbox["root"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_py(sandbox, args)
    assert again.returncode == 0, again.stderr[-3000:]
    cell = openpyxl.load_workbook(work_dir / MODEL / f"{MODEL}_NanCap{len(forced)}.xlsx").active["D2"].value
    assert (cell or "") == forced


@needs_vlmeval
def test_an_image_file_whose_extension_vlmevalkit_refuses_fails_its_row_alone(sandbox, tmp_path):  # noqa: F811
    """VLMEvalKit goes by the extension: one .jfif file ended the whole set with a bare AssertionError."""
    table = build_mcq_table(num_questions=4)
    table = table[table["index"] < 4].reset_index(drop=True)
    paths = []
    for index, cell in zip(table["index"], table["image"]):
        path = tmp_path / f"{index}.png"
        robust.decode_base64_to_image_file(cell, str(path))
        if index == 2:
            os.replace(path, tmp_path / "2.jfif")
            path = tmp_path / "2.jfif"
        paths.append(str(path))
    write_set(sandbox, "JfifPathMCQ", table.drop(columns=["image"]).assign(image_path=paths))
    work_dir = sandbox["root"] / "jfif"
    result = run_py(sandbox, ["--data", "JfifPathMCQ", "--model", MODEL, "--max-new-tokens", "2", "--work-dir", str(work_dir), "--batch-size", "4"])
    assert result.returncode == 1 and "combination failed" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    assert f"{MODEL} x JfifPathMCQ: row 2 failed: the image file" in result.stderr and ".jfif" in result.stderr
    predicted = pd.read_excel(work_dir / MODEL / f"{MODEL}_JfifPathMCQ.xlsx")
    assert [str(p).startswith("Failed to obtain answer") for p in predicted["prediction"]] == [False, False, True, False]


@needs_vlmeval
def test_a_failed_row_is_a_miss_whatever_its_reason_mentions(installed):  # noqa: F811
    """The failure marker went through VLMEvalKit's option matching like an answer: a reason naming an
    option's text chose that option."""
    multiple_choice = installed
    item = pd.Series(dict(question="What is in the picture?", A="empty", B="a red square on a striped background", answer="A",
                          prediction="Failed to obtain answer: the image cell is empty"))
    assert multiple_choice.extract_answer_from_item(None, item, "Custom")["opt"] == "Z"


@needs_vlmeval
def test_a_finished_row_is_answered_from_the_stats_even_if_its_input_is_unreachable_now(sandbox, tmp_path):  # noqa: F811
    """A resume on a node without the image share turned finished rows into failed ones, which the
    next run generated again."""
    table = build_mcq_table(num_questions=3)
    table = table[table["index"] < 3].reset_index(drop=True)
    (tmp_path / "images").mkdir()
    paths = []
    for index, cell in zip(table["index"], table["image"]):
        paths.append(str(tmp_path / "images" / f"{index}.png"))
        robust.decode_base64_to_image_file(cell, paths[-1])
    write_set(sandbox, "AwayPathMCQ", table.drop(columns=["image"]).assign(image_path=paths))
    work_dir = sandbox["root"] / "away"
    args = ["--data", "AwayPathMCQ", "--model", MODEL, "--max-new-tokens", "2", "--work-dir", str(work_dir), "--mode", "infer"]
    assert run_py(sandbox, args).returncode == 0
    folder = work_dir / MODEL
    written = pd.read_excel(folder / f"{MODEL}_AwayPathMCQ.xlsx")["prediction"].tolist()
    (folder / f"{MODEL}_AwayPathMCQ.xlsx").unlink()  # a kill before VLMEvalKit's final write
    shutil.move(tmp_path / "images", tmp_path / "away")  # the images are not reachable from the resuming node
    resumed = run_py(sandbox, args)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert len(stats.stats_path(folder, MODEL, "AwayPathMCQ").read_text().splitlines()) == 3  # nothing failed, nothing generated
    assert pd.read_excel(folder / f"{MODEL}_AwayPathMCQ.xlsx")["prediction"].tolist() == written


@needs_vlmeval
def test_a_prompt_longer_than_the_llm_fails_its_row_alone(sandbox):  # noqa: F811
    """A row whose prompt is above the LLM's max_position_embeddings (4096 on LLaVA-1.5 and the tiny
    model) was generated silently with positions the model never saw. It fails, with its length and
    the limit; the rows batched with it are answered as they are alone."""
    table = build_mcq_table(num_questions=3)
    table = table[table["index"] < 3].reset_index(drop=True)
    table.loc[1, "question"] = "Which colour is it? " + "very " * 4200
    write_set(sandbox, "LongMCQ", table)
    runs = {}
    for batch in (3, 1):
        work_dir = sandbox["root"] / f"long{batch}"
        result = run_py(sandbox, ["--data", "LongMCQ", "--model", MODEL, *TOKENS, "--work-dir", str(work_dir), "--batch-size", str(batch)])
        output = result.stdout + result.stderr
        assert result.returncode == 1, output[-4000:]
        assert "row 1 failed: generate failed: the prompt is " in output and "above the 4096 positions of this LLM" in output, output[-4000:]
        runs[batch] = pd.read_excel(work_dir / MODEL / f"{MODEL}_LongMCQ.xlsx").set_index("index")["prediction"].astype(str)
    assert runs[3].str.startswith(FAIL_PREFIX).tolist() == [False, True, False]
    assert runs[3].tolist() == runs[1].tolist()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "I", "I;16", "F", "P", "RGBA", "CMYK"])
def test_every_image_mode_is_saved_as_the_pixels_llava_reads(tmp_path, mode):
    """A TIFF cell of any mode is saved as a PNG whose RGB is what LLaVA's own
    `Image.open(...).convert("RGB")` makes of the original: mode I (32-bit integers) was kept as it
    was, which Pillow cannot write as PNG, and the readable row failed."""
    import base64
    import io

    gradient = Image.linear_gradient("L").resize((16, 16))
    picture = Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180)))
    original = picture.convert(mode) if mode not in ("I", "I;16", "F") else gradient.convert("I").point(lambda v: v * 3).convert(mode)
    buffer = io.BytesIO()
    original.save(buffer, format="TIFF")
    target = tmp_path / "cell.png"
    robust.decode_base64_to_image_file(base64.b64encode(buffer.getvalue()).decode(), str(target))
    expected = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    assert Image.open(target).convert("RGB").tobytes() == expected.tobytes()


@needs_vlmeval
def test_a_caption_set_with_one_option_column_is_registered_as_it_is_checked(tmp_path):
    """index, image, answer and a stray A: check_tsv reads a caption set (one option column is no MCQ,
    as VLMEvalKit has it), and the caption registration refused any A column, so the set passed the
    check and was never built."""
    path = tmp_path / "MyCaps.tsv"
    pd.DataFrame({"index": [0], "image": ["x" * 80], "answer": ["['a cat']"], "A": ["stray"]}).to_csv(path, sep="\t", index=False)
    assert layouts.check_tsv(path) is None
    script = "from vlmeval_plugin.cli import register_caption_sets; print(register_caption_sets(['MyCaps']))"
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "LMUData": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['MyCaps']"
