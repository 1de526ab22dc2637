"""The "robust" training augmentation: real TensorFlow ops on real Herlev crops."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from app.ml import augment
from app.ml.data import Dataset, Sample, discover, load_arrays
from app.ml.preprocessing import InputSpec
from app.ml.windows import VIEWS, window_views


@pytest.fixture(scope="module")
def cells(herlev_dir) -> tf.Tensor:
    full = discover(herlev_dir)
    dataset = dataclasses.replace(full, samples=full.samples[::60][:16])
    x, _ = load_arrays(dataset, InputSpec(size=64, fit="resize"))
    return tf.constant(x)


def test_hed_round_trip_matches_skimage(cells):
    """With no jitter the TF stain transform equals skimage's rgb2hed -> hed2rgb (itself a little lossy:
    negative stain amounts are clipped to zero)."""
    same = augment.hed_jitter(tf.cast(cells, tf.float32), sigma=0.0, bias=0.0).numpy()
    reference = np.clip(hed2rgb(rgb2hed(cells.numpy() / 255.0)), 0, 1) * 255.0
    assert np.abs(same - reference).mean() < 1.0
    jittered = augment.hed_jitter(tf.cast(cells, tf.float32), sigma=0.2, bias=0.04).numpy()
    assert np.abs(jittered - reference).mean() > 2.0


def test_robust_views_stay_images_and_differ(cells):
    tf.random.set_seed(7)
    first = augment.robust(cells).numpy()
    second = augment.robust(cells).numpy()
    assert first.shape == cells.shape and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 255.0
    assert np.abs(first - second).mean() > 5.0  # a new draw each call
    assert np.abs(first - cells.numpy()).mean() > 5.0


def test_reframe_wide_field_keeps_cell_in_the_centre(cells):
    """At scale 0.5 the whole crop shrinks into the middle; the centre still shows the cell's centre."""
    images = tf.cast(cells, tf.float32)
    framed = augment.reframe(images, min_scale=0.5, max_scale=0.5001, shift=0.0).numpy()
    centre = slice(28, 36)
    # Rotation and flips move pixels around the centre, so compare mean colours of the central patch.
    original = images.numpy()[:, centre, centre].mean(axis=(1, 2))
    moved = framed[:, centre, centre].mean(axis=(1, 2))
    assert np.abs(original - moved).mean() < 25.0
    assert framed.shape == images.shape


def test_windows_are_cut_from_the_original_images_and_only_from_the_given_cells(tmp_path):
    """A small red cell on a pale slide gets windows of slide background with parts of the other given cell (blue),
    never of a cell outside `indices` (green); view 0 is the crop exactly as `load_arrays` prepares it."""

    def cell(name: str, size: int, colour: tuple[int, int, int]) -> Sample:
        image = Image.new("RGB", (size, size), (235, 230, 240))
        image.paste(Image.new("RGB", (size // 2, size // 2), colour), (size // 4, size // 4))
        image.save(tmp_path / f"{name}.png")
        return Sample(tmp_path / f"{name}.png", 0, name)

    dataset = Dataset(tmp_path, (cell("red", 40, (220, 0, 0)), cell("blue", 300, (0, 0, 220)),
                                 cell("green", 300, (0, 220, 0))))  # fmt: skip
    spec = InputSpec(size=48, fit="resize")
    views = window_views(dataset, [0, 1], spec, seed=3, progress=False)
    assert views.shape == (2, 1 + VIEWS, 48, 48, 3) and views.dtype == np.uint8
    assert np.array_equal(views[:, 0], load_arrays(dataset.subset([0, 1]), spec, progress=False)[0])
    red_windows = views[0, 1:].astype(int)
    blue = (red_windows[..., 2] > 150) & (red_windows[..., 0] < 80)
    green = (red_windows[..., 1] > 150) & (red_windows[..., 0] < 80)
    assert blue.any() and not green.any()
    # The red cell, 20 px wide in a 64-256 px window, fills less of the frame than in its own crop.
    red_share = lambda v: ((v[..., 0] > 150) & (v[..., 1] < 80)).mean()  # noqa: E731
    assert all(red_share(w) < red_share(views[0, 0].astype(int)) for w in red_windows)
    # The large blue cell is cut to its centre: mostly blue.
    assert all((w[..., 2] > 150).mean() > 0.5 for w in views[1, 1:].astype(int))


def test_robust_augmentation_draws_shifted_cells_from_their_windows():
    """With views, the plain half always shows view 0 (the crop); shifted cells come from the windows."""
    views = np.concatenate([np.full((8, 1, 32, 32, 3), 10, np.uint8), np.full((8, VIEWS, 32, 32, 3), 245, np.uint8)], 1)
    tf.random.set_seed(11)
    plain = augment.robust(tf.constant(views), share=0.0).numpy()
    assert plain.shape == (8, 32, 32, 3) and np.allclose(plain, 10.0, atol=1.0)
    shifted = augment.robust(tf.constant(views), share=1.0, window_share=1.0).numpy()
    assert (shifted.mean(axis=(1, 2, 3)) > 110).all()
    cropped = augment.robust(tf.constant(views), share=1.0, window_share=0.0).numpy()
    assert (cropped.mean(axis=(1, 2, 3)) < 110).all()
