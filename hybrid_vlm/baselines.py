"""The two baselines every token-reduction number needs beside it, as pure, sync-free tensor functions.

Random selection (`FASTV_SELECT=random`): at FastV's layer, keep K visual tokens drawn uniformly at
random instead of the K with the highest attention. The draw is a hash of the image's pixels, the
slot and the seed, computed on device: the same image keeps the same tokens in any batch, every
image gets its own draw, and no host sync is needed. The key is computed from the pixel values as
given (quantised to 1/16), so an fp16 and an fp32 copy of one image draw differently; the spec is
`image_keys` / `slot_hash`, transcribed in NumPy by the tests' reference.

Spatial pooling (`VISUAL_POOL=s`): before LLM layer 0, the 24 x 24 grid of projected image
features is averaged in s x s blocks; each pooled token takes the placeholder of its block's
central patch, the patch at offset (s // 2, s // 2) in the block (for even s the lower right of the
four central patches), and so that patch's position id (logical RoPE, like DyMU's merged tokens).
"""

from __future__ import annotations

import math

import torch

from .methods.selection import Selection, place_selection

SELECTIONS = ("attention", "random")
_MODULUS = 2**31


def image_keys(pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N] int64 in [0, 2^31): sum of quantised pixels times fixed per-element weights."""
    quantised = torch.round(pixel_values.float().flatten(1) * 16).long()  # [N, C*H*W], |q| < 64
    index = torch.arange(quantised.shape[1], device=pixel_values.device)
    weights = (index * 40503 + 1) % 65536
    return (quantised * weights).sum(dim=1) % _MODULUS


def slot_hash(keys: torch.Tensor, num_slots: int, seed: int) -> torch.Tensor:
    """[N] keys -> [N, num_slots] float64 in [0, 1): a few rounds of an LCG and xorshift, in int64."""
    slots = torch.arange(num_slots, device=keys.device)
    state = (keys[:, None] * 1_000_003 + slots[None, :] * 7919 + seed * 104_729) % _MODULUS
    for _ in range(4):
        state = (state * 1_103_515_245 + 12_345) % _MODULUS
        state = state ^ (state >> 13)
    return state.double() / _MODULUS


def random_slot_scores(pixel_values: torch.Tensor, images_per_sample: int, tokens_per_image: int, seed: int) -> torch.Tensor:
    """[B * images_per_sample, C, H, W] -> [B, images_per_sample * tokens_per_image] random scores."""
    scores = slot_hash(image_keys(pixel_values), tokens_per_image, seed)  # [N, T]
    return scores.reshape(-1, images_per_sample * tokens_per_image)


def pool_sides(grid: int = 24) -> tuple[int, ...]:
    return tuple(side for side in range(2, grid + 1) if grid % side == 0)


def pooled_token_count(tokens: int, side: int) -> int:
    """Pooled tokens per image of a square grid of `tokens` patches in side x side blocks: (G / s)^2."""
    return (math.isqrt(tokens) // side) ** 2


def pool_shape(budget: int, grid: int = 24) -> tuple[int, int]:
    """(rows, cols) of pooling windows giving `budget` tokens on a grid x grid patch grid: the
    factor pair closest to square with both sides <= grid (192 -> 16 x 12, 128 -> 16 x 8, 64 ->
    8 x 8). A budget with no such pair (a prime above the grid side) is refused."""
    pairs = [(budget // cols, cols) for cols in range(1, grid + 1) if budget % cols == 0 and budget // cols <= grid and budget // cols >= cols]
    if not pairs:
        reachable = sorted({rows * cols for rows in range(1, grid + 1) for cols in range(1, rows + 1)})
        nearby = [n for n in reachable if abs(n - budget) <= 8]
        raise ValueError(
            f"VISUAL_BUDGET={budget} is not reachable by pool: it needs rows x cols windows with both sides <= {grid}; "
            f"nearby reachable budgets: {', '.join(map(str, nearby))}"
        )
    return max(pairs, key=lambda pair: pair[1])


def window_bounds(size: int, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """adaptive_avg_pool's windows along one axis: [floor(i size / count), ceil((i + 1) size / count))."""
    index = torch.arange(count, device=device)
    return index * size // count, ((index + 1) * size + count - 1) // count


