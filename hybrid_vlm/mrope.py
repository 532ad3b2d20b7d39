"""Qwen2.5-VL's position rule (M-RoPE) as small tensor functions, free of host syncs.

Every token gets a (t, h, w) id. A text token's three ids are equal: one more than the token before
it, where an image counts as max(h, w) merged rows or columns rather than its h*w tokens. The image
token at (row i, column j) of an image starting at text position s gets (s, s + i, s + j) (t = 0 for
a still image). So the ids follow from a per-token *step* (1 for text, 0 for padding, max(h, w) on
the last token of each image) and a per-token *offset* (0 for text, (t, i, j) for image tokens):

    id = (sum of the steps of the tokens before it) + offset

which is what stock `Qwen2_5_VLModel.get_rope_index` computes with a Python loop over runs. The
image layout (which image has which grid) is known on the host from `image_grid_thw`, so the
per-sample tables are built there and the rest runs on the device.

Positions are laid out [B, L, 3] (axes last) so that the engine gathers them along the sequence
like 1-D ids.
"""

from __future__ import annotations

import torch

AXES = 3  # t, h, w


def image_tables(grids: list[tuple[int, int, int]], merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [V, 3], steps [V]) for one sample's images in order, V = sum of t*h*w / merge^2: each
    image token's (t, row, column) within its image, and how far it moves the text position."""
    offsets, steps = [], []
    for t, h, w in grids:
        rows, columns = h // merge, w // merge
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(columns), indexing="ij"), dim=-1)
        offsets.append(grid.reshape(-1, AXES))
        step = torch.zeros(t * rows * columns, dtype=torch.long)
        step[-1] = max(rows, columns)
        steps.append(step)
    if not offsets:
        return torch.zeros(0, AXES, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(offsets), torch.cat(steps)


def batch_tables(sample_grids: list[list[tuple[int, int, int]]], merge: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(offsets [B, V_max, 3], steps [B, V_max], counts): each sample's tables, zero-padded at the end,
    and its image-token count."""
    tables = [image_tables(grids, merge) for grids in sample_grids]
    most = max(1, max(len(steps) for _, steps in tables))
    offsets = torch.zeros(len(tables), most, AXES, dtype=torch.long)
    steps = torch.zeros(len(tables), most, dtype=torch.long)
    for b, (sample_offsets, sample_steps) in enumerate(tables):
        offsets[b, : len(sample_steps)] = sample_offsets
        steps[b, : len(sample_steps)] = sample_steps
    return offsets, steps, [len(sample_steps) for _, sample_steps in tables]


def mrope_positions(
    is_image: torch.Tensor,  # [B, L] bool: image placeholders
    valid: torch.Tensor,  # [B, L] bool: real tokens (not padding)
    offsets: torch.Tensor,  # [B, V_max, 3] per sample, its image tokens' (t, row, column)
    steps: torch.Tensor,  # [B, V_max] per sample, its image tokens' steps
) -> torch.Tensor:
    """[B, L, 3] long position ids, stock's for every real token and 0 for padding."""
    rank = (is_image.long().cumsum(dim=1) - 1).clamp(min=0, max=steps.shape[1] - 1)  # [B, L] the token's row in its tables
    step = torch.where(is_image, steps.gather(1, rank), valid.long())
    start = step.cumsum(dim=1) - step  # [B, L] sum of the steps before each token
    offset = offsets.gather(1, rank[..., None].expand(-1, -1, AXES)) * is_image[..., None]
    return start[..., None] + offset


def next_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B] the id after each sample's last token: its largest axis + 1 ([B, L, 3] ids) or id + 1 ([B, L]).
    The last token of a prompt is text (or an image's last token), which holds the sample's largest ids."""
    last = position_ids[:, -1]
    return (last.amax(dim=-1) if last.dim() == 2 else last) + 1
