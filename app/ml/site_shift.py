"""A simulated second laboratory: Herlev crops under one fixed, strong stain and scale shift.

Another lab's stain batch and objective change every crop the same way, unlike the random per-image
shifts of `app.ml.shifts`. The tests and the site-adaptation benchmark use this to play a lab whose
cells the shipped model has never seen: the same shift for every image, no randomness, so every run
sees the same "site".
"""

import io

import numpy as np
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from app.ml.shifts import magnification

# Haematoxylin much stronger, eosin much weaker, a little DAB-channel cast: a bluer, darker stain.
STAIN_SCALE = (1.7, 0.35, 1.0)
STAIN_BIAS = (0.02, -0.01, 0.03)
# A lower-power objective: the cell at 0.7x its Herlev size on the crop's own canvas.
SCALE = 0.7

DESCRIPTION = (
    f"HED stain channels scaled by {STAIN_SCALE} and shifted by {STAIN_BIAS}, then the cell at {SCALE}x "
    "on the crop's canvas (padded with the border colour); saved as PNG"
)


def site_image(image: Image.Image) -> Image.Image:
    """The crop as the simulated lab would image it."""
    hed = rgb2hed(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0)
    rgb = hed2rgb(hed * np.array(STAIN_SCALE) + np.array(STAIN_BIAS))
    stained = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
    return magnification(SCALE)(stained)


def site_png(data: bytes) -> bytes:
    """A Herlev file's bytes -> the simulated lab's PNG of the same cell."""
    with Image.open(io.BytesIO(data)) as image:
        shifted = site_image(image)
    buffer = io.BytesIO()
    shifted.save(buffer, format="PNG")
    return buffer.getvalue()
