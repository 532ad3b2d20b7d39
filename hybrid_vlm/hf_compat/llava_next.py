"""transformers internals used for LLaVA-NeXT: anyres crops, unpadding, `image_newline`.

LLaVA-NeXT (`LlavaNextForConditionalGeneration`) runs the same CLIP tower as LLaVA-1.5 on a base
image plus a grid of crops of the image resized to its best `image_grid_pinpoints` resolution, then
packs the features: the base image's 24 x 24 tokens, then the crop grid with its padded border
removed ("unpad"), one `image_newline` token after every row. The packed count depends on each
image's size, so a batch of different aspect ratios has different visual counts per sample.

Rather than re-implementing the packing, `anyres_layouts` runs transformers' own
`pack_image_features` once per image on a tensor of feature *indices*: its output says, for every
packed token, which crop patch it is (or that it is a newline). Packing real features is then a
gather, equal to stock by construction, and the same map serves DyMU per crop. Image sizes are read
on the host (`image_sizes` as the processor returns it, on the CPU: no device sync; a CUDA tensor
costs one read per forward that carries images, as stock reads it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

__all__ = [
    "AnyresLayout",
    "LlavaNextForConditionalGeneration",
    "anyres_layouts",
    "crop_pixels",
    "crop_features",
    "image_newline",
    "stock_next_image_features",
    "tower_pixels",
]

NEWLINE = -1


@dataclass(frozen=True)
class AnyresLayout:
    """Where each packed token of one image comes from.

    num_crops: images the tower sees for it (the base image first, then the grid crops).
    source: [V] long, for every packed token in prompt order the index into this image's crop
        features flattened as crop * patches + patch, or NEWLINE (-1) for an `image_newline` token.
    grid_width: patches per row of the unpadded crop grid (the rows that newlines close).
    """

    num_crops: int
    source: torch.Tensor
    grid_width: int

    @property
    def num_tokens(self) -> int:
        return self.source.shape[0]


def _patches_per_crop(model: LlavaNextForConditionalGeneration) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def _host_sizes(image_sizes) -> list[list[int]]:
    """[N, 2] (height, width) as Python ints, from a tensor or nested lists (stock takes both)."""
    return [[int(v) for v in size] for size in torch.as_tensor(image_sizes).tolist()]


def anyres_layouts(model: LlavaNextForConditionalGeneration, image_sizes: torch.Tensor) -> list[AnyresLayout]:
    """One AnyresLayout per image of `image_sizes` [N, 2] (height, width), from stock packing."""
    if model.config.vision_feature_select_strategy != "default":
        raise NotImplementedError("hybrid_vlm supports LLaVA-NeXT with vision_feature_select_strategy='default' (CLS dropped)")
    patches = _patches_per_crop(model)
    layouts = []
    for size in _host_sizes(image_sizes):
        crops = image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
        index = torch.arange(crops * patches, dtype=torch.float64).view(crops, patches, 1)
        packed, _ = model.model.pack_image_features(
            [index], torch.tensor([size]), "default", image_newline=torch.tensor([float(NEWLINE)], dtype=torch.float64)
        )
        source = packed[0][:, 0].long()
        grid_part = source[patches:]
        rows = int((grid_part == NEWLINE).sum())
        layouts.append(AnyresLayout(crops, source, (grid_part.shape[0] - rows) // max(rows, 1)))
    return layouts


def crop_pixels(pixel_values: torch.Tensor, layouts: list[AnyresLayout]) -> torch.Tensor:
    """The crops the tower sees, [sum of num_crops, C, H, W], from the processor's [N, max_crops, C, H, W]
    (padded crops dropped, as stock does)."""
    if pixel_values.dim() != 5:
        raise ValueError(f"LLaVA-NeXT pixel_values must be [images, crops, channels, height, width], got {tuple(pixel_values.shape)}")
    short = [i for i, layout in enumerate(layouts) if i >= len(pixel_values) or pixel_values.shape[1] < layout.num_crops]
    if len(pixel_values) != len(layouts) or short:
        raise ValueError(f"pixel_values holds {len(pixel_values)} images of up to {pixel_values.shape[1]} crops, but image_sizes "
                         f"{len(layouts)} images needing {[layout.num_crops for layout in layouts]} crops: pass the processor's "
                         "pixel_values and image_sizes of the same images")
    return torch.cat([image[: layout.num_crops] for image, layout in zip(pixel_values, layouts)])


def takes_anyres(model) -> bool:
    """LLaVA-NeXT: the processor tiles each image into crops (no padding to a square first)."""
    return isinstance(model, LlavaNextForConditionalGeneration)


def tower_pixels(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> torch.Tensor:
    """What the CLIP tower sees, [N, C, H, W]: for LLaVA-NeXT every crop of every image
    (`crop_pixels`), for LLaVA-1.5 the images as they are."""
    if takes_anyres(model):
        return crop_pixels(pixel_values, anyres_layouts(model, image_sizes))
    return pixel_values


def crop_features(model: LlavaNextForConditionalGeneration, crops: torch.Tensor) -> torch.Tensor:
    """Projected features of every crop, [crops, patches, hidden], as stock computes them before packing."""
    config = model.config
    outputs = model.model.vision_tower(crops, output_hidden_states=True, return_dict=True)
    selected = outputs.hidden_states[config.vision_feature_layer][:, 1:]  # CLS dropped ("default")
    return model.model.multi_modal_projector(selected)


def image_newline(model: LlavaNextForConditionalGeneration) -> torch.Tensor:
    """The learned newline embedding [hidden]."""
    return model.model.image_newline


def stock_next_image_features(model: LlavaNextForConditionalGeneration, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Packed features exactly as stock LLaVA-NeXT computes them: one [V_i, hidden] per image."""
    outputs = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True)
    return list(outputs.pooler_output)
