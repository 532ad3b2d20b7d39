"""How much of each object's shape and colour the shipped testbed's image tokens carry: a logistic
regression on the mean projected token of each object (640 held-out scenes of the MCQ stream beyond
the ones TinyMMBench uses; 75% to fit, 25% to score), by object size.

    python reports/testbed-attempts/probe-experiments/feature_probe.py
"""
import numpy as np, torch
from transformers import LlavaForConditionalGeneration, AutoProcessor
from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from hybrid_vlm.testbed import scenes
from hybrid_vlm.testbed.train import probe_targets, jpeg_roundtrip
from hybrid_vlm.hf_compat.llava import stock_image_features
from sklearn.linear_model import LogisticRegression
from hybrid_vlm.testbed import CHECKPOINT_DIR as CHECKPOINT
torch.set_num_threads(2)
m=LlavaForConditionalGeneration.from_pretrained(CHECKPOINT, **NO_HUB_KERNELS).eval(); p=AutoProcessor.from_pretrained(CHECKPOINT)
X=[];Y=[];S=[];C=[]
for b in range(40):
    ss=[scenes.scene_for(scenes.MCQ_STREAM,10000+b*16+i)[0] for i in range(16)]
    pv=p.image_processor([jpeg_roundtrip(scenes.render(s)) for s in ss],return_tensors='pt')['pixel_values']
    with torch.no_grad(): f=stock_image_features(m,pv).float().numpy()
    for s,fi in zip(ss,f):
        t=probe_targets(s)
        for k,o in enumerate(s.objects):
            mk=t.owner==k+1
            if mk.sum()==0: continue
            X.append(fi[mk].mean(0)); Y.append(scenes.SHAPES.index(o.shape)); S.append(o.size); C.append(list(scenes.COLOURS).index(o.colour))
X=np.array(X);Y=np.array(Y);S=np.array(S);C=np.array(C); n=int(.75*len(X))
for name,T in (("shape",Y),("colour",C)):
    clf=LogisticRegression(max_iter=3000).fit(X[:n],T[:n]); pr=clf.predict(X[n:])
    print(name,len(X),round((pr==T[n:]).mean(),3),{sz:round((pr[S[n:]==sz]==T[n:][S[n:]==sz]).mean(),3) for sz in scenes.SIZES})
