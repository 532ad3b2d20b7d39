"""Does a cheap text-only letter phase teach the MCQ answer -> option letter mapping that the image
runs lack? Continues a checkpoint for STEPS AdamW steps of BATCH text-only prompts: the plugin's
conversation without the image, whose user text is one reference caption of a training scene (the
answer stated in words), then that scene's MCQ (the plugin's MCQ text, options shuffled); the loss is
on the letter only. About 80 tokens a prompt instead of ~650 with the image, so each example costs a
small fraction of an image step. Training scenes 0..; peak rate 1e-3, 20 warm-up steps, cosine; seed 0.

    PYTHONPATH=. python reports/testbed-attempts/probe-experiments/text_letters.py CHECKPOINT OUT [STEPS] [BATCH]
"""
import json
import sys
import time
from pathlib import Path

import torch
from text_letter_step import letter_step

from hybrid_vlm.testbed import load_for_training, scenes
from hybrid_vlm.testbed.prompts import LETTERS, SYSTEM_PROMPT, mcq_text
from hybrid_vlm.testbed.train import learning_rate

source, out = sys.argv[1], Path(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300
batch_size = int(sys.argv[4]) if len(sys.argv) > 4 else 32
torch.set_num_threads(2)
model, processor = load_for_training(source)
tokenizer = processor.tokenizer
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)


def example(index):
    scene, rng = scenes.scene_for(scenes.TRAIN_STREAM, index)
    references = scenes.captions(scene)
    while True:
        question = scenes.ask(scene, str(rng.choice(scenes.QUESTION_KINDS)), rng)
        if question is not None:
            break
    text = SYSTEM_PROMPT + "USER: " + references[int(rng.integers(len(references)))] + "\n" + mcq_text(question.question, question.options) + " ASSISTANT: "
    return tokenizer(text)["input_ids"], tokenizer(LETTERS[question.answer], add_special_tokens=False)["input_ids"][0], question.kind


out.mkdir(parents=True, exist_ok=True)
model.train()
started = time.perf_counter()
with (out / "train_log.jsonl").open("w") as log:
    for step in range(steps):
        items = [example(step * batch_size + offset) for offset in range(batch_size)]
        last = torch.tensor([len(ids) - 1 for ids, _, _ in items])
        targets = torch.tensor([letter for _, letter, _ in items])
        rate = learning_rate(step, 1e-3, 20, steps)
        loss, accuracy = letter_step(model, optimizer, tokenizer.pad_token_id, [ids for ids, _, _ in items], torch.arange(batch_size), last, targets, rate)
        log.write(json.dumps(dict(phase="text-letters", step=step, letter_loss=round(loss.item(), 5), letter_accuracy=round(accuracy, 4), lr=rate,
                                  seconds=round(time.perf_counter() - started, 1))) + "\n")
        log.flush()
model.eval()
model.save_pretrained(out)
processor.save_pretrained(out)
(out / "continue_summary.json").write_text(json.dumps(dict(source=source, steps=steps, batch=batch_size, seconds=round(time.perf_counter() - started, 1))) + "\n")
