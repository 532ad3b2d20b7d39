"""Theoretical multiply-accumulates (MACs) of LLaVA-1.5 with and without visual-token reduction.

Pure arithmetic: ints and floats in, ints or floats out; no torch, no model. One MAC = one
multiply-add = 2 FLOPs (multiply by 2 to compare with FLOP counters such as
`torch.utils.flop_counter.FlopCounterMode`, which reports FLOPs).

Conventions. The per-layer cost is FastV's (Chen et al., "An Image is Worth 1/2 Tokens After
Layer 2", ECCV 2024: 4nd^2 + 2n^2 d + 2ndm per layer, for dense attention and a
two-matrix MLP), here in MACs for Llama's gated MLP (3ndm) and causal attention (~n^2 d); the
model is LLaVA-1.5 as Liu et al. describe it ("Improved Baselines with Visual Instruction
Tuning", CVPR 2024): CLIP ViT-L/14-336 read at its penultimate layer, an mlp2x_gelu projector,
a Vicuna/Llama decoder. So a Llama layer costs ~ 4nd^2 + 3ndm + n^2 d MACs:

- Only matrix products count: Q/K/V/O and MLP projections, attention scores (Q K^T) and the
  weighted sum (P V), the CLIP patch-embedding convolution, the projector, the lm_head. Norms,
  RoPE, softmax, activations, residual adds, embeddings lookups and gathers count zero.
- Llama layer, n new tokens over c cached keys, hidden d, MLP width m, query width d_q = heads x
  head_dim, key/value width d_kv = kv_heads x head_dim (GQA; d_q = d_kv = d for MHA):
      q, o: 2 n d d_q      k, v: 2 n d d_kv      gated MLP (gate, up, down): 3 n d m
      attention: 2 d_q x (query-key pairs)   (Q K^T and P V, d_q MACs per pair each)
  With attention="causal" (the default, the theoretical count) the pairs are the causal triangle:
  n c + n (n + 1) / 2, so a prefill costs ~ n^2 d_q (the n^2 d term above), and
  prefill(n) + decode(one token over n cached) == prefill(n + 1) exactly.
  With attention="dense" the pairs are n (c + n): what a masked SDPA kernel actually multiplies
  (it does not skip the masked half) and what FlopCounterMode counts for SDPA's math path.
- CLIP ViT layer (bidirectional, no mask, non-gated MLP), n tokens (576 patches + CLS):
      q, k, v, o: 4 n D^2      MLP: 2 n D M      attention: 2 n^2 D   (all n^2 pairs are needed)
  plus the patch embedding (a 14 x 14 x 3 -> D convolution per patch). Stock LLaVA runs all 24
  CLIP layers although it reads hidden_states[-2]: `vit_macs` counts every layer that runs.
  DyMU merges inside a layer after attention and before the MLP: the layer's attention and Q/K/V/O
  run at its input count, its MLP at its output count. DyMU's matching (a (n/2)^2 x head_dim
  similarity per layer) is not counted. These are the compacted counts the official batch-1 loop
  runs at: an ideal for the engine, whose static-shape tower runs every layer at all 577 slots
  (merged ones masked) so that a batch needs no host read, and projects all 576 (the bench's tables
  mark DyMU rows' prefill theory with * and say so below them).
- Projector (LLaVA-1.5 mlp2x_gelu): n_visual (D d + d^2); with DyMU on LLaVA-1.5 n_visual is the
  merged count (the ideal again), on LLaVA-NeXT every crop's 576 patches.
- LLaVA-NeXT (`next_method_prefill_macs`, from each image's `AnyresImage`): every crop (the base
  image and the anyres grid) through the tower and, unless a method selects in CLIP space first, the
  projector, whatever unpadding leaves of the crop; the packed span (patches + newlines) enters the
  LLM. A method before the LLM reads per crop ([CLS] row: `methods.read_macs`) and scores per
  selection (`Method.scoring_macs` over the selection's candidates).
- lm_head: on the last prompt token only, as generate() does (logits_to_keep=1), per sample.
- FastV: layers < fastv_layer run at all n prompt tokens, layers >= fastv_layer at the kept n'.
  The "row" scorer adds one attention row at layer fastv_layer - 1 (n d_q MACs; Q K^T only);
  "eager" scoring materialises the whole matrix, which is the dense count (no extra term). Under the
  default causal count that leaves eager's masked half of layer fastv_layer - 1 uncharged (about
  n^2 d / 2, 1.6 GMACs at 7B shapes), so in the --scoring ablation eager's theory is the lower
  one; with attention="dense" the two are exact.
- Staged methods (pdrop, sparsevlm, dart) charge their scoring too, including terms that are not
  matrix products and that torch's FLOP counter does not see: dart's key L1 norms (additions) and
  pivot cosines, sparsevlm's DPC-kNN distances (cdist).
- Decode: one new token per sample per step; each layer attends to its own cache plus the new
  token (layers >= fastv_layer hold only the kept tokens).
- Batches: every count is per sample; multiply by the batch size (padding is not modelled).

    python -m hybrid_vlm.flops              # prints the LLaVA-1.5-7B check against the facts file
    python -m hybrid_vlm.flops --methods    # every registered method at 192 / 128 / 64 tokens (README table)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ATTENTION_CONVENTIONS = ("causal", "dense")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int | None = None  # default hidden // heads
    vocab: int = 32064

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def d_q(self) -> int:
        return self.heads * self.dim_head

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.dim_head


@dataclass(frozen=True)
class VitShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int = 336
    patch_size: int = 14
    channels: int = 3

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:  # patches + CLS
        return self.patches + 1


@dataclass(frozen=True)
class LlavaShape:
    llm: LlamaShape
    vit: VitShape
    vision_feature_layer: int = -2  # which CLIP hidden state LLaVA reads (informational)

    @property
    def visual_tokens(self) -> int:  # "default" feature selection drops the CLS token
        return self.vit.patches

    @property
    def vit_layers_read(self) -> int:
        """CLIP layers up to the one LLaVA reads (23 of 24 for LLaVA-1.5; DyMU's loop runs only these)."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vit.layers + 1 + layer


LLAVA_15_7B = LlavaShape(
    llm=LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32064),
    vit=VitShape(hidden=1024, intermediate=4096, layers=24, heads=16, image_size=336, patch_size=14),
)


