"""Does one token per option line ("B. red") let the LLM map an answer it knows to its letter?
Continues a checkpoint for STEPS language steps (as option_attention.py's control: the named-object
loss at 0.3, the rate restarted at 1e-3, 20 warm-up steps, cosine, a fresh probe, seed 0; OPTION_WEIGHT, default 0,
the weight of the right-option attention loss; ANSWER_WEIGHT, default 0, that of the
mid-depth answer probe), with MERGE=1
after adding `testbed.option_lines()` to its tokenizer: each new token's input and output embeddings
start as the mean of the rows of the tokens it replaces ("B", ".", " red"). MERGE=0 is the control.

    PYTHONPATH=. python reports/testbed-attempts/probe-experiments/option_tokens.py CHECKPOINT OUT MERGE [STEPS] [OPTION_WEIGHT] [ANSWER_WEIGHT]
"""
import json
import sys
from pathlib import Path

import torch

from hybrid_vlm.testbed import add_option_tokens, load_for_training, option_lines
from hybrid_vlm.testbed.train import TrainSettings, continue_language_phase

source, out, merge = sys.argv[1], Path(sys.argv[2]), bool(int(sys.argv[3]))
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 150
option_weight = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
answer_weight = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
torch.set_num_threads(2)
model, processor = load_for_training(source)
tokenizer = processor.tokenizer
if merge:
    parts = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in option_lines()]
    old = len(tokenizer)
    add_option_tokens(tokenizer)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            for row, ids in enumerate(parts):
                table[old + row] = table[ids].mean(0)
settings = TrainSettings(steps=steps, warmup_steps=20, language_learning_rate=1e-3, attention_weight=0.3, option_attention_weight=option_weight, answer_probe_weight=answer_weight)
seconds = continue_language_phase(model, processor, settings, out)
(out / "continue_summary.json").write_text(json.dumps(dict(source=source, option_tokens=merge, option_attention_weight=option_weight, answer_probe_weight=answer_weight, steps=steps, seconds=round(seconds, 1))) + "\n")
