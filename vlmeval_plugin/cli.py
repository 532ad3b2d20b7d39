"""`python run.py ...`: VLMEvalKit's run.py with the hybrid-vlm models registered.

    python run.py --data MMBench_DEV_EN COCO_VAL --model llava_v1.5_7b_hybrid
    FASTV_K=72 python run.py --data MMBench_DEV_EN --model llava_v1.5_7b_fastv
    torchrun --nproc-per-node=8 run.py --data MMBench_DEV_EN --model llava_v1.5_7b_fastv
    python run.py          # no arguments: the bundled demo (the trained testbed, TinyMMBench + TinyCOCO, CPU)

Every VLMEvalKit flag is accepted and passed on unchanged; the plugin adds
    --model-path PATH      llava-hf checkpoint (a directory or a hub id already in the HF cache; for the
                           llava_testbed names a retrained testbed directory, else the shipped one);
                           default $HYBRID_VLM_MODEL_PATH, else llava-hf/llava-1.5-7b-hf from the cache
    --batch-size N         rows per generate call (default 1; see vlmeval_plugin/model.py)
    --max-new-tokens N     per row (default 2048 as VLMEvalKit's LLaVA; testbed: 64; tiny random model: 8)
What it changes before handing over to vlmeval.run: plugin names become their effective names
(one results folder per setting), the judge defaults to exact matching when no judge API key is
configured, the bundled Tiny* sets are written into LMUData when requested and missing, local
caption TSVs are registered, and under torchrun on a machine without CUDA the process group uses
gloo instead of VLMEvalKit's hard-coded nccl. Afterwards rank 0 prints a results table and where
the files are, and the exit status is 1 if any model x dataset failed or was skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from functools import cache, cached_property, partial
from pathlib import Path

from hybrid_vlm.provenance import checkpoint_signature, portable_path, replace_file

from . import caption_scores, layouts, results, robust, settings
from .tiny_data import BUNDLED_SETS, ensure_tiny_sets

DEMO_MODELS = ["llava_testbed", "llava_testbed_fastv", "llava_testbed_hybrid"]
DEMO_ARGS = ["--data", "TinyMMBench", "TinyCOCO", "--model", *DEMO_MODELS, "--judge", "exact_matching", "--batch-size", "8"]
JUDGE_KEY_ENVS = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "LOCAL_LLM")
FAILED_SKIPS = ("invalid_dataset", "Incomplete infer result", "No infer result found")


def plugin_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: VLMEvalKit's --model must never be read as an abbreviation of --model-path.
    parser = argparse.ArgumentParser(prog="run.py", add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("hybrid-vlm plugin options (all other flags go to VLMEvalKit)")
    group.add_argument("--model-path", default=None, help="llava-hf checkpoint dir or cached hub id")
    group.add_argument("--batch-size", type=int, default=1, help="rows per generate call (default 1)")
    group.add_argument("--max-new-tokens", type=int, default=None, help="default 2048 (the testbed: 64; tiny models: 8)")
    return parser


def peek_parser() -> argparse.ArgumentParser:
    """The few VLMEvalKit flags needed to fail fast, before importing vlmeval (about 10 s)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", nargs="+", default=[])
    parser.add_argument("--data", nargs="+", default=[])
    parser.add_argument("--config", default=None)
    return parser


def variant_checkpoint(variant: settings.Variant, model_path: str | None, build: bool = True) -> Path:
    """The checkpoint folder a plugin name runs: the tiny model (built on first use; with `build`
    False, only if it was), the bundled testbed, or `model_path` / the family's cached checkpoint,
    checked to be of the name's family. A PluginError says where it looked."""
    if variant.tiny:
        from hybrid_vlm.tiny import ensure_tiny_llava, tiny_llava_dir

        if not build and not (tiny_llava_dir() / "config.json").exists():
            raise settings.PluginError(f"the tiny LLaVA is not built yet ({portable_path(tiny_llava_dir())})")
        return ensure_tiny_llava()
    if variant.family == "testbed" and model_path is None:
        from hybrid_vlm.testbed import testbed_checkpoint

        try:
            return testbed_checkpoint()
        except FileNotFoundError as error:
            raise settings.PluginError(str(error)) from None
    # a retrained testbed (`python -m hybrid_vlm.testbed train --out DIR`) comes by --model-path
    checkpoint = settings.resolve_checkpoint(model_path, settings.FAMILY_CHECKPOINTS.get(variant.family, settings.CHECKPOINT_ID))
    settings.check_checkpoint_family(checkpoint, variant)
    return checkpoint


