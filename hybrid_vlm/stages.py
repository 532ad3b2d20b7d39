"""Reduction stages inside the LLM: what each prunes, how it scores, and the pruning step itself.

A stage is a `PrunePlan` at one decoder layer; the decoder loop (`model.HybridDecoder`) runs
them in order. Methods differ only in the score a stage hands to `prune`:

- "previous_row" (fastv): the last prompt token's attention row of the layer before the stage;
- "own_row" (pdrop): the same row computed with the stage layer's own q and k on its input,
  before the drop (`hf_compat.layer_attention_row`);
- "dart": DART's pivots and picks from the previous layer's rotated keys and normed outputs;
- "raters" (sparsevlm): the previous layer's attention rows of the text raters, averaged; the stage
  also recycles `recycle` merged tokens from what it prunes (`prune`);
- "slots" (random): scores the adapter supplied per slot.

Every stage keeps all text and the top `keep` visual slots, through the same gather, at original
position ids (logical) or at consecutive ones per stage (renumbered). A sparsevlm stage keeps the
top `keep - recycle` and puts its `recycle` clusters in the slots of their centers, right after
them (`keep_and_recycle`), so the same gather, positions and cache groups serve it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import HybridConfig, visual_keep_count, visual_keep_count_protecting
from .fastv import gather_tokens, select_kept_positions, surviving_positions, true_positions, visual_keep_counts
from .hf_compat import layer_attention_row
from .methods import Read, get_method, pdrop, sparsevlm
from .methods.dart import IMAGE_PIVOTS, dart_keep_mask, image_quotas, kept_count, key_l1_norms, quotas_for
from .placement import PlacedPrompt
from .runtime import host_to_device, require

SCORE_KINDS = ("previous_row", "own_row", "dart", "raters", "slots")


@dataclass
class PrunePlan:
    """One stage: keep `keep` visual slots per sample (of them only `keep_per_sample` real ones
    where samples differ), ranked by a score of kind `score`. A later stage of a multi-stage
    method has `visual_positions` and `query_index` None until the stage before it has run."""

    keep: int
    visual_positions: torch.Tensor | None  # [B, V] in the sequence entering the stage
    query_index: torch.Tensor | None  # [B] index in that sequence of the scoring query
    keep_per_sample: torch.Tensor | None  # [B], or None when every visual slot is real
    slot_scores: torch.Tensor | None  # [B, L0] scores that replace attention (random selection)
    protected: torch.Tensor | None = None  # [B, L0] slots kept whatever their score
    uniform: bool = True  # every sample keeps `keep` real tokens (known in Python)
    score: str = "previous_row"  # one of SCORE_KINDS
    dart_quotas: tuple[int, ...] = ()
    dart_pivots: str = "sorted"
    dart_sample_quotas: torch.Tensor | None = None  # [B, 8] each sample's picks per pivot, where they differ
    recycle: int = 0  # of the `keep` visual slots, this many are clusters of pruned tokens (sparsevlm)

    @property
    def reads_previous_layer(self) -> bool:
        """The layer before this stage must hand over its attention row(s) or its keys."""
        return self.score in ("previous_row", "dart", "raters")


def visual_quotas(config: HybridConfig, placed: PlacedPrompt) -> tuple[int, bool, bool]:
    """(keep: visual slots kept per sample, static; uniform: every sample keeps `keep` real tokens;
    prunes: some sample loses a token), from host counts where Python has them, else a bound.

    Protected slots (LLaVA-NeXT's newlines with FASTV_NEWLINES=keep) are not counted: a sample keeps
    its quota of the other visual tokens plus all of its protected ones."""
    num_visual = placed.visual_positions.shape[1]
    protected = placed.protected_counts or [0] * placed.visual_positions.shape[0]
    if placed.visual_counts is None:  # DyMU batch: a bound, per-sample quotas on the device
        keep = min(num_visual, visual_keep_count(num_visual, config.fastv_k) + max(protected))
        # The bound may reach the width while a sample still loses tokens; a sample's loss grows
        # with its unprotected count, which is at most num_visual - min(protected).
        most_unprotected = num_visual - min(protected)
        return keep, False, visual_keep_count(most_unprotected, config.fastv_k) < most_unprotected
    quotas = [visual_keep_count_protecting(v, p, config.fastv_k) for v, p in zip(placed.visual_counts, protected)]
    return max(quotas), len(set(quotas)) == 1, any(q < v for q, v in zip(quotas, placed.visual_counts))


def scoring_query(placed: PlacedPrompt, fastv_query_index) -> torch.Tensor:
    """[B] index of the scoring query in the placed sequence: each sample's last real token, or
    the prompt position the caller named."""
    valid, entered = placed.new_valid, placed.entered_positions
    if fastv_query_index is None:
        steps = torch.arange(valid.shape[1], device=valid.device)
        return (valid.long() * steps).amax(dim=1)
    query_index = torch.as_tensor(fastv_query_index, device=valid.device).long().expand(valid.shape[0])
    if entered is not None:  # a prompt position -> its index in the placed sequence
        query_index = (entered == query_index[:, None]).long().argmax(dim=1)
    return query_index


def check_query_is_text(placed: PlacedPrompt, query_index: torch.Tensor) -> None:
    """The scoring query is the prompt's last token, whose row also predicts the first new token: a
    stage could prune it if it were visual (a raw prompt ending with its image), and generate would
    then predict from another token's row. No host read on CUDA (a device assert)."""
    prunable = placed.new_valid.gather(1, placed.visual_positions)
    if placed.protected is not None:  # LLaVA-NeXT's newlines under FASTV_NEWLINES=keep are never pruned
        prunable = prunable & ~placed.protected.gather(1, placed.visual_positions)
    on_visual = ((placed.visual_positions == query_index[:, None]) & prunable).any()
    require(~on_visual, lambda: "the prompt ends with an image token, but pruning inside the LLM scores with the last "
                                "prompt token and must keep it: put text after the image (chat templates do)")


def stage_plans(config: HybridConfig, placed: PlacedPrompt | None, fastv_query_index, num_layers: int) -> dict[int, PrunePlan]:
    """{layer: the stage that prunes before it runs}, empty when nothing is pruned in this forward."""
    method = config.llm_method
    if placed is None or method is None:
        return {}
    query_index = scoring_query(placed, fastv_query_index)
    if config.staged_method is not None:
        check_query_is_text(placed, query_index)
        return whole_image_stages(config, placed, query_index, num_layers)
    keep, uniform, prunes = visual_quotas(config, placed)
    if not prunes:
        return {}
    check_query_is_text(placed, query_index)
    valid = placed.new_valid
    keep_per_sample = None
    if not uniform or placed.entered_positions is not None:
        real_visual = valid.gather(1, placed.visual_positions)
        protected = torch.zeros_like(real_visual) if placed.protected is None else placed.protected.gather(1, placed.visual_positions) & real_visual
        protected_count = protected.sum(dim=1)
        keep_per_sample = visual_keep_counts(real_visual.sum(dim=1) - protected_count, config.fastv_k) + protected_count
    reads_row = Read.LLM_ATTENTION_ROW in get_method(method).reads
    if not reads_row and placed.slot_scores is None:
        raise RuntimeError(f"{method} scores slots the adapter did not supply")
    plan = PrunePlan(keep, placed.visual_positions, query_index, keep_per_sample,
                     placed.slot_scores, placed.protected, uniform, "previous_row" if reads_row else "slots")
    return {config.fastv_layer: plan}


def whole_image_stages(config: HybridConfig, placed: PlacedPrompt, query_index: torch.Tensor, num_layers: int) -> dict[int, PrunePlan]:
    """pdrop's stages or dart's one, each sample by its own visual count (Qwen2.5-VL's image sizes
    differ within a batch); sparsevlm's on prompts whose samples all hold the same count. A method
    registered inside the LLM without a plan here is refused by name, never run as another's."""
    if placed.visual_counts is None:
        raise NotImplementedError(f"VISUAL_METHOD={config.llm_method} needs each sample's visual token count on the host "
                                  "(not after DyMU merging)")
    check_stage_plan(config)
    return STAGE_PLANS[config.staged_method](config, placed, query_index, num_layers)


def check_stage_plan(config: HybridConfig) -> None:
    """Refuse, before any forward, a method registered inside the LLM that has no stage plan here."""
    if config.staged_method is not None and config.staged_method not in STAGE_PLANS:
        raise NotImplementedError(f"VISUAL_METHOD={config.staged_method} prunes inside the LLM, and the engine has no stage plan "
                                  f"for it: add one to hybrid_vlm.stages.STAGE_PLANS (it has {', '.join(STAGE_PLANS)})")


def sample_budgets(config: HybridConfig, placed: PlacedPrompt) -> tuple[list[int | float], list[list[int]]]:
    """(each sample's prompt budget, each sample's image token counts) for the methods that rank a
    prompt's images as one pool (`prompt_budget`)."""
    if placed.image_tokens is None and placed.images_per_sample != 1:
        raise NotImplementedError(f"VISUAL_METHOD={config.llm_method} with several images per prompt needs each image's token count on the host")
    image_tokens = placed.image_tokens or [[count] for count in placed.visual_counts]
    return [prompt_budget(config.visual_budget, tokens) for tokens in image_tokens], image_tokens


def dart_stage(config: HybridConfig, placed: PlacedPrompt, query_index: torch.Tensor, num_layers: int) -> dict[int, PrunePlan]:
    counts, device = placed.visual_counts, query_index.device
    budgets, _ = sample_budgets(config, placed)
    quotas = [image_quotas(budget, config.dart_quota, count) for budget, count in zip(budgets, counts)]  # per sample
    for sample in quotas:
        check_dart_quotas(config, sample)
    largest = tuple(map(max, zip(*quotas)))
    keeps = [min(kept_count(sample), count) for sample, count in zip(quotas, counts)]  # a sample holding fewer keeps them all
    plan = PrunePlan(max(keeps), placed.visual_positions, query_index, per_sample(keeps, device), None, uniform=len(set(keeps)) == 1,
                     score="dart", dart_quotas=largest, dart_pivots=config.dart_pivots, dart_sample_quotas=per_sample(quotas, device))
    return {config.fastv_layer: plan}


def pdrop_stages(config: HybridConfig, placed: PlacedPrompt, query_index: torch.Tensor, num_layers: int) -> dict[int, PrunePlan]:
    budgets, image_tokens = sample_budgets(config, placed)
    schedules = [pdrop_schedule_capped(budget, count, num_layers, budget_text(config.visual_budget, tokens))
                 for budget, count, tokens in zip(budgets, placed.visual_counts, image_tokens)]
    plans = {}
    for index, layer in enumerate(pdrop.stage_layers(num_layers)):
        keeps = [schedule[layer] for schedule in schedules]
        first = index == 0
        plans[layer] = PrunePlan(max(keeps), placed.visual_positions if first else None, query_index if first else None,
                                 per_sample(keeps, query_index.device), None, uniform=len(set(keeps)) == 1, score="own_row")
    return plans


def prompt_budget(budget: int | float, image_tokens: list[int]) -> int | float:
    """A prompt's VISUAL_BUDGET for pdrop and dart, which rank all its images' tokens together: a count
    is per image, as for the methods before the LLM, each image capped at the tokens it holds, so the
    prompt spends what they would (n times the count where every image holds more; where none does,
    n times the count too, which keeps them all, as a count above one image's tokens does, up to
    DART's rounding of its picks to the 8 pivots); a fraction is of the prompt's tokens, which is the
    same share of each image's."""
    if isinstance(budget, float):
        return budget
    if all(tokens <= budget for tokens in image_tokens):
        return budget * len(image_tokens)
    return sum(min(budget, tokens) for tokens in image_tokens)


def budget_text(budget: int | float, image_tokens: list[int]) -> str | None:
    """VISUAL_BUDGET as the user gave it, for a refusal about a prompt of several images (else None)."""
    if len(image_tokens) == 1 or isinstance(budget, float):
        return None
    return f"{budget} per image ({prompt_budget(budget, image_tokens)} for this prompt's images of {image_tokens} tokens)"


def per_sample(keeps: list, device) -> torch.Tensor | None:
    """Per-sample quotas ([B], or [B, 8] for dart's per pivot) on the device where they differ, else None."""
    return None if len(set(keeps)) == 1 else host_to_device(torch.tensor(keeps), device)


def pdrop_schedule_capped(budget: int | float, num_visual: int, num_layers: int, given: str | None = None) -> dict[int, int]:
    """PyramidDrop's schedule for one sample; a count at or above its visual count keeps them all.
    given: the setting as the user wrote it, for a refusal (see `budget_text`)."""
    if isinstance(budget, int) and budget >= num_visual:
        return dict.fromkeys(pdrop.stage_layers(num_layers), num_visual)
    return pdrop.schedule(budget, num_visual, num_layers, given)


def sparsevlm_stages(config: HybridConfig, placed: PlacedPrompt, query_index: torch.Tensor, num_layers: int) -> dict[int, PrunePlan]:
    counts = placed.visual_counts
    if placed.images_per_sample != 1:
        raise NotImplementedError(f"VISUAL_METHOD=sparsevlm takes one image per prompt, as the official code does, not {placed.images_per_sample}: "
                                  "its recycled clusters go right after the kept visual tokens, which for several images would put "
                                  "later images' tokens before the text between them")
    if len(set(counts)) != 1 or placed.entered_positions is not None:
        raise NotImplementedError("VISUAL_METHOD=sparsevlm needs every sample to hold the same number of visual tokens "
                                  "(its recycled clusters are sized by the count); LLaVA-1.5 without DyMU does")
    layers = sparsevlm.stage_layers(num_layers)
    stage_counts = sparsevlm.stage_counts(config.visual_budget, counts[0])
    return {
        layer: PrunePlan(kept + clusters, placed.visual_positions if index == 0 else None, query_index if index == 0 else None,
                         None, None, score="raters", recycle=clusters)
        for index, (layer, (kept, clusters)) in enumerate(zip(layers, stage_counts))
    }


def check_whole_image_budget(config: HybridConfig, num_visual: int, num_layers: int) -> None:
    """Refuse a pdrop or dart budget its rule cannot reach, before any forward."""
    if config.llm_method == "pdrop":
        pdrop.schedule(config.visual_budget, num_visual, num_layers)  # raises naming the reachable range
    elif config.llm_method == "sparsevlm":
        sparsevlm.stage_layers(num_layers)  # each raises naming what is accepted
        sparsevlm.stage_counts(config.visual_budget, num_visual)
    elif config.llm_method == "dart":
        quotas = image_quotas(config.visual_budget, config.dart_quota, num_visual)
        check_dart_quotas(config, quotas)
        if kept_count(quotas) > num_visual:
            largest = next(b for b in range(num_visual, 3, -1) if kept_count(image_quotas(b, config.dart_quota, num_visual)) <= num_visual)
            raise ValueError(f"VISUAL_BUDGET={config.visual_budget} is not reachable by dart (DART_QUOTA={config.dart_quota}): "
                             f"it keeps {kept_count(quotas)} of {num_visual} visual tokens; use 4..{largest}")
        if config.fastv_layer >= num_layers:
            raise ValueError(f"FASTV_LAYER={config.fastv_layer} is not valid for dart: use 1..{num_layers - 1}")


def check_per_image_budget(config: HybridConfig, num_layers: int) -> None:
    """What can be refused before any forward where each image has its own count (Qwen2.5-VL): a
    pdrop fraction no image reaches, dart quotas below its pivots (FASTV_LAYER is checked by
    `apply_hybrid`). A pdrop count below one image's floor is refused at that image's forward."""
    if config.llm_method == "pdrop" and isinstance(config.visual_budget, float):
        pdrop.check_fraction(config.visual_budget, num_layers)
    elif config.llm_method == "pdrop":
        pdrop.stage_layers(num_layers)  # raises on an LLM too shallow for its stages
    elif config.llm_method == "dart" and not isinstance(config.visual_budget, float):
        check_dart_quotas(config, quotas_for(config.visual_budget, config.dart_quota))


def check_dart_quotas(config: HybridConfig, quotas: tuple[int, ...]) -> None:
    if min(quotas) < 0:
        raise ValueError(f"VISUAL_BUDGET={config.visual_budget} is not reachable by dart (DART_QUOTA={config.dart_quota}): "
                         f"it needs at least its {IMAGE_PIVOTS} image pivots")


@dataclass
class StageInputs:
    """What the sequence entering a stage looks like, tracked through the stages."""

    is_visual: torch.Tensor  # [B, L] bool: visual slots of the current sequence
    query_index: torch.Tensor  # [B] the scoring query's index in it
    visual_count: int  # visual slots per sample in it (static)
    is_rater: torch.Tensor | None = None  # [B, L] bool: sparsevlm's text raters in it


def text_after_image(valid: torch.Tensor, is_visual: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the prompt's text after the image up to the scoring query, never a generated token."""
    steps = torch.arange(valid.shape[1], device=valid.device)
    last_visual = (is_visual.long() * steps).amax(dim=1)
    return valid & ~is_visual & (steps[None, :] > last_visual[:, None]) & (steps[None, :] <= query_index[:, None])


def first_inputs(plan: PrunePlan, placed: PlacedPrompt) -> StageInputs:
    """The sequence the first stage sees; for sparsevlm also its raters, from the layer-0 embeddings."""
    is_visual = torch.zeros_like(placed.new_valid).scatter(1, placed.visual_positions, True)
    num_visual = placed.visual_positions.shape[1]
    is_rater = None
    if plan.score == "raters":
        is_text = text_after_image(placed.new_valid, is_visual, plan.query_index)
        non_visual = true_positions(~is_visual, is_visual.shape[1] - num_visual)
        is_rater = sparsevlm.rater_mask(placed.inputs_embeds, placed.visual_positions, non_visual, is_text)
    return StageInputs(is_visual, plan.query_index, num_visual, is_rater)


def rater_rows(inputs: StageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [B, R], weights [B, R]) the layer before a sparsevlm stage reads: every non-visual slot
    (a static superset of the raters), each rater weighted 1 / raters, the rest 0."""
    rows = true_positions(~inputs.is_visual, inputs.is_visual.shape[1] - inputs.visual_count)
    raters = inputs.is_rater.gather(1, rows).float()
    return rows, raters / raters.sum(dim=1, keepdim=True).clamp_min(1)


def stage_at(plan: PrunePlan, inputs: StageInputs) -> PrunePlan:
    """A later stage's visual slots and query in the sequence the earlier stages left."""
    if plan.visual_positions is not None:
        return plan
    return replace(plan, visual_positions=true_positions(inputs.is_visual, inputs.visual_count), query_index=inputs.query_index)


def after_stage(inputs: StageInputs, plan: PrunePlan, kept_positions: torch.Tensor) -> StageInputs:
    query_index = (kept_positions == inputs.query_index[:, None]).long().argmax(dim=1)  # text always survives
    is_rater = None if inputs.is_rater is None else gather_tokens(inputs.is_rater, kept_positions)
    return StageInputs(gather_tokens(inputs.is_visual, kept_positions), query_index, plan.keep, is_rater)


def dart_scores(plan: PrunePlan, previous_keys: torch.Tensor, previous_normed: torch.Tensor, valid: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
    """[B, L] 1.0 on the visual slots DART keeps, 0.0 elsewhere (prune keeps the top `keep`)."""
    is_text = text_after_image(valid, is_visual, plan.query_index)
    first_real = valid.long().argmax(dim=1)
    kept = dart_keep_mask(key_l1_norms(previous_keys), previous_normed, is_visual & valid, is_text,
                          plan.dart_quotas, plan.dart_pivots, first_real, plan.dart_sample_quotas)
    return kept.float()


def stage_scores(plan: PrunePlan, layer, hidden_states, cos_sin, mask, previous, valid, is_visual, final_norm) -> torch.Tensor | None:
    """The score `prune` ranks by, for this stage's kind. `previous`: what the layer before
    handed over (its attention row, or its rotated keys for dart)."""
    if plan.score in ("previous_row", "raters"):
        return previous
    if plan.score == "own_row":
        return layer_attention_row(layer, hidden_states, cos_sin, mask, plan.query_index)
    if plan.score == "dart":
        return dart_scores(plan, previous, final_norm(hidden_states), valid, is_visual)
    return plan.slot_scores


@dataclass
class Pruned:
    """The sequence after one stage."""

    hidden_states: torch.Tensor  # [B, L_kept, hidden]
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    kept_positions: torch.Tensor  # [B, L_kept] indices into the sequence entering the stage
    key_valid: torch.Tensor  # [B, L_kept] kept slots that are real tokens
    next_position: torch.Tensor | None  # [B] only when positions were renumbered


def renumber(valid: torch.Tensor) -> torch.Tensor:
    """Consecutive positions over the real tokens (the renumbered position mode)."""
    return (valid.long().cumsum(dim=1) - 1).clamp_min(0)


def prune(plan: PrunePlan, scores, hidden_states, cos_sin, new_valid, position_mode: str, rotary_emb) -> Pruned:
    """Keep every text token and the top `plan.keep` visual slots, at their position ids."""
    if plan.protected is not None:
        scores = scores.masked_fill(plan.protected, 2.0)  # above every probability: kept first
    scores = scores.masked_fill(~new_valid, -1.0)  # empty slots rank after every real token
    if plan.recycle:
        kept_positions, hidden_states = keep_and_recycle(plan, scores, hidden_states)
        kept_real = None
    else:
        kept_positions, kept_real = select_kept_positions(scores, plan.visual_positions, plan.keep, plan.keep_per_sample)
        hidden_states = gather_tokens(hidden_states, kept_positions)
    key_valid = gather_tokens(new_valid, kept_positions)
    if kept_real is not None:
        key_valid = key_valid & kept_real
    if position_mode == "renumbered":
        kept_position_ids = renumber(key_valid)
        return Pruned(hidden_states, rotary_emb(hidden_states, kept_position_ids), kept_positions, key_valid, kept_position_ids[:, -1] + 1)
    cos, sin = (gather_tokens(t, kept_positions) for t in cos_sin)
    return Pruned(hidden_states, (cos, sin), kept_positions, key_valid, None)


def keep_and_recycle(plan: PrunePlan, scores: torch.Tensor, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsevlm's step: (kept positions [B, L - V + keep], their states). The top `keep - recycle`
    visual slots by score stay in order; right after them come `recycle` clusters of the best pruned
    slots (DPC-kNN on these states), each at its center's slot, so logical positions give it the
    center's id. One descending stable ranking decides both (a higher score, then a lower index)."""
    visual, kept_count, clusters = plan.visual_positions, plan.keep - plan.recycle, plan.recycle
    length = scores.shape[1]
    ranked = visual.gather(1, scores.gather(1, visual).sort(dim=1, descending=True, stable=True).indices)  # [B, V] best first
    candidate_count, _ = sparsevlm.recycled_counts(visual.shape[1] - kept_count)
    candidates = ranked[:, kept_count : kept_count + candidate_count]  # [B, m] best pruned first, as official
    candidate_states = gather_tokens(hidden_states, candidates)
    merged, centers = sparsevlm.dpc_knn_merge(candidate_states.to(sparsevlm.at_least_fp32(candidate_states.dtype)), clusters)
    kept = surviving_positions(visual, ranked[:, :kept_count], length)
    at = visual[:, :1] + kept_count  # [B, 1] where the clusters go: after the kept visual block
    slots = torch.arange(kept.shape[1] + clusters, device=scores.device)[None, :]
    offset = slots - at
    from_kept = kept.gather(1, torch.where(offset < 0, slots, slots - clusters).clamp_min(0))
    from_centers = candidates.gather(1, centers).gather(1, offset.clamp(0, clusters - 1))
    positions = torch.where((offset >= 0) & (offset < clusters), from_centers, from_kept)
    states = gather_tokens(hidden_states, positions)
    cluster_slots = (at + torch.arange(clusters, device=scores.device)[None, :])[..., None].expand(-1, -1, states.shape[-1])
    return positions, states.scatter(1, cluster_slots, merged.to(states.dtype))


# VISUAL_METHOD -> its plans {layer: PrunePlan} for one prompt batch, for the methods registered inside the LLM
STAGE_PLANS = {"pdrop": pdrop_stages, "dart": dart_stage, "sparsevlm": sparsevlm_stages}
