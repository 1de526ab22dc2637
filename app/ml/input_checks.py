"""Sanity checks on an uploaded image before its call is trusted: things no Herlev crop looks like.

The network answers every input with a confident-looking class, even a 1x1 dot or a flat grey square.
These checks look at the image as it was sent (its mode and bit depth, before `decode_image` turns it
into 8-bit RGB) and at its pixels, and name what is odd in a short reason a reviewer can read.
None of them refuses the image; each one sends the cell to a person.
"""

import io
from typing import cast

import numpy as np
from PIL import Image, ImageStat

# The smallest Herlev crop is 40x32 px; anything under this cannot show a cell's nucleus and cytoplasm.
MIN_SIDE = 32
# The flattest Herlev crop has a pixel standard deviation of 11 (0-255 scale); a cell is never this flat.
MIN_PIXEL_STD = 4.0
# At most 35 % of a Herlev crop is near-white (bright slide background) and none of it is black; a picture
# that is mostly one or the other is over- or under-exposed, or clipped from another bit depth.
MAX_CLIPPED_SHARE = 0.8
# The most elongated Herlev crop is 4.3:1.
MAX_ASPECT_RATIO = 6.0
# Modes a photographed stained cell arrives in; anything else was made or converted by something else.
EXPECTED_MODES = {"RGB", "RGBA", "CMYK", "YCbCr"}
HIGH_BIT_DEPTH = {
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I;16L": "16-bit",
    "I;16N": "16-bit",
    "I": "32-bit",
    "F": "floating-point",
}


def as_sent(data: bytes | Image.Image) -> Image.Image:
    """The image in its original mode (opened lazily: only the header is read unless pixels are asked for).

    Call after `decode_image` accepted the same data, which has already refused damaged or huge files.
    """
    if isinstance(data, Image.Image):
        return data
    return Image.open(io.BytesIO(data))


def size_flags(image: Image.Image) -> list[str]:
    width, height = image.size
    flags = []
    if min(width, height) < MIN_SIDE:
        flags.append(f"too small ({width}x{height} px; a cell crop is at least {MIN_SIDE} px a side)")
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT_RATIO:
        flags.append(f"extreme aspect ratio ({ratio:.1f}:1)")
    return flags


def mode_flags(image: Image.Image) -> list[str]:
    """Bit depth, palette and transparency of the image as sent."""
    mode = image.mode
    if mode in HIGH_BIT_DEPTH:
        return [f"{HIGH_BIT_DEPTH[mode]} image (mode {mode}); expected 8-bit colour"]
    if mode in ("P", "PA"):
        flags = ["palette image (mode P); expected a colour photograph"]
    elif mode == "1":
        return ["1-bit black-and-white image"]
    elif mode in ("L", "LA"):
        flags = ["grayscale image; the model was trained on stained colour images"]
    elif mode not in EXPECTED_MODES:
        return [f"unusual image mode {mode}"]
    else:
        flags = []
    if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        if cast(tuple[int, int], alpha.getextrema())[0] < 255:  # one 8-bit band: (min, max)
            flags.append("transparent pixels (alpha channel)")
    return flags


def uniformity_flags(rgb: Image.Image) -> list[str]:
    """A nearly flat image: no structure for the network to read."""
    spread = max(ImageStat.Stat(rgb).stddev)
    if spread < MIN_PIXEL_STD:
        return [f"nearly uniform image (pixel standard deviation {spread:.1f})"]
    return []


def exposure_flags(rgb: Image.Image) -> list[str]:
    """Mostly white or mostly black: blown-out exposure, or a high-bit-depth image clipped to 8 bits."""
    small = rgb.copy()
    small.thumbnail((256, 256))
    pixels = np.asarray(small)
    white, black = (pixels.min(axis=2) >= 250).mean(), (pixels.max(axis=2) <= 5).mean()
    if white > MAX_CLIPPED_SHARE:
        return [f"mostly white ({white:.0%} of pixels): over-exposed or clipped"]
    if black > MAX_CLIPPED_SHARE:
        return [f"mostly black ({black:.0%} of pixels): under-exposed or clipped"]
    return []


def input_flags(original: Image.Image, rgb: Image.Image) -> list[str]:
    """Every reason this image does not look like a Herlev-style cell crop; empty when none."""
    flat = uniformity_flags(rgb)
    return size_flags(original) + mode_flags(original) + (flat or exposure_flags(rgb))