class PluginModel:
    """What one requested plugin name resolves to."""

    def __init__(self, requested: str, model_path: str | None):
        base = settings.base_name(requested)
        self.requested = requested
        self.variant = settings.VARIANTS[base]
        self.config = settings.hybrid_config_for(base)
        self.name = settings.effective_name(base, self.config)
        if requested != base and requested != self.name:
            raise settings.PluginError(
                f"model {requested!r} names a setting the environment does not give: FASTV_K / FASTV_LAYER / "
                f"DYMU_THRESHOLDS describe {self.name!r}. Pass the base name {base!r} and set the environment."
            )
        if self.variant.tiny and model_path is not None:
            raise settings.PluginError(
                f"--model-path is not accepted with {requested!r}: the llava_tiny names build their own random model; "
                "drop --model-path, or use a llava_testbed or llava_v1.5_7b name with it"
            )
        self.checkpoint = variant_checkpoint(self.variant, model_path)
        settings.check_llm_depth(self.checkpoint, self.config)
        settings.check_thresholds_shape(self.checkpoint, self.config)

    @cached_property
    def signature(self) -> str:
        """The checkpoint's content signature (hybrid_vlm.provenance.checkpoint_signature)."""
        return checkpoint_signature(self.checkpoint)


def is_plugin_name(name: str) -> bool:
    return settings.base_name(name) in settings.VARIANTS


def fail(message: str) -> int:
    """Exit status 2: refused before any work, before run_info.json records the run."""
    print(f"run.py: error: {message}", file=sys.stderr, flush=True)
    return 2


def register_models(plugin_models: list[PluginModel], work_dir: str, options) -> None:
    from vlmeval.config import supported_VLM

    from .model import HybridLLaVA, HybridLLaVANext
    from .qwen import HybridQwen2VL

    for item in plugin_models:
        supported_VLM[item.name] = partial(
            HybridQwen2VL if item.variant.qwen else HybridLLaVANext if item.variant.next else HybridLLaVA,
            checkpoint=str(item.checkpoint),
            hybrid=item.config,
            stats_dir=os.path.join(work_dir, item.name),
            model_name=item.name,
            batch_size=options.batch_size,
            max_new_tokens=effective_max_new_tokens(item, options),
        )


def effective_max_new_tokens(item: PluginModel, options) -> int:
    return options.max_new_tokens if options.max_new_tokens is not None else settings.max_new_tokens_for(item.variant)


def prediction_inputs(item: PluginModel, options) -> dict:
    """What a run's predictions depend on beyond its folder name: the checkpoint's content, the
    generation length, the device (float16 on CUDA, float32 on the CPU) and the content of a DyMU
    thresholds file (the name carries only its file name)."""
    import torch

    dymu = item.config.dymu if item.config is not None else None
    return {
        "checkpoint_signature": item.signature,
        "max_new_tokens": effective_max_new_tokens(item, options),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "dymu_thresholds_sha256": file_sha256(dymu) if dymu else None,
    }


def file_sha256(path: str) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# what run.py and VLMEvalKit's bookkeeping leave in a model folder that is not an output
UNREADABLE_RUN_INFO = "run_info.json.unreadable"
RUN_INFO_LOCK = "run_info.json.lock"
RECORD_FILES = ("run_info.json", UNREADABLE_RUN_INFO, RUN_INFO_LOCK, "status.json", "status.json.lock")


def is_run_info_scratch(name: str) -> bool:
    """run_info.json's scratch file (`replace_file`), left behind by a kill mid-write."""
    return name.startswith("run_info.json.") and name.endswith(".tmp")


