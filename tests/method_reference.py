"""Independent NumPy references for the official token-selection methods (one image at a time).

Written from ../shared/notes/methods.md sections 5 (DivPrune), 6 (VisionZip) and 9 (VisPruner), not from the
engine in hybrid_vlm/methods/. All arithmetic is float64 and every tie goes to the lowest index (stable sorts and
`np.argmax`'s first occurrence).

Each `*_reference` function returns what the method keeps; the matching `*_margin` function returns the smallest gap
between a decision's winner and its runner-up over the whole run, so a randomized test can check that float32
rounding in the engine cannot flip a decision (`inf` when no decision had a runner-up).

The `mean_includes_target`, `drop_lowest` and `use_max` switches are deliberate mutations of the rules, used by the
tests to show that a hand-worked case tells the right rule from a plausible wrong one.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12  # torch.nn.functional.normalize's eps


def _normalise(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.maximum(norms, _EPS)


def _descending(values: np.ndarray) -> np.ndarray:
    """Indices that sort `values` high to low; equal values keep their order (lowest index first)."""
    return np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")


def _gap(sorted_high_to_low: np.ndarray, boundary: int) -> float:
    """sorted[boundary - 1] - sorted[boundary]: the margin of a cut after `boundary` items (inf if no cut)."""
    if boundary <= 0 or boundary >= len(sorted_high_to_low):
        return float("inf")
    return float(sorted_high_to_low[boundary - 1] - sorted_high_to_low[boundary])


def _check_count(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value} must lie in [{low}, {high}]")


# --------------------------------------------------------------------------------------------------------------
# VisionZip (methods.md section 6)
# --------------------------------------------------------------------------------------------------------------


def _visionzip(cls_attention, keys, hidden, dominant: int, contextual: int, mean_includes_target: bool):
    attention = np.asarray(cls_attention, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    hidden = np.asarray(hidden, dtype=np.float64)
    patches = attention.shape[0]
    if keys.shape[0] != patches or hidden.shape[0] != patches:
        raise ValueError("cls_attention, keys and hidden must have the same number of patches")
    _check_count("dominant", dominant, 0, patches)
    _check_count("contextual", contextual, 0, patches)
    if dominant + contextual > patches:
        raise ValueError(f"dominant + contextual = {dominant + contextual} exceeds the {patches} patches")

    order = _descending(attention)
    margin = _gap(attention[order], dominant)
    dominant_slots = np.sort(order[:dominant])
    rest = np.setdiff1d(np.arange(patches), dominant_slots)  # ascending index order

    tokens: dict[int, np.ndarray] = {int(slot): hidden[slot] for slot in dominant_slots}
    if contextual > 0:
        step = max(1, len(rest) // contextual)
        target_positions = np.arange(contextual) * step
        targets = rest[target_positions]
        others = np.delete(rest, target_positions)
        unit = _normalise(keys[rest])
        similarity = unit[np.delete(np.arange(len(rest)), target_positions)] @ unit[target_positions].T  # [others, targets]
        assignment = np.argmax(similarity, axis=1) if len(others) else np.zeros(0, dtype=np.int64)
        if len(others) and contextual > 1:
            ranked = -np.sort(-similarity, axis=1)
            margin = min(margin, float((ranked[:, 0] - ranked[:, 1]).min()))
        for t, target in enumerate(targets):
            members = others[assignment == t]
            if mean_includes_target:
                tokens[int(target)] = hidden[np.concatenate([[target], members])].mean(axis=0)
            elif len(members):
                tokens[int(target)] = hidden[target] + hidden[members].mean(axis=0)
            else:
                tokens[int(target)] = hidden[target].copy()

    kept = np.array(sorted(tokens), dtype=np.int64)
    features = np.stack([tokens[int(slot)] for slot in kept]) if len(kept) else np.zeros((0, hidden.shape[1]))
    return kept, features, margin


def visionzip_reference(cls_attention, keys, hidden, dominant: int, contextual: int, mean_includes_target: bool = False):
    """VisionZip on one image: (kept [dominant + contextual] sorted int64, tokens [len(kept), C] float64).

    Dominant: the `dominant` patches with the highest CLS attention (ties: lower index). Our deviation from the
    official code: CLS is not among the inputs (llava-hf drops it), so all `dominant` tokens are patches.
    Contextual: the other patches in index order, keys L2-normalised; step = max(1, len(rest) // contextual);
    targets rest[0], rest[step], ... (the first `contextual`); every other member of rest joins the target of
    highest key cosine (ties: the earlier target). A target's token is hidden[target] + mean(hidden[members]),
    the target PLUS the mean of its members (just hidden[target] without members). Row i of `tokens` is the token
    at slot kept[i]. `mean_includes_target=True` is the mutation mean(hidden[[target] + members]).
    """
    kept, tokens, _ = _visionzip(cls_attention, keys, hidden, dominant, contextual, mean_includes_target)
    return kept, tokens


def visionzip_margin(cls_attention, keys, hidden, dominant: int, contextual: int) -> float:
    """Smallest decision gap of VisionZip: the dominant cut in attention, and best minus second-best target cosine."""
    return _visionzip(cls_attention, keys, hidden, dominant, contextual, False)[2]


# --------------------------------------------------------------------------------------------------------------
# VisPruner (methods.md section 9)
# --------------------------------------------------------------------------------------------------------------


def _vispruner(cls_attention, features, budget: int, important: int, drop_lowest: bool):
    attention = np.asarray(cls_attention, dtype=np.float64)
    patches = attention.shape[0]
    if np.shape(features)[0] != patches:
        raise ValueError("cls_attention and features must have the same number of patches")
    _check_count("budget", budget, 1, patches)
    _check_count("important", important, 0, budget)
    unit = _normalise(features)

    order = _descending(attention)
    sorted_attention = attention[order]
    margin = float(np.diff(-sorted_attention).min()) if patches > 1 else float("inf")  # the whole order matters
    important_slots = order[:important]
    diverse = budget - important
    residual = order[important:] if diverse > 0 else order[:0]  # important == budget: only the important tokens
    while diverse > 0:
        r = min(8, len(residual) - diverse)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]  # a: ceil(R/2) even positions, b: floor(R/2) odd positions
        score = (unit[a] @ unit[b].T).max(axis=1)
        ranked = _descending(score)  # equal scores keep their order in a
        kept_ranked = ranked[: len(ranked) - r] if drop_lowest else ranked[r:]  # slicing: r > len(a) drops all of a
        ranked_scores = score[ranked]
        # the cut between dropped and kept a, and every adjacent pair among the kept a (their order is the new residual's)
        cut, first_kept, last_kept = (len(ranked) - r, 1, len(ranked) - r) if drop_lowest else (r, r + 1, len(ranked))
        margin = min([margin, _gap(ranked_scores, cut)] + [_gap(ranked_scores, i) for i in range(first_kept, last_kept)])
        residual = np.concatenate([a[kept_ranked], b])
    return np.sort(np.concatenate([important_slots, residual])).astype(np.int64), margin


def vispruner_reference(cls_attention, features, budget: int, important: int, drop_lowest: bool = False):
    """VisPruner on one image: kept [budget] sorted int64.

    order = argsort(cls_attention) high to low (stable); important = order[:important]; residual = the rest in
    that order; T_div = budget - important. While T_div > 0: r = min(8, R - T_div), stop if r <= 0; a = residual
    at even positions, b = at odd positions (odd R: a has one more); score_a = max cosine of a to b (L2-normalised
    features); sort a by score high to low, stable; drop the first r; residual = kept a in that order ++ b.
    Kept = important plus residual (just important when important == budget). `drop_lowest=True` is the mutation
    that drops the r lowest-scoring a instead. r > len(a) (outside the official code's domain) drops all of a.
    """
    return _vispruner(cls_attention, features, budget, important, drop_lowest)[0]


def vispruner_margin(cls_attention, features, budget: int, important: int) -> float:
    """Smallest decision gap of VisPruner: adjacent attention values, and the drop cut and kept-a order per round."""
    return _vispruner(cls_attention, features, budget, important, False)[1]


# --------------------------------------------------------------------------------------------------------------
# DivPrune (methods.md section 5)
# --------------------------------------------------------------------------------------------------------------


def _divprune(features, budget: int, use_max: bool):
    unit = _normalise(features)
    patches = unit.shape[0]
    _check_count("budget", budget, 1, patches)
    distance = 1.0 - unit @ unit.T
    off_diagonal = ~np.eye(patches, dtype=bool)
    if use_max:
        score = np.where(off_diagonal, distance, -np.inf).max(axis=0)
    else:
        score = np.where(off_diagonal, distance, np.inf).min(axis=0)
    if patches == 1:
        score = np.zeros(1)
    selected: list[int] = []
    taken = np.zeros(patches, dtype=bool)
    margin = float("inf")
    for _ in range(budget):
        candidates = np.where(taken, -np.inf, score)
        pick = int(np.argmax(candidates))
        if patches - len(selected) > 1:
            margin = min(margin, _gap(-np.sort(-candidates), 1))
        selected.append(pick)
        taken[pick] = True
        score = distance[pick] if len(selected) == 1 else (np.maximum if use_max else np.minimum)(score, distance[pick])
    return np.sort(np.array(selected, dtype=np.int64)), margin


def divprune_reference(features, budget: int, use_max: bool = False):
    """DivPrune on one image: kept [budget] sorted int64 (max-min greedy, farthest-point sampling).

    D = 1 - cosine of the L2-normalised features. Step 0: m_j = min over i != j of D[i, j] (the diagonal excluded
    explicitly; the official code takes the 2nd smallest of the column); pick argmax_j m_j. Step t:
    score_j = min over the selected s of D[s, j], already-selected j excluded (the official code can pick a token
    twice); pick the argmax. Ties: lowest j. `use_max=True` is the mutation that takes MAX instead of min, at step 0
    too (max over i != j).
    """
    return _divprune(features, budget, use_max)[0]


def divprune_margin(features, budget: int) -> float:
    """Smallest decision gap of DivPrune: best minus second-best candidate score at each greedy step."""
    return _divprune(features, budget, False)[1]
