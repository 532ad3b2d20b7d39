"""The vision phase alone from scratch, one variant, N steps; prints the probe's accuracies averaged
over the last 20 steps. Variants: base; gabor (oriented cosine filters in half the patch-embedding
channels); sincos1 / sincos5 (2-D sin-cos position embeddings, scaled 1x / 5x); shape3 (the two
shape losses weighted 3x: ObjectProbe's shape_weight; run before it existed, through a patched copy of
its loss, the same arithmetic).

    PYTHONPATH=. python reports/testbed-attempts/probe-experiments/vision_phase_variant.py base 80 [LR]
"""
import sys, json, math, statistics, torch, time
from dataclasses import replace
from hybrid_vlm.testbed import build_untrained
from hybrid_vlm.testbed import train as T
from hybrid_vlm.hf_compat.llava import vision_tower
mode=sys.argv[1]; steps=int(sys.argv[2])
torch.set_num_threads(2)
model,proc=build_untrained(0)
s=T.TrainSettings(vision_steps=steps, learning_rate=float(sys.argv[3]) if len(sys.argv)>3 else 2e-3)
if "gabor" in mode:
    conv=vision_tower(model).embeddings.patch_embedding
    w=conv.weight.data  # [96,3,14,14]
    y,x=torch.meshgrid(torch.arange(14.)-6.5,torch.arange(14.)-6.5,indexing="ij")
    g=torch.Generator().manual_seed(0)
    for c in range(48):
        th=math.pi*(c%8)/8; fr=[1/14,2/14,3/14][(c//8)%3]; ph=math.pi/2*((c//24)%2)
        u=x*math.cos(th)+y*math.sin(th)
        f=torch.cos(2*math.pi*fr*u+ph)
        f=f-f.mean(); f=f/f.norm()
        w[c]=f[None].expand(3,14,14)/math.sqrt(3)*w[c].norm()
if "sincos" in mode:
    emb=vision_tower(model).embeddings.position_embedding.weight.data  # [577,96]
    d=96; q=d//4
    omega=1/10000**(torch.arange(q)/q)
    gy,gx=torch.meshgrid(torch.arange(24.),torch.arange(24.),indexing="ij")
    def enc(v): a=v.flatten()[:,None]*omega[None]; return torch.cat([a.sin(),a.cos()],1)
    pe=torch.cat([enc(gy),enc(gx)],1)
    emb[1:]=pe*emb[1:].norm(dim=1,keepdim=True).mean()/pe.norm(dim=1,keepdim=True).mean()*float(mode.split("sincos")[1][:1] or 1)
torch.manual_seed(0)
probe=T.ObjectProbe(128, shape_weight=3.0 if "shape3" in mode else 1.0)
model.train()
class F:
    def write(self,x): pass
    def flush(self): pass
tr=T.Trainer(model,probe,s,F())
t=time.time()
for st in range(steps):
    tr.vision_step(st,proc)
last=tr.log[-20:]
print(mode, sys.argv[3:] , {k: round(statistics.mean(r[k] for r in last),3) for k in ("probe_loss","patch_colour","patch_shape","object_colour","object_shape","object_size","count")}, round(time.time()-t))
