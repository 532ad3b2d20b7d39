"""The window phase alone for N steps (then F whole-image vision steps), then the probe's accuracies
on 128 whole images of fresh scenes, no update. Run on 2026-12-04 before the window phase became
the trainer's first phase (train.TrainSettings.window_steps).

    PYTHONPATH=. python reports/testbed-attempts/probe-experiments/window_phase.py STEPS SCENES_PER_STEP [LR] [F]
"""
import sys, json, statistics, time, torch
from hybrid_vlm.testbed import build_untrained
from hybrid_vlm.testbed import train as T
from hybrid_vlm.hf_compat.llava import stock_image_features
torch.set_num_threads(2)
steps=int(sys.argv[1]); scenes_per=int(sys.argv[2]); lr=float(sys.argv[3]) if len(sys.argv)>3 else 2e-3
full=int(sys.argv[4]) if len(sys.argv)>4 else 0
model,proc=build_untrained(0)
s=T.TrainSettings(window_steps=steps, window_batch_scenes=scenes_per, learning_rate=lr, vision_steps=full)
torch.manual_seed(0)
probe=T.ObjectProbe(128); model.train()
class F:
    def write(self,x): pass
    def flush(self): pass
tr=T.Trainer(model,probe,s,F()); t=time.time()
for st in range(steps):
    tr.window_step(st,proc)
    if st%100==99: print(st, {k: round(statistics.mean(r[k] for r in tr.log[-50:]),3) for k in ("patch_shape","object_shape","object_colour")}, round(time.time()-t), flush=True)
for st in range(full):
    tr.vision_step(st,proc)
    if st%50==49: print('full',st, {k: round(statistics.mean(r[k] for r in tr.log[-20:]),3) for k in ("patch_shape","object_shape","object_colour","count")}, round(time.time()-t), flush=True)
res={}
with torch.no_grad():
    for e in range(4):
        pv,(o,ob)=T.vision_batch(100000+e,T.TrainSettings(vision_batch_images=32),proc)
        _,a=probe.loss(stock_image_features(model,pv),o,ob)
        for k,v in a.items(): res.setdefault(k,[]).append(v)
print('EVAL whole images', {k: round(statistics.mean(v),3) for k,v in res.items()}, round(time.time()-t), flush=True)