def reuse_conflict(folder: Path, item: PluginModel, options, now: dict | None = None) -> str | None:
    """Why this run may not continue in `folder`: its outputs were made with other prediction inputs
    (`prediction_inputs`, by run_info.json's last record of a run that generated: `--mode eval`
    generates nothing), which the folder's name does not say, so VLMEvalKit would reuse them as this
    run's. None when nothing there would be reused, or an input is the same or not recorded."""
    holds_outputs = folder.is_dir() and any(p.is_file() and p.name not in RECORD_FILES and not is_run_info_scratch(p.name)
                                            for p in folder.rglob("*"))
    if not holds_outputs:
        return None
    unreadable = unreadable_record(folder)
    if unreadable is not None:
        return (f"{portable_path(unreadable)}: a run record that cannot be read (torn by a kill?), so which checkpoint and settings made "
                "this folder's outputs cannot be checked. Give this run another --work-dir, or delete that file "
                "if you know the outputs are this run's.")
    records = [r for r in results.read_run_info(folder / "run_info.json") if r.get("mode") != "eval"]
    changed = changed_inputs(records[-1], now or prediction_inputs(item, options), item) if records else []
    if not changed:
        return None
    return (f"{portable_path(folder)} holds outputs of an earlier run made " + ", and ".join(changed)
            + ". Its folder name does not say this, so VLMEvalKit would reuse those predictions as this run's. "
            "Give this run another --work-dir, or delete that folder to start it over.")


def unreadable_record(folder: Path) -> Path | None:
    """The folder's run record set aside as unreadable, or its run_info.json if that cannot be read."""
    record, set_aside = folder / "run_info.json", folder / UNREADABLE_RUN_INFO
    if set_aside.exists():
        return set_aside
    return record if record.exists() and results.read_json(record) is None else None


def changed_inputs(earlier: dict, now: dict, item: PluginModel) -> list[str]:
    """Each prediction input the earlier run recorded and this run changes, as a phrase."""
    # records older than the "max_new_tokens" key hold the option as typed: None was the default
    earlier_tokens = next((value for value in (earlier.get("max_new_tokens"), (earlier.get("options") or {}).get("max_new_tokens"))
                           if value is not None), settings.max_new_tokens_for(item.variant))
    changed = []
    if earlier.get("checkpoint_signature") not in (None, now["checkpoint_signature"]):
        changed.append(f"from checkpoint {earlier.get('checkpoint')} (content signature {earlier['checkpoint_signature']}); "
                       f"this run's checkpoint {portable_path(item.checkpoint)} has signature {now['checkpoint_signature']}")
    if earlier_tokens != now["max_new_tokens"]:
        changed.append(f"with --max-new-tokens {earlier_tokens}; this run asks for {now['max_new_tokens']}")
    if earlier.get("device") not in (None, now["device"]):
        changed.append(f"on {earlier['device']}; this run is on {now['device']} (the plugin's dtype differs between them)")
    if "dymu_thresholds_sha256" in earlier and earlier["dymu_thresholds_sha256"] != now["dymu_thresholds_sha256"]:
        changed.append(f"with DyMU thresholds of content {earlier['dymu_thresholds_sha256']}; "
                       f"this run's {portable_path(item.config.dymu)} holds {now['dymu_thresholds_sha256']}")
    return changed


def is_registered_set(name: str) -> bool:
    return name in registered_sets()


@cache
def registered_sets() -> frozenset[str]:
    """The names VLMEvalKit's build_dataset knows (it downloads their TSVs), video sets included."""
    from vlmeval.dataset import DATASET_CLASSES, supported_video_datasets

    return frozenset({*supported_video_datasets, *(name for cls in DATASET_CLASSES for name in cls.supported_datasets())})


def video_problem(model_names: list[str], data_names: list[str]) -> str | None:
    """VLMEvalKit's own Qwen2.5-VL wrapper is a video model: it reads a video set's clip as a video
    (fps 2 or the set's frame count), where ours would get its frames as separate images, a protocol
    of our own whose scores would not compare with upstream's."""
    qwen = [name for name in model_names if settings.VARIANTS[settings.base_name(name)].qwen]
    videos = [name for name in data_names if is_video_set(name)] if qwen else []
    if not (qwen and videos):
        return None
    return (f"{', '.join(qwen)} on the video set(s) {', '.join(videos)}: the Qwen2.5-VL names run image sets only. "
            "VLMEvalKit's Qwen2.5-VL reads a clip as a video, which this engine does not implement, and frames given "
            "as separate images would score a different protocol")


def is_video_set(name: str) -> bool:
    return name in video_sets()


