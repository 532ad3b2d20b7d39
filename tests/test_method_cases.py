"""Hand-worked cases for VisionZip, VisPruner and DivPrune (methods.md sections 6, 9 and 5).

Each case is tiny and its answer is derived by hand in the comments and written as a literal. The tests check
(a) that tests/method_reference.py reproduces the hand answer, (b) that a deliberately mutated rule does not (so
the case tells the rules apart), and (c) that the engine (hybrid_vlm.methods) reproduces it. Randomized cases with
clear decision margins then compare the engine with the reference on batches of 3 images.

Tests whose names contain "reference" use NumPy only: `pytest tests/test_method_cases.py -k reference`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from method_reference import (
    divprune_margin,
    divprune_reference,
    visionzip_margin,
    visionzip_reference,
    vispruner_margin,
    vispruner_reference,
)


def _tensor(array) -> torch.Tensor:
    """An engine input: float32 on the CPU."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def _batch(array) -> torch.Tensor:
    """One image as an engine batch: [1, ...] float32."""
    return _tensor(array).unsqueeze(0)


def _unit_vectors(degrees) -> np.ndarray:
    """2-d unit vectors at the given angles: the cosine of two of them is cos(angle difference)."""
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# --------------------------------------------------------------------------------------------------------------
# VisionZip: dominant by CLS attention, contextual = target + mean of its members (by key cosine)
# --------------------------------------------------------------------------------------------------------------

#                 patch:    0     1     2     3     4     5     6     7
VZ_CLS_ATTENTION = [0.05, 0.30, 0.10, 0.02, 0.25, 0.07, 0.12, 0.09]
VZ_KEYS = [[1, 0], [5, 4], [2, 0.5], [0, 1], [-3, 2], [0.3, 1], [-1, -1], [0.2, 3]]
VZ_HIDDEN = [[1, 2], [7, 7], [3, 4], [9, 0], [0, -3], [2, 6], [-1, 5], [4, 2]]
VZ_DOMINANT, VZ_CONTEXTUAL = 2, 3
# Dominant: the 2 highest attentions are patch 1 (0.30) and patch 4 (0.25).
# rest = [0, 2, 3, 5, 6, 7] (6 patches), step = max(1, 6 // 3) = 2, targets = rest[0], rest[2], rest[4] = 0, 3, 6;
# the others are 2, 5, 7. Key cosines to the targets (t0 = [1, 0], t3 = [0, 1], t6 = [-1, -1]):
#   patch 2 [2, 0.5]:  0.970, 0.243, -0.857 -> target 0
#   patch 5 [0.3, 1]:  0.287, 0.958, -0.881 -> target 3
#   patch 7 [0.2, 3]:  0.067, 0.998, -0.753 -> target 3
#   target 6 gets no member.
# Tokens (target PLUS the mean of its members):
#   slot 0: h0 + mean(h2)     = [1, 2] + [3, 4]                   = [4, 6]
#   slot 3: h3 + mean(h5, h7) = [9, 0] + ([2, 6] + [4, 2]) / 2     = [12, 4]
#   slot 6: h6                                                     = [-1, 5]
#   slots 1, 4 (dominant): h1 = [7, 7], h4 = [0, -3]
# The mutation mean(target + members) would give slot 0 = [2, 3] and slot 3 = [5, 8/3] instead.
VZ_KEPT = [0, 1, 3, 4, 6]
VZ_TOKENS = [[4, 6], [7, 7], [12, 4], [0, -3], [-1, 5]]
# contextual = 0: only the dominant patches 1 and 4, with their own hidden states.
VZ_KEPT_NO_CONTEXT = [1, 4]
VZ_TOKENS_NO_CONTEXT = [[7, 7], [0, -3]]


def test_visionzip_hand_case_reference():
    kept, tokens = visionzip_reference(VZ_CLS_ATTENTION, VZ_KEYS, VZ_HIDDEN, VZ_DOMINANT, VZ_CONTEXTUAL)
    assert kept.dtype == np.int64
    assert kept.tolist() == VZ_KEPT
    np.testing.assert_allclose(tokens, VZ_TOKENS, rtol=0, atol=1e-12)


