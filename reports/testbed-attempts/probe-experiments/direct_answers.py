"""Short-answer accuracy of a checkpoint, by question kind: 48 held-out MCQ-stream scenes (indices
5000-5047, inside the range TinyMMBench reserves, 0-6399, but none of them drawn by its 100
questions: each took at most 3 of its 64 attempts), VLMEvalKit's "Answer the question directly." prompt, greedy, an
answer right when it equals the option's words. Separates "the LLM cannot find the object" from "the
LLM cannot map an option to its letter".

    PYTHONPATH=. python reports/testbed-attempts/probe-experiments/direct_answers.py CHECKPOINT_DIR

run4's weights: `git show a073cb4:hybrid_vlm/testbed/checkpoint/FILE` for each file of that folder.
"""
import sys, torch, numpy as np
from transformers import AutoProcessor, LlavaForConditionalGeneration
from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from hybrid_vlm.testbed import scenes
from hybrid_vlm.testbed.prompts import conversation
from hybrid_vlm.testbed.train import DIRECT_INSTRUCTION, jpeg_roundtrip
path=sys.argv[1]
torch.set_num_threads(2)
m=LlavaForConditionalGeneration.from_pretrained(path, **NO_HUB_KERNELS).eval(); p=AutoProcessor.from_pretrained(path)
res={}
for kind in scenes.QUESTION_KINDS:
    imgs,prompts,ans=[],[],[]
    for i in range(48):
        sc,rng=scenes.scene_for(scenes.MCQ_STREAM, 5000+i)
        q=scenes.ask(sc,kind,rng)
        if q is None: continue
        imgs.append(jpeg_roundtrip(scenes.render(sc))); prompts.append(conversation(q.question+"\n"+DIRECT_INSTRUCTION)); ans.append(q.options[q.answer])
    with torch.no_grad():
        inp=p(images=imgs,text=prompts,return_tensors='pt',padding=True)
        out=m.generate(**inp,max_new_tokens=6,do_sample=False)
    txt=p.tokenizer.batch_decode(out[:,inp['input_ids'].shape[1]:],skip_special_tokens=True)
    res[kind]=np.mean([t.strip()==a for t,a in zip(txt,ans)])
    print(kind, round(res[kind],3), list(zip(txt[:4],ans[:4])), flush=True)