@cache
def video_sets() -> frozenset[str]:
    """The sets VLMEvalKit builds as video: its video configs, and the names of video-modality dataset classes."""
    from vlmeval.dataset import DATASET_CLASSES, supported_video_datasets

    return frozenset({*supported_video_datasets, *(name for cls in DATASET_CLASSES if getattr(cls, "MODALITY", None) == "VIDEO"
                                                   for name in cls.supported_datasets())})


def unknown_set_problem(data_names: list[str], lmu_root: str | Path) -> str | None:
    """A --data name that is neither VLMEvalKit's, nor bundled, nor a TSV in LMUData: VLMEvalKit
    would skip it with a warning and run the others."""
    import difflib

    known = registered_sets() | set(BUNDLED_SETS)
    unknown = [name for name in data_names if name not in known and not (Path(lmu_root) / f"{name}.tsv").exists()]
    if not unknown:
        return None
    hints = [f"{name!r} (did you mean {' or '.join(close)}?)" if (close := difflib.get_close_matches(name, known, n=3)) else repr(name)
             for name in unknown]
    return (f"unknown dataset name(s) {', '.join(hints)}: --data takes VLMEvalKit's set names "
            f"(vlmeval.dataset), the bundled {' and '.join(BUNDLED_SETS)}, or NAME for a custom set at "
            f"{portable_path(Path(lmu_root))}/NAME.tsv")


def register_caption_sets(data_names: list[str]) -> list[str]:
    """Unknown dataset names whose LMUData TSV looks like COCO_VAL (index, image, answer; no question,
    not both A and B: `layouts.layout_of`, as check_tsv reads it) become ImageCaptionDataset sets. VLMEvalKit would otherwise reject them (its custom-set
    fallback needs a question column). No md5 is registered, so the local file is used as it is."""
    import pandas as pd
    from vlmeval.dataset import ImageCaptionDataset
    from vlmeval.smp import LMUDataRoot

    registered = []
    for name in data_names:
        if is_registered_set(name):
            continue
        path = Path(LMUDataRoot()) / f"{name}.tsv"
        if not path.exists():
            continue
        columns = set(pd.read_csv(path, sep="\t", nrows=0).columns)
        if "answer" in columns and layouts.layout_of(columns) == layouts.CAPTION_LAYOUT and {"image", "image_path"} & columns:  # as check_tsv reads it
            ImageCaptionDataset.DATASET_URL[name] = f"{name}.tsv"
            registered.append(name)
    return registered


