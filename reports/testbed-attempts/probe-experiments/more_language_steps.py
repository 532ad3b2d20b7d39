"""Does the LLM learn to find the named object with more language steps? Continues the shipped
checkpoint (run5) for N language steps (peak LR 1e-3, warm-up 20, cosine; the trainer's language
phase, whose scenes restart at training scene 0, so these are repeats), saves it to OUT and prints
the training letter accuracy; then run direct_answers.py on OUT.

    PYTHONPATH=. python reports/testbed-attempts/probe-experiments/more_language_steps.py N OUT
"""
import json, statistics, sys, torch
from pathlib import Path
from transformers import AutoProcessor, LlavaForConditionalGeneration
from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from hybrid_vlm.testbed import CHECKPOINT_DIR
from hybrid_vlm.testbed.train import TrainSettings, train
torch.set_num_threads(2)
steps, out = int(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT_DIR, **NO_HUB_KERNELS)
processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
settings = TrainSettings(window_steps=0, vision_steps=0, steps=steps, learning_rate=1e-3, warmup_steps=20)
log = train(model, processor, settings, out / "train_log.jsonl", progress=False)
model.save_pretrained(out); processor.save_pretrained(out)
for start in range(0, steps, 100):
    window = log[start:start + 100]
    print(start, {k: round(statistics.mean(r[k] for r in window if r[k] == r[k]), 3) for k in ("answer_loss", "letter_accuracy", "object_shape")}, window[-1]["seconds"], flush=True)
