"""Heatmap overlays: a class-activation map of ResNet50's last block (conv5_block3_out), drawn over the cell.

The map itself comes from the predictor that serves the model (`heatmap(pixels, class_index)`: Grad-CAM,
Selvaraju et al., 2017, in `inference` for the Keras network; the same map in closed form in `lite`). It shows
where in the cell the features that raised the chosen class's score are. At a 128 px input the last block is
4x4, so the map is coarse: it points to a region, not to a nucleus. Nothing here imports TensorFlow.
"""

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from app.ml.colormap import INFERNO
from app.ml.preprocessing import InputSpec, decode_image, prepare_image

# The overlay PNG is drawn at most this many pixels on its longest side, in the image's aspect:
# the page scales it over the image, and memory stays bounded whatever the upload's size.
MAX_OVERLAY_SIDE = 1024


def overlay_size(size: tuple[int, int], max_side: int = MAX_OVERLAY_SIDE) -> tuple[int, int]:
    """The image's size, shrunk (same aspect) so its longest side is at most max_side."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def heatmap_on_image(
    heat: np.ndarray, image: Image.Image, spec: InputSpec, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Bring the map from network-input space back onto the original crop, as a float (h, w) array.

    size: the output's (width, height), default the image's; the map is coarse, so a smaller
    output of the same aspect loses nothing.
    """
    size = size or image.size
    square = Image.fromarray((heat * 255).astype(np.uint8)).resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    if spec.fit == "pad":
        # The crop sits centred on a canvas; cut its region back out of the map.
        scale = min(1.0, spec.canvas / max(image.size))
        w, h = round(image.width * scale), round(image.height * scale)
        factor = spec.size / spec.canvas
        left, top = (spec.canvas - w) // 2 * factor, (spec.canvas - h) // 2 * factor
        square = square.crop((round(left), round(top), round(left + w * factor), round(top + h * factor)))
    return np.asarray(square.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


# Prepared uint8 pixels (size, size, 3) and a class index -> a float map in [0, 1] at the last block's resolution.
HeatmapFunction = Callable[[np.ndarray, int], np.ndarray]


def heatmap_png(cam: HeatmapFunction, data: bytes | Image.Image, spec: InputSpec, class_index: int) -> bytes:
    """A colour PNG (inferno) of the class-activation map, in the image's aspect, at most MAX_OVERLAY_SIDE px a side.

    Grad-CAM runs at the network's resolution and the map is upsampled only to the overlay's size.
    A large upload is shrunk once, right after decoding, to the larger of the overlay and the
    network's working field, so what is held after that is bounded whatever the upload's size.
    """
    image = decode_image(data)
    out_size = overlay_size(image.size)
    working = max(MAX_OVERLAY_SIDE, spec.canvas, spec.size)
    if max(image.size) > working:
        image.thumbnail((working, working), Image.Resampling.BILINEAR)
    heat = heatmap_on_image(cam(prepare_image(image, spec), class_index), image, spec, out_size)
    colours = INFERNO[np.round(heat * 255).astype(np.uint8)]
    buffer = io.BytesIO()
    Image.fromarray(colours).save(buffer, format="PNG")
    return buffer.getvalue()