def use_gloo_without_cuda() -> None:
    """VLMEvalKit's run_local_mode calls init_process_group(backend='nccl') when WORLD_SIZE > 1; nccl
    needs CUDA. On a machine without CUDA (CPU tests) swap in gloo; on GPUs nothing changes."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        return
    original = dist.init_process_group
    print("run.py: no CUDA here: torch.distributed will use gloo instead of VLMEvalKit's nccl", flush=True)

    def init_process_group(*args, **kwargs):
        kwargs["backend"] = "gloo"
        return original(*args[1:], **kwargs) if args else original(**kwargs)

    dist.init_process_group = init_process_group


def judge_key_configured(vargs) -> bool:
    return bool(vargs.judge_key or vargs.judge_base_url or any(os.environ.get(name) for name in JUDGE_KEY_ENVS))


def outcome_problems(work_dir: str, models: list[str], datasets: list[str], mode: str, started: datetime.datetime) -> list[str]:
    """What went wrong in this run, from VLMEvalKit's status.json and the files it should have written.
    (VLMEvalKit logs a failed model x dataset and carries on; its exit status stays 0.)"""
    problems = []
    for model in models:
        status_file = Path(work_dir) / model / "status.json"
        run_status = json.loads(status_file.read_text()) if status_file.exists() else {}
        for dataset in datasets:
            entry = run_status.get("datasets", {}).get(dataset, {})
            fresh = False
            if entry.get("updated_at"):
                fresh = datetime.datetime.fromisoformat(entry["updated_at"]) >= started
            if fresh and entry.get("error_message") is not None:  # "" from an exception without a message
                problems.append(f"{model} x {dataset}: {entry['error_message'] or 'raised an error without a message (see VLMEvalKit log above)'}")
            elif fresh and entry.get("skip_reason") in FAILED_SKIPS:
                problems.append(f"{model} x {dataset}: skipped ({entry['skip_reason']})")
            elif mode != "eval" and results.prediction_file(Path(work_dir) / model, model, dataset) is None:
                problems.append(f"{model} x {dataset}: no prediction file (see VLMEvalKit's log above)")
    return problems


RUN_INFO_ENVS = (
    *settings.NAME_SETTINGS, "VISUAL_METHOD", settings.MODEL_PATH_ENV, "MMEVAL_ROOT",
    "LMUData", "PRED_FORMAT", "EVAL_FORMAT", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES",
)


def write_run_info(work_dir: str, models: list[str], plugin_models: dict, command: list[str], demo: bool, vargs, options,
                   launch_env: dict) -> None:
    """Append this run to <work_dir>/<model>/run_info.json ({"runs": [...]}): the command as typed,
    the settings read from the environment as launched (`launch_env`: before VLMEvalKit narrows
    CUDA_VISIBLE_DEVICES to one rank's GPUs), the checkpoint, versions and the git commit; paths as
    hybrid_vlm.provenance.portable writes them.
    VLMEvalKit's status.json keeps only its own argv; hybrid_tools.report reads this for provenance."""
    from dataclasses import asdict

    from hybrid_vlm.provenance import git_state, package_versions, portable, shell_join

    commit, dirty = git_state()
    by_name = {item.name: item for item in plugin_models.values()}
    for model in models:
        item = by_name.get(model)
        record = {
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shell_join(portable(command)), "argv": command, "demo": demo,
            "world_size": int(os.environ.get("WORLD_SIZE", 1)), "model": model,
            "requested": item.requested if item else model,
            "setting": (item.config.describe() if item.config is not None else "stock") if item else None,
            "hybrid_config": asdict(item.config) if item and item.config is not None else None,
            "checkpoint": str(item.checkpoint) if item else None,
            **(prediction_inputs(item, options) if item else {}),
            "env": launch_env,
            "options": {"model_path": options.model_path, "batch_size": options.batch_size, "max_new_tokens": options.max_new_tokens},
            "data": list(vargs.data or []), "mode": vargs.mode, "judge": vargs.judge,
            "versions": package_versions(), "git": {"commit": commit, "dirty": dirty},
        }
        record = portable(record)  # no machine-specific absolute paths in what may be committed
        append_run_record(Path(work_dir) / model / "run_info.json", record)


def append_run_record(path: Path, record: dict) -> None:
    """Adds `record` to run_info.json's runs: under a lock, since two run.py processes on one folder
    would each write the runs they read, and the later would drop the other's record."""
    import filelock

    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path.with_name(RUN_INFO_LOCK))):
        try:
            runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
        except (ValueError, AttributeError):  # torn: kept aside, where reuse_conflict finds it (--mode eval is not checked)
            os.replace(path, path.with_name(UNREADABLE_RUN_INFO))
            runs = []
        replace_file(path, json.dumps({"runs": runs + [record]}, indent=2) + "\n")  # a kill leaves the old file or the new one


def print_summary(work_dir: str, models: list[str], datasets: list[str]) -> list:
    """The end-of-run table and where each model x dataset's files are; the results read."""
    found = [results.read_dataset(Path(work_dir) / model, model, dataset) for model in models for dataset in datasets]
    print("\n" + results.summary_table(found) + "\n\nResults:", flush=True)
    for result in found:
        print(f"  {result.model} x {result.dataset}: {(Path(work_dir) / result.model).resolve()}", flush=True)
        for path in [result.prediction_file, *result.metric_files]:
            if path is not None:
                print(f"      {path.name}", flush=True)
        if result.stats_file is not None:
            print(f"      {result.stats_file.name}  (per-row tokens and prefill time)", flush=True)
    return found


def failed_row_problems(found: list) -> list[str]:
    """One line per failed row (its prediction is VLMEvalKit's failure marker; the rest was scored)."""
    return [
        f"{result.model} x {result.dataset}: row {index} failed: {reason}"
        for result in found
        for index, reason in result.failed_rows
    ]


