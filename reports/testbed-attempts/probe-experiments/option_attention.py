"""Continue a checkpoint for STEPS language steps, with or without the right-option attention loss
(head 0 of LLM layer 6 taught to attend from each MCQ's last prompt token to the right option's line),
to separate what that loss adds from what the restart adds. The named-object attention loss
(weight 0.3, as in run8) stays on in both arms. Repeats training scenes 0..8*STEPS-1; peak rate 1e-3,
20 warm-up steps, cosine; a fresh probe; seed 0.

    PYTHONPATH=. python reports/testbed-attempts/probe-experiments/option_attention.py CHECKPOINT OUT OPTION_WEIGHT [STEPS]
"""
import json
import sys
from pathlib import Path

import torch

from hybrid_vlm.testbed import load_for_training
from hybrid_vlm.testbed.train import TrainSettings, continue_language_phase

source, out, weight = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 300
torch.set_num_threads(2)
model, processor = load_for_training(source)
settings = TrainSettings(steps=steps, warmup_steps=20, language_learning_rate=1e-3, attention_weight=0.3, option_attention_weight=weight)
seconds = continue_language_phase(model, processor, settings, out)
(out / "continue_summary.json").write_text(json.dumps(dict(source=source, option_attention_weight=weight, steps=steps, seconds=round(seconds, 1))) + "\n")
