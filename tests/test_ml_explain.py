"""Grad-CAM: the right shape, in [0, 1], mapped back onto the crop, and it depends on the image."""

import io
import os
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from app.config import get_settings
from app.ml.classifier import Classifier
from app.ml.explain import heatmap_on_image, heatmap_png
from app.ml.inference import GradCam
from app.ml.model import build_model
from app.ml.preprocessing import InputSpec, prepare_image

HERLEV = Path(
    os.environ.get("PAPCAD_HERLEV_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "herlev")
)


@pytest.fixture(scope="module")
def cam() -> GradCam:
    """Grad-CAM of a small random network: enough for shapes and geometry."""
    keras.utils.set_random_seed(3)
    return GradCam(build_model(96))


@pytest.fixture(scope="module")
def bundled() -> Classifier:
    return Classifier.load(get_settings().model_dir)


def cells() -> list[bytes]:
    return [sorted((HERLEV / c).glob("*.BMP"))[0].read_bytes() for c in ("carcinoma_in_situ", "normal_superficiel")]


def test_heatmap_of_the_bundled_model_responds_to_the_image(bundled):
    """For the trained model's own call, the map is in [0, 1], not constant, and differs between cells."""
    grid = bundled.spec.size // 32  # ResNet50 downsamples by 32 up to its last block
    maps = []
    for data in cells():
        call = bundled.class_names.index(bundled.predict([data])[0].predicted_class)
        heat = bundled.heatmap(prepare_image(data, bundled.spec), call)
        assert heat.shape == (grid, grid)
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0, abs=1e-5)
        assert heat.std() > 0
        maps.append(heat)
    assert not np.allclose(maps[0], maps[1])


@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_png_has_the_original_size(cam, fit):
    spec = InputSpec(size=96, fit=fit, canvas=256)
    data = cells()[0]
    original = Image.open(io.BytesIO(data))
    png = Image.open(io.BytesIO(heatmap_png(cam.heatmap, data, spec, 6)))
    assert png.format == "PNG" and png.size == original.size and png.mode == "RGB"
    assert np.asarray(png).std() > 0


def test_pad_mode_maps_back_only_the_crop_region():
    spec = InputSpec(size=64, fit="pad", canvas=256)
    heat = np.zeros((2, 2), dtype=np.float32)
    heat[0, 0] = 1.0  # hot in the canvas' top-left quarter, far from the centred crop
    small = Image.new("RGB", (40, 40))
    mapped = heatmap_on_image(heat, small, spec)
    assert mapped.shape == (40, 40)
    assert mapped.max() < 0.5
