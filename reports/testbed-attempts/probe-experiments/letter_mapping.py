"""How fast does the testbed's LLM, from scratch, learn to map an answer it is given to its option
letter? Text only: the plugin's conversation without the image, whose user text is "The answer is
<answer>." then a training scene's MCQ (the plugin's MCQ text, options shuffled); the loss is on the
letter only. Four arms: the embeddings tied or not (TIE), and each option line one added token
("B. red") or three ("B", ".", " red") (MERGE). The LLM is the testbed's Llama (128 x 8 layers),
seeded; AdamW, peak rate 2e-3, 20 warm-up steps, cosine; BATCH sequences a step, each of BLOCKS
such conversations one after another (a loss on every letter: BLOCKS times the supervision per token).

    PYTHONPATH=. python reports/testbed-attempts/probe-experiments/letter_mapping.py OUT TIE MERGE [STEPS] [BATCH] [BLOCKS]
"""
import json
import sys
import time
from pathlib import Path

import torch
from text_letter_step import letter_step
from transformers import LlamaForCausalLM

from hybrid_vlm.testbed import build_tokenizer, scenes, testbed_config
from hybrid_vlm.testbed.prompts import LETTERS, SYSTEM_PROMPT, mcq_text
from hybrid_vlm.testbed.train import learning_rate

out, tie, merge = Path(sys.argv[1]), bool(int(sys.argv[2])), bool(int(sys.argv[3]))
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 400
batch_size = int(sys.argv[5]) if len(sys.argv) > 5 else 32
blocks = int(sys.argv[6]) if len(sys.argv) > 6 else 1
torch.set_num_threads(2)
tokenizer = build_tokenizer(option_tokens=merge)
config = testbed_config(tokenizer).text_config
config.tie_word_embeddings = tie
torch.manual_seed(0)
model = LlamaForCausalLM(config)
model.set_attn_implementation("sdpa")
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)


def block(index):
    scene, rng = scenes.scene_for(scenes.TRAIN_STREAM, index)
    while True:
        question = scenes.ask(scene, str(rng.choice(scenes.QUESTION_KINDS)), rng)
        if question is not None:
            break
    stated = f"The answer is {question.options[question.answer]}. "
    text = SYSTEM_PROMPT + "USER: " + stated + mcq_text(question.question, question.options) + " ASSISTANT: "
    return tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer(LETTERS[question.answer], add_special_tokens=False)["input_ids"][0]


def example(index):
    """(ids, [index of the logit that predicts each letter], [letter ids]): BLOCKS conversations, each answered."""
    ids, where, letters = [tokenizer.bos_token_id], [], []
    for offset in range(blocks):
        prompt, letter = block(index * blocks + offset)
        ids += prompt
        where.append(len(ids) - 1)
        letters.append(letter)
        ids += [letter, tokenizer.eos_token_id]
    return ids, where, letters


out.mkdir(parents=True, exist_ok=True)
model.train()
started = time.perf_counter()
with (out / "train_log.jsonl").open("w") as log:
    for step in range(steps):
        items = [example(step * batch_size + offset) for offset in range(batch_size)]
        rows = torch.tensor([row for row, (_, where, _) in enumerate(items) for _ in where])
        columns = torch.tensor([column for _, where, _ in items for column in where])
        targets = torch.tensor([letter for _, _, letters in items for letter in letters])
        rate = learning_rate(step, 2e-3, 20, steps)
        loss, accuracy = letter_step(model, optimizer, tokenizer.pad_token_id, [ids for ids, _, _ in items], rows, columns, targets, rate)
        log.write(json.dumps(dict(phase="letter-mapping", tie=tie, merge=merge, blocks=blocks, step=step, letter_loss=round(loss.item(), 5),
                                  letter_accuracy=round(accuracy, 4), lr=rate, seconds=round(time.perf_counter() - started, 1))) + "\n")
        log.flush()
