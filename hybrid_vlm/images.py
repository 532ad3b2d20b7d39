"""LLaVA-1.5's image preprocessing before the processor: "pad" (`image_aspect_ratio="pad"` in the
official code), which the plugin applies at inference and DyMU calibration applies by default, so
that thresholds are calibrated on the pixels they will be used on."""

from __future__ import annotations

from PIL import Image

# The square's side is capped: a 40000 x 1 image (a few bytes of PNG) would need a 40000^2 canvas,
# about 5 GB, and kill the run on the same row at every rerun. The processor resizes to 336 anyway.
MAX_SQUARE_SIDE = 8192


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's "pad" preprocessing: centre the image on a square of the mean colour. An image
    longer than MAX_SQUARE_SIDE is first shrunk to it, aspect kept (upstream would pad it whole)."""
    width, height = image.size
    if width == height:
        return image
    if max(width, height) > MAX_SQUARE_SIDE:
        scale = MAX_SQUARE_SIDE / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's normalisation mean as an RGB colour: the pad's background."""
    return tuple(int(value * 255) for value in image_processor.image_mean)
