"""The testbed's card (checkpoint/README.md), written from committed files only:

- checkpoint/train_summary.json and train_log.jsonl (what `python -m hybrid_vlm.testbed train` wrote),
- checkpoint/dymu-thresholds/testbed-*.json (`python -m hybrid_vlm.testbed calibrate`),
- reports/testbed/report.json and shuffled_captions.json (`bash reports/testbed/regenerate.sh`),
- reports/testbed/blind_baselines.json (`python -m hybrid_tools.blind_baselines`),
- reports/testbed/text_overlap.json (`python -m hybrid_tools.text_overlap`).

    python -m hybrid_vlm.testbed card        # rewrites hybrid_vlm/testbed/checkpoint/README.md
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from . import CHECKPOINT_DIR, THRESHOLDS_DIR, scenes
from .train import DIRECT_QUESTIONS, EXTRA_QUESTIONS, WINDOW

REPORT_DIR = CHECKPOINT_DIR.parents[2] / "reports" / "testbed"


def _vanilla(report: dict, dataset: str) -> dict:
    return next(entry for entry in report["datasets"][dataset] if entry["vanilla"])


def _mean(window: list[dict], key: str) -> str:
    values = [r[key] for r in window if key in r and r[key] == r[key]]  # NaN: no such target in the batch
    return f"{sum(values) / len(values):.3f}" if values else "-"


LOG_COLUMNS = (
    ("answer_loss", "answer loss"), ("letter_accuracy", "letter accuracy"), ("patch_colour", "patch colour"),
    ("patch_shape", "patch shape"), ("object_colour", "object colour"), ("object_shape", "object shape"),
    ("object_size", "object size"), ("count", "count"),
)


def _log_table(log: list[dict], rows: int = 8) -> list[str]:
    optional = (("named_attention", "named-object attention"), ("option_attention", "right-option attention"))
    columns = LOG_COLUMNS + tuple(column for column in optional if any(column[0] in r for r in log))
    lines = ["| phase | steps | " + " | ".join(title for _, title in columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for phase in ("window", "vision", "language"):
        records = [r for r in log if r.get("phase") == phase]
        step = max(1, -(-len(records) // rows))
        for start in range(0, len(records), step):
            window = records[start : start + step]
            cells = " | ".join(_mean(window, key) for key, _ in columns)
            lines.append(f"| {phase} | {window[0]['step']}–{window[-1]['step']} | {cells} |")
    return lines


OPTIONAL_FLAGS = (  # setting -> train flag, printed when set (a rate is positive, a weight non-zero)
    ("language_learning_rate", "--language-lr"), ("attention_weight", "--attention-weight"), ("option_attention_weight", "--option-attention-weight"),
    ("answer_probe_weight", "--answer-probe-weight"),
)


def _optional_flags(settings: dict) -> str:
    values = "".join(f" {flag} {settings[name]:g}" for name, flag in OPTIONAL_FLAGS if settings.get(name))
    return values + (" --option-tokens" if settings.get("option_tokens") else "")


def _attention_loss(settings: dict) -> str:
    text = ""
    if settings.get("attention_weight"):
        text += (
            f", plus {settings['attention_weight']:g} times the named-object attention loss: head {settings['attention_head']} of "
            f"LLM layer {settings['attention_layer']}, from each question's last prompt token, is taught to put its attention on the "
            "image patches of the object the question names (-log of that mass; not for counting or captions)"
        )
    if settings.get("option_attention_weight"):
        text += (
            f", plus {settings['option_attention_weight']:g} times the right-option attention loss: head {settings['option_attention_head']} "
            f"of LLM layer {settings['option_attention_layer']}, from each MCQ's last prompt token, on the right option's line"
        )
    if settings.get("answer_probe_weight"):
        text += (
            f", plus {settings['answer_probe_weight']:g} times a training-only linear probe (not saved) reading each MCQ's right "
            f"option in words from the input of LLM layer {settings['answer_probe_layer']} at the MCQ's last prompt token"
        )
    return text


def _peak_rates(settings: dict) -> str:
    rate = settings.get("language_learning_rate")
    return f"{settings['learning_rate']:g}" if rate is None else f"{settings['learning_rate']:g} ({rate:g} in the language phase)"


def _window_phase(settings: dict) -> str:
    if not settings.get("window_steps"):
        return ""
    return (
        f"Window phase (first): {settings['window_steps']} steps on {WINDOW} x {WINDOW}-patch windows cut around each "
        f"object of {settings['window_batch_scenes']} scenes a step ({WINDOW * WINDOW + 1} tokens instead of {scenes.GRID * scenes.GRID + 1}, each patch at its own "
        "place in the full grid), the patch and object heads of the probe below. "
    )


TARGET_CIRCULAR = 85.0  # issue 8's target for vanilla circular accuracy


def _short_kinds(metrics: dict) -> str:
    categories = {category for category, _ in scenes.CATEGORIES.values()}  # one per question kind, not the l2-categories
    kinds = [f"{name} {value:.1f}%" for name, value in metrics.items() if name in categories and value < TARGET_CIRCULAR]
    if metrics["Overall"] >= TARGET_CIRCULAR and not kinds:
        return f"Every question kind is at or above {TARGET_CIRCULAR:.0f}% circular."
    return f"Below {TARGET_CIRCULAR:.0f}% circular (the target it was trained for): " + (", ".join(kinds) if kinds else f"Overall {metrics['Overall']:.1f}%") + "."


def card_text(checkpoint: Path = CHECKPOINT_DIR, report_dir: Path = REPORT_DIR) -> str:
    summary = json.loads((checkpoint / "train_summary.json").read_text())
    log = [json.loads(line) for line in (checkpoint / "train_log.jsonl").read_text().splitlines()]
    report = json.loads((report_dir / "report.json").read_text())
    shuffled = json.loads((report_dir / "shuffled_captions.json").read_text())
    blind = json.loads((report_dir / "blind_baselines.json").read_text())
    overlap = json.loads((report_dir / "text_overlap.json").read_text())
    mcq, coco = _vanilla(report, "TinyMMBench"), _vanilla(report, "TinyCOCO")
    vocab_size = json.loads((checkpoint / "config.json").read_text())["text_config"]["vocab_size"]
    lines = _architecture(summary, vocab_size) + _how_it_was_made(summary, log) + _scores(mcq, coco, shuffled, blind, overlap) + _limits(log, mcq)
    lines += _thresholds(sorted((checkpoint / THRESHOLDS_DIR.name).glob("testbed-*.json")))
    lines += ["", "This card is written by `python -m hybrid_vlm.testbed card` from the files above.", ""]
    return "\n".join(lines)


def _architecture(summary: dict, vocab_size: int) -> list[str]:
    return [
        "# The hybrid-vlm testbed",
        "",
        "A stock `LlavaForConditionalGeneration` (transformers 5.23 to 5.25) with LLaVA-1.5's geometry where token",
        "reduction acts, trained from scratch on generated scenes (`hybrid_vlm/testbed/scenes.py`). Not a",
        "general model: it knows six colours, four shapes, three sizes, four backgrounds, and the plugin's prompts.",
        "",
        "## Architecture",
        "",
        "- ViT: CLIP layout, 336 px, 14 px patches (576 + CLS), width 96, 6 layers, 3 heads; LLaVA reads layer -2.",
        "- Projector: 2-layer MLP, GELU.",
        "- LLM: Llama, width 128, 8 layers, 4 heads, MLP 384, RoPE; byte-level BPE tokenizer of "
        f"{vocab_size} tokens trained on the testbed's texts.",
        f"- {summary['parameters']:,} parameters, float32 safetensors.",
        "",
    ]


def _how_it_was_made(summary: dict, log: list[dict]) -> list[str]:
    settings = summary["settings"]
    return [
        "## How it was made",
        "",
        "```bash",
        f"python -m hybrid_vlm.testbed train --out DIR --window-steps {settings.get('window_steps', 0)} "
        f"--vision-steps {settings['vision_steps']} --steps {settings['steps']} "
        f"--batch-images {settings['batch_images']} --seed {settings['seed']}" + _optional_flags(settings)
        + ("" if settings["bf16"] else " --fp32"),
        "python -m hybrid_vlm.testbed calibrate --model DIR --out DIR/dymu-thresholds",
        "```",
        "",
        f"From scratch, {summary['train_seconds'] / 60:.1f} min on {summary['threads']} CPU threads ({summary['machine']}, "
        f"torch {summary['torch']}, {'bf16 autocast' if settings['bf16'] else 'fp32'}); no GPU. "
        + _window_phase(settings) + "Vision phase: "
        f"{settings['vision_steps']} AdamW steps of {settings['vision_batch_images']} scenes on a training-only probe (not "
        "saved) over the projected image tokens: each patch's object colour and shape, each object's mean token its colour, "
        "shape and size, the mean token the object count, each token its grid place. Language phase: "
        f"{settings['steps']} steps of {settings['batch_images']} scenes"
        + (", the ViT frozen" if settings["freeze_vision"] else ", everything trained") + ", each scene carrying one "
        f"multiple-choice question of each kind it allows (a relation needs two well-separated objects) plus {EXTRA_QUESTIONS} more (the plugin's MCQ prompt, options shuffled, "
        f"answered with the letter), {DIRECT_QUESTIONS} short-answer questions and one COCO-prompt caption, packed after one "
        "shared image prefix, plus the probe loss" + _attention_loss(settings) + ". "
        f"Peak learning rate {_peak_rates(settings)}, linear warm-up, cosine to 10% in each phase; seed {settings['seed']}. "
        "A rerun gives the same weights only on the same CPU, thread count and torch build: the CPU's kernels"
        + (" (bf16 autocast among them)" if settings["bf16"] else "") + " round differently elsewhere. "
        "Means over the training batches (`train_log.jsonl`; probe accuracies on object patches or objects, letter "
        "accuracy on the option letters" + ("; the attention columns: the mass each taught head puts on its target" if settings.get("attention_weight") or settings.get("option_attention_weight") else "") + "):",
        "",
        *_log_table(log),
        "",
    ]


def overlap_sentence(overlap: dict) -> str:
    """How much of the held-out sets' text training fed word for word (`hybrid_tools.text_overlap`)."""
    mcq, coco = overlap["TinyMMBench"], overlap["TinyCOCO"]
    return (
        f"The question and caption texts come from the templates training uses: over the {overlap['training_images']:,} "
        f"images its language phase trained on, {mcq['prompt_seen']} of the {mcq['questions']} TinyMMBench prompts (question and options in "
        f"order) occur word for word in training, {mcq['prompt_seen_only_with_its_right_letter']} of them always with the "
        f"right letter, and {coco['references_seen']} of TinyCOCO's {coco['references']} reference captions were training "
        f"caption targets ({coco['images_with_a_reference_seen']} of its {coco['images']} images have one; "
        "`reports/testbed/text_overlap.json`)"
    )