def grid_pool_shape(budget: int, grid_rows: int, grid_cols: int) -> tuple[int, int]:
    """(rows, cols) of pooling windows for at most `budget` tokens on a non-square grid (Qwen2.5-VL's
    merged units): the most tokens whose window grid keeps the image's aspect within a factor of 2,
    then the aspect closest to the image's (shapes within the grid only; if no shape stays within a
    factor of 2, the closest aspect, then the most tokens; ties go to more rows). On a square grid it
    is `pool_shape`'s answer wherever that one is within a factor of 2 of square."""
    aspect = math.log(grid_rows / grid_cols)
    shapes = [(rows, min(grid_cols, budget // rows)) for rows in range(1, min(grid_rows, budget) + 1)]
    shapes += [(min(grid_rows, budget // cols), cols) for cols in range(1, min(grid_cols, budget) + 1)]

    def skew(shape):  # rounded, so that equal skews in exact arithmetic tie
        return round(abs(math.log(shape[0] / shape[1]) - aspect), 9)

    banded = [shape for shape in shapes if skew(shape) <= round(math.log(2), 9)]
    if banded:
        return max(banded, key=lambda shape: (shape[0] * shape[1], -skew(shape), shape[0]))
    return min(shapes, key=lambda shape: (skew(shape), -shape[0] * shape[1], -shape[0]))


def check_square_grid(tokens: int) -> None:
    if math.isqrt(tokens) ** 2 != tokens:
        raise ValueError(f"pooling needs a square patch grid, and an image brings {tokens} features (vision_feature_select_strategy="
                         "'full' keeps the CLS token beside the patches): use a model with the 'default' strategy")


def pool_selection(features: torch.Tensor, budget: int, grid: tuple[int, int] | None = None) -> Selection:
    """[N, R*C, D] patch features -> the window means (torch's adaptive average pooling over rows x
    cols windows), each at its window's central patch, the patch at offset (h // 2, w // 2) in an
    h x w window. A square grid (`grid` None) takes `pool_shape(budget)`, exactly `budget` tokens;
    a given (R, C) grid `grid_pool_shape`, at most `budget`."""
    images, tokens, hidden = features.shape
    if grid is None:
        check_square_grid(tokens)
    grid_rows, grid_cols = (math.isqrt(tokens),) * 2 if grid is None else grid
    rows, cols = pool_shape(budget, grid_rows) if grid is None else grid_pool_shape(budget, grid_rows, grid_cols)
    spatial = features.reshape(images, grid_rows, grid_cols, hidden).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(spatial, (rows, cols))
    row_start, row_end = window_bounds(grid_rows, rows, features.device)
    col_start, col_end = window_bounds(grid_cols, cols, features.device)
    centre_row, centre_col = row_start + (row_end - row_start) // 2, col_start + (col_end - col_start) // 2
    slots = (centre_row[:, None] * grid_cols + centre_col[None, :]).reshape(-1)  # [rows*cols], ascending
    sizes = ((row_end - row_start)[:, None] * (col_end - col_start)[None, :]).reshape(-1)
    return Selection(
        kept=slots.expand(images, -1),
        features=pooled.permute(0, 2, 3, 1).reshape(images, rows * cols, hidden),
        sizes=sizes.expand(images, -1),
    )


def pool_grid(features: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, G*G, D] patch features -> ([N, G*G, D], [N, G*G] bool): the s x s block means placed at
    each block's central slot, and which slots hold a pooled token ((G / s)^2 per image)."""
    check_square_grid(features.shape[1])
    grid = math.isqrt(features.shape[1])
    if grid % side:
        raise ValueError(f"VISUAL_POOL={side} does not tile a {grid} x {grid} grid: use one of {pool_sides(grid)}")
    return place_selection(pool_selection(features, (grid // side) ** 2), features.shape[1], (grid // side) ** 2)
