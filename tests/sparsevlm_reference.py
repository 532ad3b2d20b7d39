"""An independent SparseVLM v1.5 reference, written from ../shared/notes/methods.md section 7 and the
official code it cites (Gumpest/SparseVLMs@734d900: `modelling_sparse_llama.py` L199-311,
`score.py::attn_postprocess_topk`, `utils.py::cluster_and_merge`), not from the engine.

One unpadded prompt (batch 1) runs through the stock decoder layers. At each scoring layer the
layer runs on its whole input; its stock eager attention weights (head mean, the raters' rows,
the visual columns, the raters' mean) score the visual tokens; its output keeps the prefix, the top
visual tokens, the DPC-kNN clusters of the best pruned ones (NumPy loops, float64) right after
them, and the text. Positions: 0..n-1 after each stage (the official rule), or each token's
original id with a cluster at its center's.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from reference import eager_copy
from stage_reference import causal_additive


def raters_reference(embeds: np.ndarray, image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Prompt positions of the raters: `m_v_t = softmax(v_t @ t_t.T, text).mean(visual)`, above its mean."""
    logits = embeds[image] @ embeds[text].T  # [V, T]
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    average = weights.mean(axis=0)
    return text[average > average.mean()]


def dpc_knn_reference(tokens: np.ndarray, clusters: int, noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(merged [clusters, C], centers): `cluster_and_merge` for one sample. Its density noise
    (`torch.rand(...) * 1e-6`) is the draw `noise` where given; by default none, and of two tokens of
    exactly equal density the lower index is the denser (one outcome of the noise)."""
    count, channels = tokens.shape
    distance = np.array([[np.sqrt(((tokens[i] - tokens[j]) ** 2).sum()) for j in range(count)] for i in range(count)]) / np.sqrt(channels)
    density = np.array([np.exp(-np.mean(np.sort(distance[i])[:clusters] ** 2)) for i in range(count)])
    if noise is not None:
        density = density + noise
    index = np.arange(count)
    parent = np.empty(count)
    for i in range(count):
        denser = (density > density[i]) | ((density == density[i]) & (index < i))
        parent[i] = distance[i, denser].min() if denser.any() else distance.max()
    centers = np.argsort(-(parent * density), kind="stable")[:clusters]
    members = [[] for _ in range(clusters)]
    for token in range(count):
        own = np.flatnonzero(centers == token)
        cluster = int(own[0]) if len(own) else int(np.argmin(distance[centers, token]))
        members[cluster].append(token)
    # the official mean: the members' sum times 1 / (members + 1e-6)
    return np.stack([tokens[group].sum(axis=0) / (len(group) + 1e-6) for group in members]), centers


def recycled_by_hand(pruned: int) -> tuple[int, int]:
    candidates = int(pruned * 0.3) + 1
    return candidates, int(candidates / 10) + 1


@torch.no_grad()
def sparsevlm_reference(model, sample: dict, scoring_layers: tuple[int, ...], schedule: tuple[int, ...], position_mode: str = "renumbered",
                        every_text_token_rates: bool = False):
    """(logits of the last prompt token [vocab], prompt positions after the last stage: a cluster
    counts as its center's position). `every_text_token_rates`: a mutant that skips the rater choice."""
    reference = copy.deepcopy(model)
    language_model = reference.model.language_model
    eager_layers = eager_copy(model).model.language_model.layers
    input_ids = sample["input_ids"][0]
    is_visual = (input_ids == reference.config.image_token_id).numpy()
    hidden = language_model.embed_tokens(input_ids[None])
    features = reference.model.get_image_features(sample["pixel_values"], return_dict=True).pooler_output
    hidden[0, torch.from_numpy(is_visual)] = torch.cat(list(features)).to(hidden.dtype)
    image = np.flatnonzero(is_visual)
    text = np.arange(image[-1] + 1, len(input_ids))
    raters = text if every_text_token_rates else raters_reference(hidden[0].double().numpy(), image, text)
    alive = np.arange(len(input_ids))
    positions = torch.arange(len(input_ids))[None]
    stage = 0
    for layer_idx, layer in enumerate(language_model.layers):
        cos_sin = language_model.rotary_emb(hidden, positions)
        mask = causal_additive(hidden.shape[1], hidden.dtype)
        output = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions)
        if layer_idx not in scoring_layers:
            hidden = output
            continue
        eager = eager_layers[layer_idx]
        _, weights = eager.self_attn(hidden_states=eager.input_layernorm(hidden), position_embeddings=cos_sin, attention_mask=mask)
        attention = weights[0].mean(dim=0).double().numpy()  # [L, L]
        visual_now = np.flatnonzero(is_visual[alive])
        rows = np.flatnonzero(np.isin(alive, raters))
        score = attention[np.ix_(rows, visual_now)].mean(axis=0)  # [V]
        kept_count = min(schedule[stage], len(visual_now) - 1)
        order = np.argsort(-score, kind="stable")
        candidates_count, clusters = recycled_by_hand(len(visual_now) - kept_count)
        candidates = visual_now[order[kept_count : kept_count + candidates_count]]
        merged, centers = dpc_knn_reference(output[0, candidates].double().numpy(), clusters)
        kept_visual = np.sort(visual_now[order[:kept_count]])
        before, after = np.arange(visual_now[0]), np.arange(visual_now[-1] + 1, len(alive))
        sequence = np.concatenate([before, kept_visual, candidates[centers], after])
        new_hidden = output[:, sequence].clone()
        start = len(before) + len(kept_visual)
        new_hidden[0, start : start + clusters] = torch.from_numpy(merged).to(new_hidden.dtype)
        hidden, alive = new_hidden, alive[sequence]
        positions = torch.arange(len(alive))[None] if position_mode == "renumbered" else torch.from_numpy(alive)[None]
        stage += 1
    return reference.lm_head(language_model.norm(hidden))[0, -1], alive