def resolve_plugin_models(names, plugin_models: dict, model_path: str | None) -> str | None:
    """Add a PluginModel for every plugin name not resolved yet; the first problem as text, else None."""
    try:
        for requested in names or []:
            if is_plugin_name(requested) and requested not in plugin_models:
                plugin_models[requested] = PluginModel(requested, model_path)
    except settings.PluginError as error:
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = ["python", "run.py", *argv]  # as typed (python -m vlmeval_plugin is the same program)
    launch_env = {key: os.environ[key] for key in RUN_INFO_ENVS if key in os.environ}
    demo = not argv
    argv = announce_demo() if demo else argv
    if "-h" in argv or "--help" in argv:
        print_plugin_help()
    options, rest = plugin_parser().parse_known_args(argv)
    plugin_models: dict[str, PluginModel] = {}
    problem = problem_before_vlmeval(options, rest, plugin_models)
    if problem:
        return fail(problem)
    vargs = vlmeval_args(rest)
    rank = int(os.environ.get("RANK", 0))
    work_dir = os.environ.get("MMEVAL_ROOT", vargs.work_dir)  # as vlmeval.run.run_local_mode
    data_names = list(vargs.data or [])
    problem = prepare_run(vargs, plugin_models, options, work_dir, data_names)
    if problem:
        return fail(problem)
    if rank == 0 and vargs.model is not None and not vargs.api_mode:
        write_run_info(work_dir, vargs.model, plugin_models, command, demo, vargs, options, launch_env)
        for model in vargs.model:  # before any rank's VLMEvalKit reads them (its first barrier is later)
            robust.set_aside_unreadable_predictions(os.path.join(work_dir, model), model, data_names)

    import vlmeval.run as vlmeval_run  # already imported by vlmeval_args, in its order

    started = datetime.datetime.now().astimezone()
    try:
        vlmeval_run.run_task(vargs)
    except KeyboardInterrupt:
        print("\nrun.py: interrupted. Every row written so far is kept: rerun the same command to resume without "
              "redoing them", file=sys.stderr, flush=True)
        return 130
    if rank != 0 or vargs.model is None or vargs.api_mode:
        return 0
    return report_outcome(work_dir, vargs.model, data_names, vargs.mode, started)