def shape_from_config(config) -> LlavaShape:
    """LlavaShape of a transformers LlavaConfig (or anything with the same attributes)."""
    text, vision = config.text_config, config.vision_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None)
    return LlavaShape(
        llm=LlamaShape(
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            layers=text.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=None if head_dim in (None, text.hidden_size // heads) else head_dim,
            vocab=text.vocab_size,
        ),
        vit=VitShape(
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            layers=vision.num_hidden_layers,
            heads=vision.num_attention_heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            channels=getattr(vision, "num_channels", 3),
        ),
        vision_feature_layer=getattr(config, "vision_feature_layer", -2),
    )


# ----------------------------------------------------------------------------------------- LLM


def attention_pairs(n: int, cached: int = 0, attention: str = "causal") -> int:
    """Query-key pairs of n new queries over `cached` earlier keys plus themselves."""
    if attention == "causal":
        return n * cached + n * (n + 1) // 2
    if attention == "dense":
        return n * (cached + n)
    raise ValueError(f"attention={attention!r}: use one of {ATTENTION_CONVENTIONS}")


def llama_linear_macs(n: int, shape: LlamaShape) -> int:
    """Q/K/V/O + gated MLP of one Llama layer for n tokens (no attention term)."""
    d = shape.hidden
    return n * (2 * d * shape.d_q + 2 * d * shape.d_kv + 3 * d * shape.intermediate)


def llama_layer_macs(n: int, shape: LlamaShape, cached: int = 0, attention: str = "causal") -> int:
    """One Llama decoder layer on n new tokens with `cached` keys already in its cache.

    For MHA and attention="causal" with no cache: 4 n d^2 + 3 n d m + n (n + 1) d.
    """
    return llama_linear_macs(n, shape) + 2 * shape.d_q * attention_pairs(n, cached, attention)


def lm_head_macs(shape: LlamaShape, tokens: int = 1) -> int:
    return tokens * shape.hidden * shape.vocab


def llm_prefill_macs(
    shape: LlamaShape,
    tokens: int,
    kept: int | None = None,
    fastv_layer: int = 2,
    attention: str = "causal",
    scoring: str | None = "row",
    lm_head_tokens: int = 1,
) -> int:
    """Prefill of the LLM for one sample with `tokens` prompt tokens (text + visual entering it).

    kept: tokens that layers >= fastv_layer see (None or == tokens: no FastV pruning).
    scoring: "row" adds FastV's one attention row at layer fastv_layer - 1 when pruning; "eager"
        or None add nothing (see the module docstring).
    lm_head_tokens: 1 = generate()'s logits_to_keep=1; 0 to leave the head out.
    """
    prunes = kept is not None and kept < tokens
    if not prunes:
        total = shape.layers * llama_layer_macs(tokens, shape, attention=attention)
    else:
        if not 1 <= fastv_layer < shape.layers:
            raise ValueError(f"fastv_layer={fastv_layer} outside 1..{shape.layers - 1}")
        total = fastv_layer * llama_layer_macs(tokens, shape, attention=attention)
        total += (shape.layers - fastv_layer) * llama_layer_macs(kept, shape, attention=attention)
        if scoring == "row":
            total += tokens * shape.d_q
    return total + lm_head_macs(shape, lm_head_tokens)


def llm_decode_macs(
    shape: LlamaShape,
    cache_tokens: int,
    cache_tokens_kept: int | None = None,
    fastv_layer: int = 2,
    attention: str = "causal",
    lm_head: bool = True,
) -> int:
    """One decode step (one new token per sample) over per-layer caches.

    Layers < fastv_layer hold `cache_tokens` keys, layers >= fastv_layer `cache_tokens_kept`
    (default: the same). Attention pairs are cache + 1 in both conventions.
    """
    kept = cache_tokens if cache_tokens_kept is None else cache_tokens_kept
    split = fastv_layer if kept != cache_tokens else shape.layers
    total = split * llama_layer_macs(1, shape, cached=cache_tokens, attention=attention)
    total += (shape.layers - split) * llama_layer_macs(1, shape, cached=kept, attention=attention)
    return total + (lm_head_macs(shape, 1) if lm_head else 0)


def llm_decode_macs_mean(
    shape: LlamaShape,
    prompt_tokens: int,
    prompt_tokens_kept: int | None = None,
    steps: int = 1,
    fastv_layer: int = 2,
    attention: str = "causal",
) -> float:
    """Mean MACs per decode step over `steps` steps after a prefill (caches grow by one each step)."""
    kept = prompt_tokens if prompt_tokens_kept is None else prompt_tokens_kept
    total = sum(
        llm_decode_macs(shape, prompt_tokens + t, kept + t, fastv_layer=fastv_layer, attention=attention)
        for t in range(steps)
    )
    return total / steps


def kv_cache_bytes(
    shape: LlamaShape,
    cache_tokens: int,
    cache_tokens_kept: int | None = None,
    fastv_layer: int = 2,
    bytes_per_element: int = 2,
    batch: int = 1,
) -> int:
    """Size of the K and V caches: layers < fastv_layer hold cache_tokens, the rest the kept count."""
    kept = cache_tokens if cache_tokens_kept is None else cache_tokens_kept
    split = fastv_layer if kept != cache_tokens else shape.layers
    tokens = split * cache_tokens + (shape.layers - split) * kept
    return 2 * tokens * shape.d_kv * bytes_per_element * batch


# ------------------------------------------------------------------------------------ vision


def vit_layer_macs(n_in: int, shape: VitShape, n_out: int | None = None) -> int:
    """One CLIP encoder layer: attention at n_in tokens, MLP at n_out (DyMU merges in between)."""
    n_out = n_in if n_out is None else n_out
    d = shape.hidden
    return 4 * n_in * d * d + 2 * n_in * n_in * d + 2 * n_out * d * shape.intermediate


def patch_embed_macs(shape: VitShape) -> int:
    return shape.patches * shape.channels * shape.patch_size**2 * shape.hidden


def vit_macs(
    shape: VitShape,
    counts: Sequence[int] | None = None,
    layers_run: int | None = None,
    patch_embed: bool = True,
) -> int:
    """The CLIP tower for one image.

    counts: tokens (CLS included) leaving each layer, as DyMU reports them; None = no merging.
    layers_run: encoder layers that run (default all: stock LLaVA runs the last one too, unused).
    """
    layers_run = shape.layers if layers_run is None else layers_run
    if counts is not None and len(counts) < layers_run:
        raise ValueError(f"{len(counts)} per-layer counts for {layers_run} layers")
    total = patch_embed_macs(shape) if patch_embed else 0
    n = shape.tokens
    for layer in range(layers_run):
        n_out = n if counts is None else int(counts[layer])
        total += vit_layer_macs(n, shape, n_out)
        n = n_out
    return total


def projector_macs(visual_tokens: int, vision_hidden: int, text_hidden: int) -> int:
    return visual_tokens * (vision_hidden * text_hidden + text_hidden * text_hidden)


# ------------------------------------------------------------------------------- whole model


@dataclass(frozen=True)
class PrefillMacs:
    """Per-sample prefill MACs by stage (one image per sample)."""

    vision: int  # CLIP tower incl. patch embedding
    projector: int
    llm: int  # decoder layers (+ FastV scoring row)
    lm_head: int
    selection: int = 0  # a method's own scoring before the LLM (CLS row, similarities, greedy), which no paper counts

    @property
    def vision_total(self) -> int:  # what runs before the LLM
        return self.vision + self.projector + self.selection

    @property
    def llm_total(self) -> int:
        return self.llm + self.lm_head

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.selection + self.llm + self.lm_head

    def as_dict(self) -> dict[str, int]:
        return dict(vision=self.vision, projector=self.projector, selection=self.selection, llm=self.llm, lm_head=self.lm_head, total=self.total)


@dataclass(frozen=True)
class AnyresImage:
    """One LLaVA-NeXT image as its MACs depend on it (`adapters.anyres_images` reads it off the
    processor's image size): the patch tokens unpadding leaves in each crop the tower sees (the base
    image first, whole; a crop may keep none), and its packed tokens (those patches plus a newline
    per grid row), which enter the LLM when no method acts before it."""

    crop_patches: tuple[int, ...]
    tokens: int

    @property
    def crops(self) -> int:
        return len(self.crop_patches)

    def selection_groups(self, per_crop: bool) -> list[int]:
        """Candidates of each selection a method before the LLM runs (`adapters.selection_groups`):
        all the patch tokens, or each crop's that has any."""
        return [patches for patches in self.crop_patches if patches] if per_crop else [sum(self.crop_patches)]


def prefill_macs(
    shape: LlavaShape,
    text_tokens: int,
    visual_tokens: int | None = None,
    visual_kept: int | None = None,
    fastv_layer: int = 2,
    vit_counts: Sequence[int] | Sequence[Sequence[int]] | None = None,
    attention: str = "causal",
    scoring: str | None = "row",
    lm_head_tokens: int = 1,
    vit_layers_run: int | None = None,
    crops: int = 1,
    projector_tokens: int | None = None,
    selection: int = 0,
) -> PrefillMacs:
    """Prefill of one sample, any method:

    - vanilla: visual_tokens=None (576), visual_kept=None
    - FastV:   visual_kept = kept visual tokens (layers >= fastv_layer see text + kept)
    - DyMU:    visual_tokens = merged count entering the LLM (all layers run at it), vit_counts =
               per-layer CLIP counts (None: the tower is counted unmerged), vit_layers_run =
               shape.vit_layers_read (DyMU's loop skips the last, unread layer)
    - hybrid:  both
    - LLaVA-NeXT: crops = images the tower sees (base + anyres crops), visual_tokens = the packed
               count (unpadded grid + newlines); the projector runs on every crop's patches, before
               packing; with DyMU vit_counts is one per-layer list per crop.
    vit_layers_run: CLIP layers that run (default all, as stock LLaVA does).
    projector_tokens: tokens the projector runs on, when not the visual tokens entering the LLM (a
               method that selects after the projector projects every patch).
    selection: the method's own scoring MACs (`methods.Method.scoring_macs`).
    """
    attention_check(attention)
    visual = shape.visual_tokens if visual_tokens is None else visual_tokens
    tokens = text_tokens + visual
    kept = None if visual_kept is None else text_tokens + visual_kept
    llm = llm_prefill_macs(
        shape.llm, tokens, kept, fastv_layer=fastv_layer, attention=attention, scoring=scoring, lm_head_tokens=0
    )
    per_crop = vit_counts if crops > 1 and vit_counts is not None else [vit_counts] * crops
    return PrefillMacs(
        vision=sum(vit_macs(shape.vit, counts, vit_layers_run) for counts in per_crop),
        projector=projector_macs(
            projector_tokens if projector_tokens is not None else visual if crops == 1 else crops * shape.vit.patches,
            shape.vit.hidden, shape.llm.hidden,
        ),
        llm=llm,
        lm_head=lm_head_macs(shape.llm, lm_head_tokens),
        selection=selection,
    )


def method_prefill_macs(
    shape: LlavaShape, config, text_tokens: int, lm_head_tokens: int = 1, attention: str = "causal",
    visual_entered: int | None = None, visual_kept: int | None = None, images: int = 1,
) -> PrefillMacs:
    """Prefill MACs of one LLaVA-1.5 sample under a HybridConfig whose visual counts are static: a
    method before the LLM (`config.visual_method`, rule A), FastV or random selection, pooling, or
    nothing. The method's scoring is counted (`selection`); DyMU's counts are data: use prefill_macs.
    visual_entered / visual_kept: the counts a run recorded (else the ones the config implies).
    images: the sample's images, each through the tower, the projector and a method before the LLM."""
    from .methods import VitDims, check_budget, get_method, read_macs

    if config.dymu is not None:
        raise ValueError("DyMU's token counts depend on the image: count it with prefill_macs and its per-layer counts")
    if config.staged_method is not None and visual_entered != 0:
        return staged_prefill_macs(shape, config, text_tokens, lm_head_tokens, attention, images)
    if visual_entered == 0:  # a text-only row: no tower, no projector, no selection
        llm = llm_prefill_macs(shape.llm, text_tokens, attention=attention, lm_head_tokens=0)
        return PrefillMacs(vision=0, projector=0, llm=llm, lm_head=lm_head_macs(shape.llm, lm_head_tokens))
    patches = shape.visual_tokens  # per image
    visual, projector, vit_layers, selection = patches * images, patches * images, None, 0
    if config.visual_method is not None:
        method = get_method(config.visual_method)
        per_image = check_budget(method, config.visual_budget, patches)
        dims = VitDims(patches, shape.vit.hidden, shape.vit.heads, shape.llm.hidden)
        selection = images * (read_macs(method, dims) + method.scoring_macs(per_image, dims))
        visual = per_image * images
        if not method.selects_projected:  # it selects before the projector, in its own CLIP loop, which skips the unread last layer
            projector, vit_layers = visual, shape.vit_layers_read
    elif config.visual_pool is not None:
        visual = (math.isqrt(patches) // config.visual_pool) ** 2 * images
    return prefill_after_selection(shape, config, text_tokens, RanBeforeLlm(visual, images, projector, vit_layers, selection),
                                   lm_head_tokens, attention, visual_entered, visual_kept)


def next_method_prefill_macs(
    shape: LlavaShape, config, images: Sequence[AnyresImage], text_tokens: int, lm_head_tokens: int = 1,
    attention: str = "causal", visual_entered: int | None = None, visual_kept: int | None = None,
) -> PrefillMacs:
    """Prefill MACs of one LLaVA-NeXT sample under a HybridConfig. Every crop runs through the tower
    (the layers up to the read one for a method that reads CLIP), then:

    - nothing cut, FastV or random selection: the projector on every crop's patches, the packed
      spans (newlines included) into the LLM;
    - a method before the LLM: its reads per crop, its scoring per selection (one per image over its
      patch tokens, or one per crop under VISUAL_BUDGET_SCOPE=crop), the projector on what it projects,
      the kept tokens into the LLM (no newline);
    - pdrop or dart: their stages over the packed spans (`staged_prefill_macs`).

    DyMU's counts are data: count it with prefill_macs and one per-layer list per crop.
    visual_entered / visual_kept: the counts a run recorded (else the ones the config implies)."""

    if config.dymu is not None:
        raise ValueError("DyMU's token counts depend on the image: count it with prefill_macs and its per-crop, per-layer counts")
    if not images or visual_entered == 0:  # a text-only row
        return method_prefill_macs(shape, config, text_tokens, lm_head_tokens, attention, visual_entered=0, visual_kept=0)
    if config.staged_method is not None:
        return staged_prefill_macs(shape, config, text_tokens, lm_head_tokens, attention, anyres=images)
    crops = sum(image.crops for image in images)
    visual, projector, vit_layers, selection = sum(image.tokens for image in images), crops * shape.vit.patches, None, 0
    if config.pre_llm_method is not None:
        visual, selection, selects_projected = next_selection_macs(shape, config, images)
        if not selects_projected:
            projector, vit_layers = visual, shape.vit_layers_read
    elif config.fastv_k is not None and config.fastv_newlines == "keep" and visual_kept is None:
        visual_kept = kept_with_newlines(config, images, visual if visual_entered is None else visual_entered)
    return prefill_after_selection(shape, config, text_tokens, RanBeforeLlm(visual, crops, projector, vit_layers, selection),
                                   lm_head_tokens, attention, visual_entered, visual_kept)


def kept_with_newlines(config, images: Sequence[AnyresImage], visual: int) -> int:
    """FASTV_NEWLINES=keep (`stages.visual_quotas`): the budget counts the patches, and every newline stays."""
    from .config import visual_keep_count_protecting

    newlines = sum(image.tokens - sum(image.crop_patches) for image in images)
    return visual_keep_count_protecting(visual, newlines, config.fastv_k)


@dataclass(frozen=True)
class RanBeforeLlm:
    """What a sample ran before the LLM, as the MACs model needs it."""

    visual: int  # visual tokens entering the LLM
    crops: int  # images the tower saw (LLaVA-NeXT: every crop)
    projector: int  # tokens the projector ran on
    vit_layers: int | None  # CLIP layers that ran (None: all)
    selection: int  # a method's reads and scoring


def prefill_after_selection(shape: LlavaShape, config, text_tokens: int, ran: RanBeforeLlm, lm_head_tokens: int, attention: str,
                            visual_entered: int | None, visual_kept: int | None) -> PrefillMacs:
    """The prefill of a sample from what ran before the LLM, FastV or random selection after it;
    the counts a run recorded take the place of the ones the config implies."""
    from .config import visual_keep_count

    visual = visual_entered if visual_entered is not None else ran.visual
    kept = visual_keep_count(visual, config.fastv_k) if config.fastv_k is not None else None
    kept = visual_kept if visual_kept is not None and kept is not None else kept
    return prefill_macs(
        shape, text_tokens, visual, kept, fastv_layer=config.fastv_layer, attention=attention,
        scoring=config.scoring if config.fastv_k is not None and config.fastv_select == "attention" else None,
        lm_head_tokens=lm_head_tokens, vit_layers_run=ran.vit_layers, crops=ran.crops, projector_tokens=ran.projector,
        selection=ran.selection,
    )


def next_selection_macs(shape: LlavaShape, config, images: Sequence[AnyresImage]) -> tuple[int, int, bool]:
    """(visual tokens the method keeps, MACs of its reads and selections, whether it selects
    projected features) of a method before the LLM over a LLaVA-NeXT sample's images."""
    from .methods import VitDims, get_method, group_count, read_macs

    method, per_crop = get_method(config.pre_llm_method), config.budget_scope == "crop"

    def dims(patches: int) -> VitDims:
        return VitDims(patches, shape.vit.hidden, shape.vit.heads, shape.llm.hidden)

    kept, macs = 0, 0
    for index, image in enumerate(images):
        macs += image.crops * read_macs(method, dims(shape.vit.patches))  # every crop's [CLS] row, padding included
        for available in image.selection_groups(per_crop):
            count = group_count(config.visual_budget, available, per_crop, method, index)
            macs += method.scoring_macs(count, dims(available))
            kept += count
    return kept, macs, method.selects_projected


def stage_visual_counts(shape: LlavaShape, config, images: int = 1, image_tokens: Sequence[int] | None = None) -> dict[int, int]:
    """{first layer: visual tokens from it on} of a pdrop, sparsevlm or dart run (layer 0: every
    visual token of the sample's images, which pdrop and dart rank as one pool: `stages.prompt_budget`).
    image_tokens: each image's tokens where they are not `images` x 576 (LLaVA-NeXT's packed spans)."""
    from .methods import sparsevlm
    from .methods.dart import image_quotas, kept_count
    from .stages import pdrop_schedule_capped, prompt_budget

    image_tokens = [shape.visual_tokens] * images if image_tokens is None else list(image_tokens)
    patches, layers, images = sum(image_tokens), shape.llm.layers, len(image_tokens)
    budget = prompt_budget(config.visual_budget, image_tokens)
    if config.llm_method == "pdrop":
        return {0: patches, **pdrop_schedule_capped(budget, patches, layers)}
    if config.llm_method == "sparsevlm":
        if images != 1:
            raise ValueError(f"VISUAL_METHOD=sparsevlm takes one image per prompt, not {images}")
        counts = sparsevlm.stage_counts(config.visual_budget, patches)
        return {0: patches, **{layer: kept + clusters for layer, (kept, clusters) in zip(sparsevlm.stage_layers(layers), counts)}}
    if config.llm_method == "dart":
        return {0: patches, config.fastv_layer: min(kept_count(image_quotas(budget, config.dart_quota, patches)), patches)}
    raise NotImplementedError(f"VISUAL_METHOD={config.llm_method}: no MACs model of its stages (hybrid_vlm.flops.stage_visual_counts)")


def staged_prefill_macs(shape: LlavaShape, config, text_tokens: int, lm_head_tokens: int = 1, attention: str = "causal",
                        images: int = 1, anyres: Sequence[AnyresImage] | None = None) -> PrefillMacs:
    """Prefill of one sample under pdrop, sparsevlm (several stages) or dart (one), their scoring
    included in `llm`: pdrop projects every pre-drop token's key and one query per stage and takes
    one row; sparsevlm chooses its raters once (visual x text dot products), then per stage takes
    every text row's logits against the keys and DPC-kNN's distance matrix over the recycled
    candidates; dart takes its keys' L1 norms and 8 pivots' cosines against the image tokens. anyres: a
    LLaVA-NeXT sample's images, whose packed spans (newlines included) the methods rank."""
    from .methods import sparsevlm

    llm_shape, counts = shape.llm, stage_visual_counts(shape, config, images, anyres_tokens(anyres))
    starts = sorted(counts)
    spans = [end - start for start, end in zip(starts, [*starts[1:], llm_shape.layers])]
    llm = sum(span * llama_layer_macs(text_tokens + counts[start], llm_shape, attention=attention) for start, span in zip(starts, spans))
    if config.llm_method == "sparsevlm":
        llm += counts[0] * text_tokens * llm_shape.hidden
        stage_counts = sparsevlm.stage_counts(config.visual_budget, counts[0])
    for stage, before in enumerate(starts[:-1]):  # each stage scores the sequence before its drop
        tokens = text_tokens + counts[before]
        if config.llm_method == "pdrop":
            llm += tokens * llm_shape.hidden * llm_shape.d_kv + llm_shape.hidden * llm_shape.d_q + tokens * llm_shape.d_q
        elif config.llm_method == "sparsevlm":
            candidates, _ = sparsevlm.recycled_counts(counts[before] - stage_counts[stage][0])
            llm += text_tokens * tokens * llm_shape.d_q + candidates * candidates * llm_shape.hidden
        else:  # dart (stage_visual_counts refuses any other method)
            llm += tokens * llm_shape.d_kv + 8 * counts[before] * llm_shape.hidden
    crops = images if anyres is None else sum(image.crops for image in anyres)
    stock = prefill_macs(shape, text_tokens, counts[0], attention=attention, lm_head_tokens=lm_head_tokens, crops=crops,
                         projector_tokens=crops * shape.vit.patches)
    return PrefillMacs(vision=stock.vision, projector=stock.projector, llm=llm, lm_head=stock.lm_head)


def anyres_tokens(anyres: Sequence[AnyresImage] | None) -> list[int] | None:
    return None if anyres is None else [image.tokens for image in anyres]


def staged_layer_tokens(shape: LlavaShape, config, text_tokens: int, anyres: Sequence[AnyresImage] | None = None) -> list[int]:
    """Prompt tokens each LLM layer caches under pdrop or dart."""
    counts = stage_visual_counts(shape, config, image_tokens=anyres_tokens(anyres))
    starts = sorted(counts)
    return [text_tokens + counts[max(start for start in starts if start <= layer)] for layer in range(shape.llm.layers)]


def staged_decode_macs_mean(shape: LlavaShape, config, text_tokens: int, steps: int, anyres: Sequence[AnyresImage] | None = None) -> float:
    """Mean MACs per decode step over `steps` steps, each layer over its own cache."""
    layers = staged_layer_tokens(shape, config, text_tokens, anyres)
    total = sum(llama_layer_macs(1, shape.llm, cached=cached + t) for t in range(steps) for cached in layers)
    return total / steps + lm_head_macs(shape.llm, 1)


def staged_kv_cache_bytes(shape: LlavaShape, config, text_tokens: int, decode_tokens: int, bytes_per_element: int = 2,
                          anyres: Sequence[AnyresImage] | None = None) -> int:
    layers = staged_layer_tokens(shape, config, text_tokens, anyres)
    return 2 * sum(tokens + decode_tokens for tokens in layers) * shape.llm.d_kv * bytes_per_element


def stage_layer_mean(shape: LlavaShape, config) -> float:
    counts = stage_visual_counts(shape, config)
    starts = sorted(counts)
    ends = [*starts[1:], shape.llm.layers]
    return sum((end - start) * counts[start] for start, end in zip(starts, ends)) / shape.llm.layers


def attention_check(attention: str) -> None:
    if attention not in ATTENTION_CONVENTIONS:
        raise ValueError(f"attention={attention!r}: use one of {ATTENTION_CONVENTIONS}")


def ratio(value: float, baseline: float) -> float:
    """value / baseline (nan when the baseline is zero)."""
    return value / baseline if baseline else float("nan")


def facts_check(shape: LlavaShape = LLAVA_15_7B, keeps: Sequence[int] = (288, 144, 64)) -> dict:
    """The facts-file numbers: LLaVA-1.5-7B, 636 tokens (5 + 576 + 55), FastV at layer 2."""
    text = 60
    vanilla = prefill_macs(shape, text)
    out = {
        "vanilla_llm_tmacs": vanilla.llm_total / 1e12,
        "vanilla_total_tmacs": vanilla.total / 1e12,
        "clip_share_of_prefill": vit_macs(shape.vit, patch_embed=False)
        / (vit_macs(shape.vit, patch_embed=False) + vanilla.llm_total),
        "vision_share_of_prefill": vanilla.vision_total / vanilla.total,
        "llm_ratio": {},
        "total_ratio": {},
    }
    for keep in keeps:
        fastv = prefill_macs(shape, text, visual_kept=keep)
        out["llm_ratio"][keep] = ratio(fastv.llm_total, vanilla.llm_total)
        out["total_ratio"][keep] = ratio(fastv.total, vanilla.total)
    return out


def methods_table(shape: LlavaShape = LLAVA_15_7B, budgets: Sequence[int] = (192, 128, 64), text: int = 60) -> list[dict]:
    """Each registered method at each budget, by its own rule, on one sample of `text` + 576 tokens:
    the three visual counts, prefill MACs (the method's scoring included) and their ratio to vanilla."""
    from .config import HybridConfig
    from .methods import get_method, list_methods

    vanilla = prefill_macs(shape, text)
    rows = []
    for name in list_methods():
        method = get_method(name)
        if method.budget_rule == "thresholds":
            continue  # DyMU: counts are data; see the calibrate CLI and the bench
        for budget in budgets:
            if method.inside_llm and method.budget_setting == "VISUAL_BUDGET":
                config = HybridConfig(visual_method=name, visual_budget=budget)
                try:
                    counts = stage_visual_counts(shape, config)
                except ValueError:
                    rows.append(dict(method=name, rule=method.budget_rule, budget=budget, unreachable=True))
                    continue
                macs = method_prefill_macs(shape, config, text)
                rows.append(dict(
                    method=name, rule=method.budget_rule, budget=budget, visual_in=shape.visual_tokens,
                    visual_kept=counts[max(counts)], visual_layer_mean=stage_layer_mean(shape, config),
                    prefill_tmacs=macs.total / 1e12, scoring_gmacs=0.0, ratio=ratio(macs.total, vanilla.total),
                ))
                continue
            if method.before_llm:
                config = HybridConfig(visual_method=name, visual_budget=budget)
                entered, kept, full_layers = budget, budget, 0
            else:
                config = HybridConfig(fastv_k=budget, fastv_select="attention" if name == "fastv" else "random")
                entered, kept, full_layers = shape.visual_tokens, budget, config.fastv_layer
            macs = method_prefill_macs(shape, config, text)
            rows.append(dict(
                method=name, rule=method.budget_rule, budget=budget, visual_in=entered, visual_kept=kept,
                visual_layer_mean=(full_layers * entered + (shape.llm.layers - full_layers) * kept) / shape.llm.layers,
                prefill_tmacs=macs.total / 1e12, scoring_gmacs=macs.selection / 1e9, ratio=ratio(macs.total, vanilla.total),
            ))
    return rows


def print_methods_table() -> None:
    print(f"LLaVA-1.5-7B, 60 text + 576 visual tokens; vanilla prefill {prefill_macs(LLAVA_15_7B, 60).total / 1e12:.3f} TMACs\n")
    print("| method | rule | budget | visual in (A) | visual kept (B) | layer-avg (C) | prefill TMACs | of which selection before the LLM, GMACs | vs vanilla |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in methods_table():
        if row.get("unreachable"):
            print(f"| {row['method']} | {row['rule']} | {row['budget']} | unreachable | | | | | |")
            continue
        print(f"| {row['method']} | {row['rule']} | {row['budget']} | {row['visual_in']} | {row['visual_kept']} | "
              f"{row['visual_layer_mean']:.1f} | {row['prefill_tmacs']:.3f} | {row['scoring_gmacs']:.3f} | {row['ratio']:.3f} |")


def main() -> None:
    import sys

    if "--methods" in sys.argv[1:]:
        print_methods_table()
        return
    check = facts_check()
    print("LLaVA-1.5-7B, 60 text + 576 visual tokens, causal attention, lm_head on the last token")
    print(f"  vanilla LLM prefill  {check['vanilla_llm_tmacs']:.3f} TMACs")
    print(f"  vanilla prefill      {check['vanilla_total_tmacs']:.3f} TMACs (with CLIP, patch embed, projector)")
    print(f"  CLIP encoder share   {check['clip_share_of_prefill']:.2%} (24 layers, of encoder + LLM)")
    print(f"  vision share         {check['vision_share_of_prefill']:.2%} (encoder + patch embed + projector)")
    for keep in check["llm_ratio"]:
        print(
            f"  FastV K=2 keep {keep:3d}: LLM ratio {check['llm_ratio'][keep]:.3f}, "
            f"with vision {check['total_ratio'][keep]:.3f}"
        )


if __name__ == "__main__":
    main()
