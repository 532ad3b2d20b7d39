"""Which visual tokens FastV's score keeps on the shipped testbed: the last prompt token's attention
(head mean) over the 576 visual tokens at the layer that scores FastV at layer L (L - 1), its share
on object patches, and the share of object patches inside its top K. Random selection keeps K/576
of them in expectation. Two prompts: the caption prompt on the first 20 TinyCOCO scenes, and the
plugin's MCQ prompt with a counting question on 20 held-out MCQ-stream scenes (indices 5000-5019,
beyond TinyMMBench's, as in reports/testbed-attempts/probe-experiments/direct_answers.py).

    python reports/testbed/fastv_coverage.py > reports/testbed/fastv_coverage.txt
"""

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from hybrid_vlm.testbed import CHECKPOINT_DIR, scenes
from hybrid_vlm.testbed.prompts import CAPTION_PROMPT, conversation, mcq_text
from hybrid_vlm.testbed.train import probe_targets

SCENES = 20
MCQ_FIRST_SCENE = 5000
FASTV_LAYERS = (1, 2, 3)
BUDGETS = (288, 64)


def caption_cases():
    for index in range(SCENES):
        scene, _ = scenes.scene_for(scenes.CAPTION_STREAM, index)
        yield scene, conversation(CAPTION_PROMPT)


def counting_cases():
    for index in range(MCQ_FIRST_SCENE, MCQ_FIRST_SCENE + SCENES):
        scene, rng = scenes.scene_for(scenes.MCQ_STREAM, index)
        question = scenes.ask(scene, "count", rng)
        yield scene, conversation(mcq_text(question.question, question.options))


def coverage(model, processor, cases) -> tuple[dict, dict]:
    mass = {layer: [] for layer in FASTV_LAYERS}
    covered = {(layer, k): [] for layer in FASTV_LAYERS for k in BUDGETS}
    for scene, prompt in cases:
        inputs = processor(images=[scenes.render(scene)], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        on_object = torch.from_numpy(probe_targets(scene).owner > 0)
        for layer in FASTV_LAYERS:
            scores = attentions[layer - 1][0].mean(0)[-1, visual]  # [576]
            mass[layer].append(float(scores[on_object].sum() / scores.sum()))
            for k in BUDGETS:
                kept = torch.zeros(576, dtype=torch.bool)
                kept[scores.topk(k).indices] = True
                covered[(layer, k)].append(float((kept & on_object).sum() / on_object.sum()))
    return mass, covered


def main() -> None:
    torch.set_num_threads(2)
    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT_DIR, attn_implementation="eager", **NO_HUB_KERNELS).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
    for title, cases in ((f"{SCENES} TinyCOCO scenes, caption prompt", caption_cases()),
                         (f"{SCENES} held-out MCQ-stream scenes, MCQ prompt, counting question", counting_cases())):
        mass, covered = coverage(model, processor, cases)
        print(f"{title}, shipped testbed")
        for layer in FASTV_LAYERS:
            shares = ", ".join(f"top-{k} keeps {np.mean(covered[(layer, k)]):.3f} of object patches (random: {k / 576:.3f})" for k in BUDGETS)
            print(f"FastV at layer {layer} (scores from layer {layer - 1}): attention mass on object patches {np.mean(mass[layer]):.3f}; {shares}")


if __name__ == "__main__":
    main()