def problem_before_vlmeval(options, rest: list[str], plugin_models: dict[str, PluginModel]) -> str | None:
    """Our own options, names, settings and checkpoints, checked before vlmeval is imported (so a
    typo fails in a second); resolves `plugin_models` on the way. The first problem, else None."""
    if options.batch_size < 1:
        return f"--batch-size must be >= 1, got {options.batch_size}"
    if options.max_new_tokens is not None and options.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {options.max_new_tokens} (leave it out for each model's default)"
    peeked, _ = peek_parser().parse_known_args(rest)
    if peeked.model and not peeked.data and peeked.config is None:  # VLMEvalKit would fail on an assert
        return "--data names the datasets to evaluate --model on, and is missing (the demo's are --data TinyMMBench TinyCOCO)"
    return resolve_plugin_models(peeked.model, plugin_models, options.model_path)


def vlmeval_args(rest: list[str]):
    """VLMEvalKit's parsed arguments, after installing our fixes into it.

    Importing vlmeval.run narrows CUDA_VISIBLE_DEVICES per torchrun rank: it must come before
    anything queries CUDA in this process (importing hybrid_vlm/transformers and resolving the
    checkpoints do not: checked by counting torch's device-count calls)."""
    # VLMEvalKit copies sys.argv into status.json: no machine's absolute path in it.
    sys.argv = [portable_path(sys.argv[0]) if sys.argv else "run.py"] + rest
    robust.install()  # quiet import, bad rows fail alone (must precede building any dataset)
    caption_scores.install()  # METEOR and PTB-tokenized scores beside VLMEvalKit's caption scores
    import vlmeval.run as vlmeval_run

    vargs = vlmeval_run.parse_args()
    if vargs.mode == "eval" and vargs.model and all(is_plugin_name(name) for name in vargs.model):
        # nothing is generated: a failed row is scored as the miss it is, as --mode all scores it, and
        # run.py names it (VLMEvalKit's eval skipped the set as an incomplete inference). Not for other
        # VLMEvalKit names in the run: their failed rows are named nowhere, so VLMEvalKit's rule stands.
        vargs.keep_failed = True
    return vargs


def prepare_run(vargs, plugin_models: dict[str, PluginModel], options, work_dir: str, data_names: list[str]) -> str | None:
    """Registers the models, writes or checks the datasets, picks a judge and the process group
    backend; the first problem, else None."""
    problem = (register_run_models(vargs, plugin_models, options, work_dir) or video_problem([item.requested for item in plugin_models.values()], data_names)
               or prepare_data(data_names, scored=vargs.mode != "infer"))
    if problem:
        return problem
    if vargs.judge is None and not judge_key_configured(vargs):
        vargs.judge = "exact_matching"
        print("run.py: no judge API key configured (OPENAI_API_KEY, --judge-key, ...): using --judge exact_matching", flush=True)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        use_gloo_without_cuda()
    return None


def announce_demo() -> list[str]:
    """The bundled demo's arguments, after saying what it runs and what the real run looks like."""
    print(
        "run.py: no arguments, running the bundled demo: the trained testbed on its held-out TinyMMBench + TinyCOCO, "
        "vanilla, FastV and hybrid (" + ", ".join(DEMO_MODELS) + "), on CPU, batch size 8.\n"
        "For the real thing: python run.py --data MMBench_DEV_EN COCO_VAL --model llava_v1.5_7b_hybrid",
        flush=True,
    )
    return list(DEMO_ARGS)


def print_plugin_help() -> None:
    """Our options and model names, before VLMEvalKit prints its own."""
    plugin_parser().print_help()
    print("\nplugin model names:\n" + "".join(f"  {v.name:24s} {v.description}\n" for v in settings.VARIANTS.values()))
    print("VLMEvalKit's own options follow.\n", flush=True)


def register_run_models(vargs, plugin_models: dict[str, PluginModel], options, work_dir: str) -> str | None:
    """Registers the run's plugin names with VLMEvalKit and rewrites `vargs.model` to their
    setting-qualified names; a problem (an unknown name, a bad setting or checkpoint) instead."""
    from vlmeval.config import supported_VLM

    if vargs.model is None:
        return None
    problem = resolve_plugin_models(vargs.model, plugin_models, options.model_path)
    if problem:
        return problem
    unknown = [name for name in vargs.model if not is_plugin_name(name) and name not in supported_VLM]
    if unknown:
        return (f"unknown model name(s) {', '.join(map(repr, unknown))}. Plugin names: {', '.join(settings.VARIANTS)}; "
                "any other name must be one of vlmeval.config.supported_VLM.")
    vargs.model = [plugin_models[name].name if name in plugin_models else name for name in vargs.model]
    if vargs.mode != "eval":  # eval only scores existing predictions: nothing generated, nothing to mix
        for item in plugin_models.values():
            problem = reuse_conflict(Path(work_dir) / item.name, item, options)
            if problem:
                return problem
    register_models(list(plugin_models.values()), work_dir, options)
    for item in plugin_models.values():
        print(f"run.py: {item.requested} -> {item.name}  (checkpoint {item.checkpoint}, results {Path(work_dir) / item.name})", flush=True)
        note = settings.ignored_note(item.requested, item.name)
        if note:
            print(f"run.py: {note}", flush=True)
    return None


def prepare_data(data_names: list[str], scored: bool = True) -> str | None:
    """Writes the bundled sets asked for, checks the local files of every other unregistered set
    (their answers only where the run scores them), and registers the caption sets; a problem
    naming what is missing instead."""
    from vlmeval.smp import LMUDataRoot

    bundled = [name for name in data_names if name in BUNDLED_SETS]
    if bundled:
        ensure_tiny_sets(LMUDataRoot(), bundled)
    problem = unknown_set_problem(data_names, LMUDataRoot())
    if problem:
        return problem
    problem = layouts.check_local_sets([name for name in data_names if not is_registered_set(name)], LMUDataRoot(), scored)
    if problem:
        return problem
    register_caption_sets(data_names)
    return None


def report_outcome(work_dir: str, models: list[str], data_names: list[str], mode: str, started) -> int:
    """Prints the summary; 1, naming them, if any model x dataset or row failed, else 0."""
    found = print_summary(work_dir, models, data_names)
    problems = outcome_problems(work_dir, models, data_names, mode, started) + failed_row_problems(found)
    if problems:
        print("\nrun.py: these model x dataset combinations or rows failed (a failed row's prediction is VLMEvalKit's "
              "failure marker, counted in infer_fail_rate; fix the input and rerun to regenerate only failed rows):\n" + "".join(f"  {p}\n" for p in problems), file=sys.stderr, flush=True)
        return 1
    return 0
