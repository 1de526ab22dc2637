"""EXIF orientation is applied once, at decode: the model, the stored size and the heatmap see the upright cell.

Also: the heatmap PNG stays bounded in size (and memory) whatever the image's size, in the image's aspect.
"""

import io
import tracemalloc

import keras
import numpy as np
import pytest
from PIL import Image

from app.ml.explain import MAX_OVERLAY_SIDE, heatmap_png, overlay_size
from app.ml.inference import GradCam
from app.ml.preprocessing import InputSpec, decode_image, prepare_image
from app.services.images import check_image

ORIENTATION = 0x0112
RED, BLUE = (230, 20, 20), (20, 20, 230)


def upright_cell() -> Image.Image:
    """60 wide, 40 high: red on top, blue below."""
    image = Image.new("RGB", (60, 40), BLUE)
    image.paste(Image.new("RGB", (60, 20), RED), (0, 0))
    return image


def as_jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def rotated_jpeg() -> bytes:
    """What a camera held sideways writes: the pixels turned a quarter anti-clockwise, and Orientation=6
    ("rotate 90 degrees clockwise to display")."""
    return as_jpeg(upright_cell().transpose(Image.Transpose.ROTATE_90), orientation=6)


def test_orientation_6_is_applied_at_decode():
    stored = Image.open(io.BytesIO(rotated_jpeg()))
    assert stored.size == (40, 60)  # as stored: sideways
    decoded = np.asarray(decode_image(rotated_jpeg()), dtype=int)
    assert decoded.shape == (40, 60, 3)  # upright again: 60 wide, 40 high
    top, bottom = decoded[:15].mean(axis=(0, 1)), decoded[25:].mean(axis=(0, 1))
    assert top[0] > 180 and top[2] < 80, "red belongs on top"
    assert bottom[2] > 180 and bottom[0] < 80, "blue belongs below"


def test_checked_image_and_network_input_are_upright():
    checked = check_image(rotated_jpeg(), 10_000_000, 1_000_000)
    assert (checked.image.width, checked.image.height) == (60, 40)
    spec = InputSpec(size=32, fit="resize")
    from_rotated = prepare_image(rotated_jpeg(), spec).astype(int)
    from_upright = prepare_image(as_jpeg(upright_cell()), spec).astype(int)
    assert np.abs(from_rotated - from_upright).mean() < 4  # the same cell, up to JPEG noise


def test_an_image_without_orientation_is_unchanged():
    plain = as_jpeg(upright_cell())
    assert decode_image(plain).size == (60, 40)
    assert decode_image(as_jpeg(upright_cell(), orientation=1)).size == (60, 40)


@pytest.fixture(scope="module")
def cam() -> GradCam:
    keras.utils.set_random_seed(3)
    return GradCam(keras.models.clone_model(_small_model()))


def _small_model():
    from app.ml.model import build_model

    return build_model(64)


def test_heatmap_of_a_rotated_jpeg_has_the_upright_shape(cam):
    png = Image.open(io.BytesIO(heatmap_png(cam.heatmap, rotated_jpeg(), InputSpec(size=64, fit="resize"), 0)))
    assert png.size == (60, 40)


def test_overlay_size_keeps_the_aspect_and_caps_the_longest_side():
    assert overlay_size((600, 400)) == (600, 400)
    assert overlay_size((5000, 5000)) == (MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE)
    assert overlay_size((3000, 2000)) == (1024, 683)
    assert overlay_size((20, 4000)) == (5, 1024)


def test_heatmap_of_a_large_image_is_bounded_in_size_and_memory(cam):
    """A 3000x2000 upload: the PNG is 1024x683 (same aspect) and Python memory stays far below the
    full-size float maps (3000 x 2000 x 4 colour channels x 8 bytes = 192 MB for the colour map alone)."""
    big = Image.new("RGB", (3000, 2000), (200, 170, 210))
    big.paste(Image.new("RGB", (600, 400), (90, 40, 120)), (1200, 800))
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    data = buffer.getvalue()
    spec = InputSpec(size=64, fit="resize")
    heatmap_png(cam.heatmap, data, spec, 0)  # warm up (graph tracing)
    tracemalloc.start()
    try:
        png = heatmap_png(cam.heatmap, data, spec, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    overlay = Image.open(io.BytesIO(png))
    assert overlay.size == (1024, 683)
    assert abs(overlay.width / overlay.height - 3000 / 2000) < 0.01
    assert peak < 60_000_000, f"heatmap of a 3000x2000 image peaked at {peak:,} bytes"
