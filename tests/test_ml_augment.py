"""The "robust" training augmentation: real TensorFlow ops on real Herlev crops."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from skimage.color import hed2rgb, rgb2hed

from app.ml import augment
from app.ml.data import discover, load_arrays
from app.ml.preprocessing import InputSpec


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