def test_visionzip_hand_case_mutation_reference():
    kept, tokens = visionzip_reference(VZ_CLS_ATTENTION, VZ_KEYS, VZ_HIDDEN, VZ_DOMINANT, VZ_CONTEXTUAL, mean_includes_target=True)
    assert kept.tolist() == VZ_KEPT
    np.testing.assert_allclose(tokens, [[2, 3], [7, 7], [5, 8 / 3], [0, -3], [-1, 5]], rtol=0, atol=1e-12)
    assert not np.allclose(tokens, VZ_TOKENS, rtol=0, atol=1e-3)


def test_visionzip_hand_case_engine():
    from hybrid_vlm.methods.visionzip import visionzip_select

    selection = visionzip_select(_batch(VZ_CLS_ATTENTION), _batch(VZ_KEYS), _batch(VZ_HIDDEN), VZ_DOMINANT, VZ_CONTEXTUAL)
    assert selection.kept[0].tolist() == VZ_KEPT
    torch.testing.assert_close(selection.features[0].float(), torch.tensor(VZ_TOKENS, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_visionzip_no_contextual_reference():
    kept, tokens = visionzip_reference(VZ_CLS_ATTENTION, VZ_KEYS, VZ_HIDDEN, VZ_DOMINANT, 0)
    assert kept.tolist() == VZ_KEPT_NO_CONTEXT
    np.testing.assert_allclose(tokens, VZ_TOKENS_NO_CONTEXT, rtol=0, atol=1e-12)


def test_visionzip_no_contextual_engine():
    from hybrid_vlm.methods.visionzip import visionzip_select

    selection = visionzip_select(_batch(VZ_CLS_ATTENTION), _batch(VZ_KEYS), _batch(VZ_HIDDEN), VZ_DOMINANT, 0)
    assert selection.kept[0].tolist() == VZ_KEPT_NO_CONTEXT
    torch.testing.assert_close(selection.features[0].float(), torch.tensor(VZ_TOKENS_NO_CONTEXT, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_visionzip_ties_reference():
    # Equal attention: the dominant are the lowest indices 0, 1. rest = [2, 3, 4], contextual 2: step = 3 // 2 = 1,
    # targets 2, 3; patch 4's keys are as close to both targets, so it joins the earlier one (2): 2 -> h2 + h4.
    hidden = [[0, 0], [1, 1], [2, 0], [0, 3], [5, 5]]
    kept, tokens = visionzip_reference([0.2] * 5, [[1, 1]] * 5, hidden, 2, 2)
    assert kept.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(tokens, [[0, 0], [1, 1], [7, 5], [0, 3]], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# DivPrune: max-min greedy on 1 - cosine, with exact duplicate rows
# --------------------------------------------------------------------------------------------------------------

# Rows 0, 1, 2 are exact duplicates at 0 degrees; 3 = [0, 1] (90), 4 = [1, 1] (45), 5 = [-2, 1] (153.43),
# 6 = [3, 1] (18.43). D = 1 - cos:
#   D(dup, 3) = 1       D(dup, 4) = 1 - 1/sqrt2 = 0.2929   D(dup, 5) = 1 + 2/sqrt5 = 1.8944   D(dup, 6) = 1 - 3/sqrt10 = 0.0513
#   D(3, 4) = 0.2929    D(3, 5) = 1 - 1/sqrt5 = 0.5528     D(3, 6) = 1 - 1/sqrt10 = 0.6838
#   D(4, 5) = 1 + 1/sqrt10 = 1.3162   D(4, 6) = 1 - 2/sqrt5 = 0.1056   D(5, 6) = 1 + 1/sqrt2 = 1.7071
# Min rule:
#   step 0, nearest-neighbour distance m = [0, 0, 0, .2929, .1056, .5528, .0513]        -> 5
#   step 1, D[5]                        = [1.8944 x3, .5528, 1.3162, -, 1.7071]         -> 0 (first of the duplicates)
#   step 2, min(D[5], D[0])             = [-, 0, 0, .5528, .2929, -, .0513]              -> 3
#   step 3, min(.., D[3])               = [-, 0, 0, -, .2929, -, .0513]                  -> 4
#   step 4                              = [-, 0, 0, -, -, -, .0513]                      -> 6
#   step 5: only duplicates of 0 are left, all 0 -> 1 (the official code would re-pick 0 here; we exclude it)
# Max rule (mutation):
#   step 0, max over i != j = [1.8944, 1.8944, 1.8944, 1, 1.3162, 1.8944, 1.7071]       -> 0
#   step 1, D[0] -> 5; step 2, max(D[0], D[5]) = [-, 1.8944, 1.8944, 1, 1.3162, -, 1.7071] -> 1; step 3 -> 2;
#   step 4 -> 6 (1.7071); step 5 -> 4 (1.3162): it takes duplicates while distinct rows remain.
DP_FEATURES = [[1, 0], [1, 0], [1, 0], [0, 1], [1, 1], [-2, 1], [3, 1]]
DP_CASES = {  # budget: (min rule, max-rule mutation)
    3: ([0, 3, 5], [0, 1, 5]),
    5: ([0, 3, 4, 5, 6], [0, 1, 2, 5, 6]),
    6: ([0, 1, 3, 4, 5, 6], [0, 1, 2, 4, 5, 6]),
}


@pytest.mark.parametrize("budget", sorted(DP_CASES))
def test_divprune_duplicates_reference(budget):
    kept = divprune_reference(DP_FEATURES, budget)
    assert kept.dtype == np.int64
    assert kept.tolist() == DP_CASES[budget][0]


@pytest.mark.parametrize("budget", sorted(DP_CASES))
def test_divprune_duplicates_mutation_reference(budget):
    kept = divprune_reference(DP_FEATURES, budget, use_max=True).tolist()
    assert kept == DP_CASES[budget][1]
    assert kept != DP_CASES[budget][0]


@pytest.mark.parametrize("budget", sorted(DP_CASES))
def test_divprune_duplicates_engine(budget):
    from hybrid_vlm.methods.divprune import divprune_select

    assert divprune_select(_batch(DP_FEATURES), budget).kept[0].tolist() == DP_CASES[budget][0]


def test_divprune_ties_reference():
    # All rows equal: every score is 0, the lowest unselected index wins and nothing is picked twice.
    assert divprune_reference([[2.0, 1.0]] * 5, 3).tolist() == [0, 1, 2]
    assert divprune_reference([[2.0, 1.0]], 1).tolist() == [0]


# --------------------------------------------------------------------------------------------------------------
# VisPruner: important by attention, then rounds of "drop the a most similar to b"
# --------------------------------------------------------------------------------------------------------------

# The case is laid out by attention rank (rank k has attention 0.50 - 0.02 k) and placed on the patches by the
# permutation VP_RANK_TO_PATCH = (7 k + 5) mod 24. Features are 2-d unit vectors at the angles below (degrees), so
# cos(a, b) = cos(angle difference) and "highest score" = "smallest angle to the nearest b".
# Ranks 0, 1 are the important tokens (146 and 250 degrees); ranks 2, 4, ..., 22 are round 1's a and
# ranks 3, 5, ..., 23 its b.
VP_IMPORTANT_ANGLES = [146, 250]
VP_A_ANGLES = [39, 1, 150, 91, 18, 144, 63, 9, 123, 162, 28]  # a0 .. a10
VP_B_ANGLES = [0, 7, 15, 24, 34, 45, 57, 70, 84, 99, 115]  # b0 .. b10, gaps 7, 8, ..., 16
VP_RANK_TO_PATCH = [5, 12, 19, 2, 9, 16, 23, 6, 13, 20, 3, 10, 17, 0, 7, 14, 21, 4, 11, 18, 1, 8, 15, 22]
VP_BUDGET, VP_IMPORTANT = 13, 2
# Round 1: R = 22, T_div = 11, r = min(8, 11) = 8. Angle of each a to its nearest b:
#   39: 5, 1: 1, 150: 35, 91: 7, 18: 3, 144: 29, 63: 6, 9: 2, 123: 8, 162: 47, 28: 4.
#   The 8 closest (1..8 degrees) are dropped; the kept a in descending score order are 144 (29), 150 (35), 162 (47)
#   (in a's own order they were 150, 144, 162). Residual = [144, 150, 162, 0, 7, 15, 24, 34, 45, 57, 70, 84, 99, 115].
# Round 2: R = 14, r = min(8, 14 - 11) = 3. a = [144, 162, 7, 24, 45, 70, 99], b = [150, 0, 15, 34, 57, 84, 115].
#   Nearest-b angles: 144: 6 (150), 162: 12 (150), 7: 7, 24: 9, 45: 11, 70: 13, 99: 15. Drop 144, 7, 24.
#   Residual = [45, 162, 70, 99] + b: 11 = T_div tokens, so round 3 has r = 0 and stops.
# Kept angles: 146, 250 (important) and 0, 15, 34, 45, 57, 70, 84, 99, 115, 150, 162.
#   Wrong residual orders change round 2's pairs: kept a in a's own order [150, 144, 162] puts 144 in b and drops
#   150 instead; b before a (b0..b10, 144, 150, 162) puts the even b in a and drops 150, 0, 15.
# drop_lowest (mutation): round 1 keeps 1, 9, 18; round 2 (a = [1, 18, 7, 24, 45, 70, 99], b = [9, 0, 15, 34, 57,
#   84, 115]) drops 45, 70, 99: kept angles 146, 250, 0, 1, 7, 9, 15, 18, 24, 34, 57, 84, 115.
VP_KEPT = [0, 1, 2, 4, 5, 6, 8, 10, 12, 14, 18, 22, 23]
VP_KEPT_DROP_LOWEST = [2, 3, 5, 6, 9, 10, 12, 14, 16, 18, 20, 21, 22]


def _vispruner_case():
    """(cls_attention [24], features [24, 2], angle of each patch)."""
    rank_angles = VP_IMPORTANT_ANGLES + [angle for pair in zip(VP_A_ANGLES, VP_B_ANGLES) for angle in pair]
    attention, angles = np.zeros(24), np.zeros(24)
    for rank, patch in enumerate(VP_RANK_TO_PATCH):
        attention[patch] = 0.50 - 0.02 * rank
        angles[patch] = rank_angles[rank]
    return attention, _unit_vectors(angles), angles


def _vispruner_wrong_order(attention, features, budget, important, order):
    """VisPruner with a wrong residual order after each round ("a_own_order" or "b_then_a"), to show the case sees it."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    ranked = np.argsort(-attention, kind="stable")
    residual, diverse = ranked[important:], budget - important
    while (r := min(8, len(residual) - diverse)) > 0:
        a, b = residual[0::2], residual[1::2]
        survivors = np.argsort(-(unit[a] @ unit[b].T).max(axis=1), kind="stable")[r:]  # score order, high to low
        if order == "a_own_order":
            residual = np.concatenate([a[np.sort(survivors)], b])
        else:
            residual = np.concatenate([b, a[survivors]])
    return sorted(np.concatenate([ranked[:important], residual]).tolist())


def test_vispruner_case_layout_reference():
    attention, _, angles = _vispruner_case()
    assert sorted(VP_RANK_TO_PATCH) == list(range(24))
    assert VP_RANK_TO_PATCH == [(7 * rank + 5) % 24 for rank in range(24)]
    assert np.argsort(-attention, kind="stable").tolist() == VP_RANK_TO_PATCH
    assert sorted(angles[VP_KEPT].tolist()) == [0, 15, 34, 45, 57, 70, 84, 99, 115, 146, 150, 162, 250]
    assert sorted(angles[VP_KEPT_DROP_LOWEST].tolist()) == [0, 1, 7, 9, 15, 18, 24, 34, 57, 84, 115, 146, 250]


def test_vispruner_two_rounds_reference():
    attention, features, _ = _vispruner_case()
    kept = vispruner_reference(attention, features, VP_BUDGET, VP_IMPORTANT)
    assert kept.dtype == np.int64
    assert kept.tolist() == VP_KEPT


def test_vispruner_two_rounds_mutation_reference():
    attention, features, angles = _vispruner_case()
    kept = vispruner_reference(attention, features, VP_BUDGET, VP_IMPORTANT, drop_lowest=True).tolist()
    assert kept == VP_KEPT_DROP_LOWEST
    assert kept != VP_KEPT
    for order, expected in (("a_own_order", [0, 15, 34, 45, 57, 70, 84, 99, 115, 144, 146, 162, 250]),
                            ("b_then_a", [7, 24, 34, 45, 57, 70, 84, 99, 115, 144, 146, 162, 250])):
        wrong = _vispruner_wrong_order(attention, features, VP_BUDGET, VP_IMPORTANT, order)
        assert sorted(angles[wrong].tolist()) == expected
        assert wrong != VP_KEPT


def test_vispruner_two_rounds_engine():
    from hybrid_vlm.methods.vispruner import vispruner_select

    attention, features, _ = _vispruner_case()
    assert vispruner_select(_batch(attention), _batch(features), VP_BUDGET, VP_IMPORTANT).kept[0].tolist() == VP_KEPT


def test_vispruner_ties_reference():
    # Equal attention: order = 0, 1, 2, 3; important = [0]; residual [1, 2, 3], T_div = 1, r = min(8, 2) = 2,
    # a = [1, 3] (odd R: a has the extra one), b = [2]; equal scores keep a's order, so 1 and 3 are dropped.
    assert vispruner_reference([0.25] * 4, [[1.0, 2.0]] * 4, 2, 1).tolist() == [0, 2]
    # important = budget: no rounds, the top-attention patches.
    assert vispruner_reference([0.1, 0.4, 0.3, 0.2], [[1.0, 0.0]] * 4, 2, 2).tolist() == [1, 2]


# --------------------------------------------------------------------------------------------------------------
# Argument checks of the references
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dominant", "contextual"), [(-1, 2), (2, -1), (5, 4), (9, 0), (0, 9)]
)
def test_visionzip_validation_reference(dominant, contextual):
    with pytest.raises(ValueError):
        visionzip_reference(VZ_CLS_ATTENTION, VZ_KEYS, VZ_HIDDEN, dominant, contextual)


@pytest.mark.parametrize(("budget", "important"), [(0, 0), (25, 2), (5, 6), (5, -1)])
def test_vispruner_validation_reference(budget, important):
    attention, features, _ = _vispruner_case()
    with pytest.raises(ValueError):
        vispruner_reference(attention, features, budget, important)


@pytest.mark.parametrize("budget", [0, -1, 8])
def test_divprune_validation_reference(budget):
    with pytest.raises(ValueError):
        divprune_reference(DP_FEATURES, budget)


# --------------------------------------------------------------------------------------------------------------
# Randomized cases: engine == reference on 3 images, with every decision clear of float32 rounding
# --------------------------------------------------------------------------------------------------------------

IMAGES = 3
RANDOM_CASES = [(0, 24), (3, 30), (2, 36)]  # (seed, patches)
MIN_MARGIN = 5e-5  # float32 rounding moves a cosine or a distance by ~1e-7


def _visionzip_settings(patches):
    return [(4, 3), (8, 5), (10, 0), (1, 7), (patches - 6, 5), (patches // 2, patches // 2)]  # (dominant, contextual)


def _vispruner_settings(patches):
    return [(patches // 2, patches // 4), (patches - 2, 5), (12, 3), (patches // 2, 0), (patches // 2, patches // 2),
            (patches // 2 + 1, patches // 4 + 1), (patches // 3, 1), (1, 1)]  # (budget, important)


def _divprune_budgets(patches):
    return [1, 4, patches // 2, patches - 1, patches]


def _random_inputs(seed, patches):
    """attention [3, P] (a random permutation of well separated values), keys [3, P, 8], hidden [3, P, 16]."""
    rng = np.random.default_rng(seed)
    attention = np.stack([(rng.permutation(patches) + rng.uniform(0.3, 0.7, patches)) / patches for _ in range(IMAGES)])
    return attention, rng.normal(size=(IMAGES, patches, 8)), rng.normal(size=(IMAGES, patches, 16))


def _vispruner_rounds(patches, budget, important):
    """(R, r) of each round; r never exceeds len(a) = ceil(R / 2) in the settings used (the official code needs r <= R // 2)."""
    residual, diverse, rounds = patches - important, budget - important, []
    while diverse > 0 and (r := min(8, residual - diverse)) > 0:
        rounds.append((residual, r))
        residual -= min(r, (residual + 1) // 2)
    return rounds


@pytest.mark.parametrize(("seed", "patches"), RANDOM_CASES)
def test_random_cases_have_clear_margins_reference(seed, patches):
    attention, keys, hidden = _random_inputs(seed, patches)
    for image in range(IMAGES):
        for dominant, contextual in _visionzip_settings(patches):
            assert visionzip_margin(attention[image], keys[image], hidden[image], dominant, contextual) > MIN_MARGIN
        for budget, important in _vispruner_settings(patches):
            assert all(r <= (size + 1) // 2 for size, r in _vispruner_rounds(patches, budget, important))
            assert vispruner_margin(attention[image], hidden[image], budget, important) > MIN_MARGIN
        for budget in _divprune_budgets(patches):
            assert divprune_margin(hidden[image], budget) > MIN_MARGIN
    # the settings include several rounds and odd residual sizes
    assert max(len(_vispruner_rounds(patches, b, i)) for b, i in _vispruner_settings(patches)) >= 2
    assert any(size % 2 for b, i in _vispruner_settings(patches) for size, _ in _vispruner_rounds(patches, b, i))


@pytest.mark.parametrize(("seed", "patches"), RANDOM_CASES)
def test_visionzip_random_engine(seed, patches):
    from hybrid_vlm.methods.visionzip import visionzip_select

    attention, keys, hidden = _random_inputs(seed, patches)
    for dominant, contextual in _visionzip_settings(patches):
        selection = visionzip_select(_tensor(attention), _tensor(keys), _tensor(hidden), dominant, contextual)
        assert tuple(selection.kept.shape) == (IMAGES, dominant + contextual)
        for image in range(IMAGES):
            kept, tokens = visionzip_reference(attention[image], keys[image], hidden[image], dominant, contextual)
            assert selection.kept[image].tolist() == kept.tolist(), (dominant, contextual, image)
            torch.testing.assert_close(selection.features[image].double(), torch.from_numpy(tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("seed", "patches"), RANDOM_CASES)
def test_vispruner_random_engine(seed, patches):
    from hybrid_vlm.methods.vispruner import vispruner_select

    attention, _, features = _random_inputs(seed, patches)
    for budget, important in _vispruner_settings(patches):
        selection = vispruner_select(_tensor(attention), _tensor(features), budget, important)
        assert tuple(selection.kept.shape) == (IMAGES, budget)
        for image in range(IMAGES):
            kept = vispruner_reference(attention[image], features[image], budget, important)
            assert selection.kept[image].tolist() == kept.tolist(), (budget, important, image)


@pytest.mark.parametrize(("seed", "patches"), RANDOM_CASES)
def test_divprune_random_engine(seed, patches):
    from hybrid_vlm.methods.divprune import divprune_select

    _, _, features = _random_inputs(seed, patches)
    for budget in _divprune_budgets(patches):
        selection = divprune_select(_tensor(features), budget)
        assert tuple(selection.kept.shape) == (IMAGES, budget)
        for image in range(IMAGES):
            assert selection.kept[image].tolist() == divprune_reference(features[image], budget).tolist(), (budget, image)