def _scores(mcq: dict, coco: dict, shuffled: dict, blind: dict, overlap: dict) -> list[str]:
    prior, constant = blind["TinyMMBench"], blind["TinyCOCO"]
    return [
        "## What it scores (held-out images, never drawn in training)",
        "",
        overlap_sentence(overlap) + ". These sets also chose among the training runs "
        "([`reports/testbed-attempts/`](../../../reports/testbed-attempts/README.md)), so they are not an untouched test set.",
        "",
        f"- TinyMMBench, {mcq['rows']} rows (every question with its circular copies), circular accuracy (Overall): "
        f"**{mcq['metrics']['Overall']:.1f}%**; by kind: "
        + ", ".join(f"{key} {value:.1f}%" for key, value in mcq["metrics"].items() if key != "Overall") + ".",
        f"- TinyCOCO, {coco['rows']} scenes: CIDEr **{coco['metrics']['CIDEr']:.1f}**; the same captions scored against the "
        f"references of the wrong images (shuffled): CIDEr {shuffled['cider_shuffled']:.1f} "
        f"(recomputed matched: {shuffled['cider_matched']:.1f}).",
        f"- Without the image (`reports/testbed/blind_baselines.json`): answering each question with the option most often "
        f"right for its text on {prior['training_scenes']:,} training scenes scores **{prior['circular_accuracy']:.1f}%** "
        "circular on TinyMMBench (by kind: " + ", ".join(f"{kind} {value:.1f}%" for kind, value in prior["by_kind"].items())
        + f"; {_per_kind(prior['questions'])}), {_against(mcq['metrics']['Overall'], prior['circular_accuracy'])} "
        + "the model's Overall" + (f" (on {prior['fresh_questions']['questions']:,} fresh questions the rule scores "
                                   f"{prior['fresh_questions']['accuracy']:.1f}%)" if "fresh_questions" in prior else "") + (f", and a random letter on every circular copy {prior['random_letter_circular_accuracy']:.1f}% (expected)"
                                   if "random_letter_circular_accuracy" in prior else "") + "; one training caption "
        f"given to every image scores CIDEr **{constant['cider']:.1f}** on TinyCOCO, {_against(coco['metrics']['CIDEr'], constant['cider'])} "
        "the model's. " + _kinds_above(mcq["metrics"], prior["by_kind"]),
        "- Every method at matched budgets: [`reports/testbed/report.md`](../../../reports/testbed/report.md).",
        "",
    ]


