"""Is an object's shape linearly readable from the mean of its raw patches? A logistic regression on
the mean 14 x 14 x 3 patch (and on its per-pixel channel spread) of each object, 1,500 training
scenes, 80% to fit and 20% to score: a floor for what a ViT must add by itself.

    python reports/testbed-attempts/probe-experiments/pixel_probe.py
"""
import numpy as np
from hybrid_vlm.testbed import scenes
from hybrid_vlm.testbed.train import probe_targets
from sklearn.linear_model import LogisticRegression
X=[];Y=[];S=[]
for i in range(1500):
    s,_=scenes.scene_for(scenes.TRAIN_STREAM,i)
    img=np.asarray(scenes.render(s),dtype=np.float32)/255
    p=img.reshape(24,14,24,14,3).transpose(0,2,1,3,4).reshape(576,-1)
    t=probe_targets(s)
    for k,o in enumerate(s.objects):
        m=t.owner==k+1
        if m.sum()==0: continue
        X.append(p[m].mean(0)); Y.append(scenes.SHAPES.index(o.shape)); S.append(o.size)
X=np.array(X);Y=np.array(Y);S=np.array(S)
n=int(len(X)*0.8)
# grey-level (colour-invariant): mean over channels
Xg=X.reshape(len(X),196,3).std(-1)
for name,F in (("rgb",X),("chan-std",Xg)):
    clf=LogisticRegression(max_iter=2000,C=1.0).fit(F[:n],Y[:n]); pr=clf.predict(F[n:])
    print(name, (pr==Y[n:]).mean(), {sz:(pr[S[n:]==sz]==Y[n:][S[n:]==sz]).mean() for sz in scenes.SIZES})