def _per_kind(questions: int) -> str:
    """How many of TinyMMBench's `questions` each kind has (the set takes the kinds in turn)."""
    counts = Counter(scenes.QUESTION_KINDS[index % len(scenes.QUESTION_KINDS)] for index in range(questions))
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} questions per kind"
    return "questions per kind: " + ", ".join(f"{kind} {count}" for kind, count in counts.items())


def _against(model: float, floor: float) -> str:
    return "below" if floor < model else "above" if floor > model else "equal to"


def _kinds_above(metrics: dict, floor_by_kind: dict) -> str:
    """Which question kinds the model answers better than the text prior (each kind's own category)."""
    above = [kind for kind, floor in floor_by_kind.items() if metrics.get(scenes.CATEGORIES[kind][0], 0.0) > floor]
    return ("Question kinds above the text prior: " + ", ".join(above) + ".") if above else "No question kind is above the text prior."


def _limits(log: list[dict], mcq: dict) -> list[str]:
    return [
        "## Limits",
        "",
        f"Over the last 100 training steps the probe reads an object's colour at {_mean(log[-100:], 'object_colour')}, "
        f"its shape at {_mean(log[-100:], 'object_shape')} (four shapes: chance 0.25), its size at "
        f"{_mean(log[-100:], 'object_size')} and the object count at {_mean(log[-100:], 'count')}. "
        + _short_kinds(mcq["metrics"]) + " Every training run, the shipped one included, is recorded in "
        "`reports/testbed-attempts/` with what it reached and, for the runs that miss, what was measured about why.",
        "",
    ]


def _thresholds(paths: list[Path]) -> list[str]:
    payloads = {path: json.loads(path.read_text()) for path in paths}
    calibrations = {(p["calibration"]["images"], p["calibration"]["batch_size"]) for p in payloads.values()}
    made = "; ".join(f"{images} training-distribution scenes (the calibration stream), DyMU's batch-level method, batches of {batch}"
                     for images, batch in sorted(calibrations))
    lines = [
        "## DyMU thresholds (`dymu-thresholds/`)",
        "",
        f"Calibrated on {made}:",
        "",
        "| file | target | visual tokens (mean ± std, calibration scenes) |",
        "|---|---|---:|",
    ]
    for path, payload in payloads.items():
        achieved = payload["achieved"]
        lines.append(f"| `{path.name}` | {payload['target']['preset']} | {achieved['tokens_mean']:.1f} ± {achieved['tokens_std']:.1f} |")
    return lines + [
        "",
        "The counts are the engine's own (`python -m hybrid_vlm.testbed calibrate --remeasure` measures them again with each "
        "file's thresholds, which it leaves as they are).",
    ]


def write_card() -> Path:
    path = CHECKPOINT_DIR / "README.md"
    path.write_text(card_text())
    return path
