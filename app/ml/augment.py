"""Random views of a batch of cells for training: what another lab's stain, scanner and framing do.

The "robust" augmentation draws from the same families as the robustness suite (`app.ml.shifts`),
but continuously and wider, so the model learns the family rather than the suite's list:

- framing: the cell at a random display scale (a tighter window, or a wider field of slide background
  with parts of another cell at the edges), turned, flipped and moved a little; with "robust_windows",
  also fixed-size windows centred on the cell, cut from the original image (`app.ml.windows`);
- stain: HED (haematoxylin-eosin-DAB) channels scaled and shifted (Tellez et al., 2018);
- colour: saturation (down to grayscale), hue, brightness, contrast, gamma;
- optics: defocus blur and pixel noise.

All of it runs in TensorFlow on whole batches, inside the tf.data pipeline; pixels are RGB 0-255.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from skimage.color import hed_from_rgb, rgb_from_hed

_HED_FROM_RGB = tf.constant(hed_from_rgb, tf.float32)
_RGB_FROM_HED = tf.constant(rgb_from_hed, tf.float32)
_LOG_FLOOR = float(np.log(1e-6))  # skimage's rgb2hed/hed2rgb use the same floor


def _uniform(n: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return tf.random.uniform([n], low, high)


def _chance(n: tf.Tensor, p: float) -> tf.Tensor:
    """1.0 for the images that get an operation, 0.0 for the rest; shape [n, 1, 1, 1]."""
    return tf.reshape(tf.cast(tf.random.uniform([n]) < p, tf.float32), [-1, 1, 1, 1])


def _per_image(values: tf.Tensor) -> tf.Tensor:
    return tf.reshape(values, [-1, 1, 1, 1])


def _blend(applied: tf.Tensor, original: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    return mask * applied + (1.0 - mask) * original


# --- framing --------------------------------------------------------------------------------------------------


def _border_colour(images: tf.Tensor) -> tf.Tensor:
    """Mean colour of each crop's outer ring (the slide background around the cell); shape [n, 1, 1, 3]."""
    ring = tf.concat([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    return tf.reduce_mean(ring, axis=1)[:, None, None, :]


def reframe(images: tf.Tensor, min_scale: float = 0.55, max_scale: float = 1.8, shift: float = 0.06) -> tf.Tensor:
    """Each cell turned, flipped, moved and shown at a log-uniform scale in [min_scale, max_scale].

    Under 1 the cell sits on a wider field: its own background colour, or (half the time) another cell
    of the batch split across the field's corners, as neighbours appear in a wider detector window.
    Over 1 the window is tighter than Herlev's crop. One in five images keeps about its own scale.
    """
    n = tf.shape(images)[0]
    size = tf.cast(tf.shape(images)[1], tf.float32)
    wide = tf.exp(_uniform(n, math.log(min_scale), math.log(max_scale)))
    scale = tf.where(tf.random.uniform([n]) < 0.2, _uniform(n, 0.9, 1.1), wide)
    angle = _uniform(n, -math.pi, math.pi)
    flip = tf.where(tf.random.uniform([n]) < 0.5, -1.0, 1.0)
    dx, dy = _uniform(n, -shift, shift) * size, _uniform(n, -shift, shift) * size
    cos, sin, centre = tf.cos(angle) / scale, tf.sin(angle) / scale, (size - 1.0) / 2.0
    # Output pixel (x, y) reads input pixel A @ (x - c, y - c) + c + d: rotation/scale about the centre.
    a0, a1 = flip * cos, -sin
    b0, b1 = flip * sin, cos
    a2 = centre - a0 * centre - a1 * centre + dx
    b2 = centre - b0 * centre - b1 * centre + dy
    zeros = tf.zeros_like(a0)
    transform = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)

    background = _border_colour(images)
    moved = keras.ops.image.affine_transform(images - background, transform, fill_mode="constant") + background
    covered = keras.ops.image.affine_transform(tf.ones_like(images[..., :1]), transform, fill_mode="constant")
    half = tf.cast(tf.shape(images)[1] // 2, tf.int32)
    neighbours = tf.roll(tf.roll(images, 1, axis=0), [half, half], axis=[1, 2])  # another cell, in the corners
    field = _blend(neighbours, tf.broadcast_to(background, tf.shape(images)), _chance(n, 0.5))
    return covered * moved + (1.0 - covered) * field


# --- stain and colour ---------------------------------------------------------------------------------------------


def hed_jitter(images: tf.Tensor, sigma: float, bias: float) -> tf.Tensor:
    """Scale each stain channel by U(1 +- sigma) and shift it by U(+- bias), in skimage's HED space."""
    n = tf.shape(images)[0]
    rgb = tf.maximum(images / 255.0, 1e-6)
    hed = tf.maximum(tf.einsum("nhwc,cd->nhwd", tf.math.log(rgb) / _LOG_FLOOR, _HED_FROM_RGB), 0.0)
    alpha = tf.random.uniform([n, 1, 1, 3], 1.0 - sigma, 1.0 + sigma)
    beta = tf.random.uniform([n, 1, 1, 3], -bias, bias)
    log_rgb = tf.einsum("nhwc,cd->nhwd", -(hed * alpha + beta) * -_LOG_FLOOR, _RGB_FROM_HED)
    return tf.clip_by_value(tf.exp(log_rgb), 0.0, 1.0) * 255.0


def _gray(images: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(images * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def colour(images: tf.Tensor) -> tf.Tensor:
    """Saturation (grayscale 1 time in 10), hue, brightness, contrast and gamma, each on some images."""
    n = tf.shape(images)[0]
    saturation = tf.where(tf.random.uniform([n]) < 0.1, 0.0, tf.exp(_uniform(n, math.log(0.45), math.log(1.8))))
    gray = _gray(images)
    x = _blend(gray + _per_image(saturation) * (images - gray), images, _chance(n, 0.7))
    x = tf.clip_by_value(x, 0.0, 255.0)

    hsv = tf.image.rgb_to_hsv(x / 255.0)
    hue = tf.math.floormod(hsv[..., :1] + _per_image(_uniform(n, -0.05, 0.05)), 1.0)
    x = _blend(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1)) * 255.0, x, _chance(n, 0.5))

    x = _blend(x * _per_image(tf.exp(_uniform(n, math.log(0.75), math.log(1.3)))), x, _chance(n, 0.6))
    mean = tf.reduce_mean(_gray(x), axis=[1, 2, 3], keepdims=True)
    x = _blend(mean + _per_image(tf.exp(_uniform(n, math.log(0.6), math.log(1.5)))) * (x - mean), x, _chance(n, 0.6))
    x = tf.clip_by_value(x, 0.0, 255.0)
    gamma = _per_image(tf.exp(_uniform(n, math.log(0.65), math.log(1.6))))
    return _blend(255.0 * tf.pow(x / 255.0 + 1e-6, gamma), x, _chance(n, 0.5))


# --- optics -----------------------------------------------------------------------------------------------------


def _gaussian_kernel(sigma: float, channels: int = 3) -> tf.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    kernel = np.outer(taps, taps)[:, :, None, None] * np.ones((1, 1, channels, 1))
    return tf.constant(kernel, tf.float32)


_BLUR = _gaussian_kernel(1.6)


def optics(images: tf.Tensor) -> tf.Tensor:
    """Defocus (a random share of a Gaussian blur) and pixel noise (SD up to 12 of 255) on some images."""
    n = tf.shape(images)[0]
    blurred = tf.nn.depthwise_conv2d(
        tf.pad(images, [[0, 0], [5, 5], [5, 5], [0, 0]], mode="SYMMETRIC"), _BLUR, [1, 1, 1, 1], "VALID"
    )
    share = _chance(n, 0.3) * _per_image(_uniform(n, 0.0, 1.0))
    x = _blend(blurred, images, share)
    noise = tf.random.normal(tf.shape(images)) * _per_image(_uniform(n, 0.0, 12.0))
    return _blend(x + noise, x, _chance(n, 0.3))


def robust(images: tf.Tensor, share: float = 0.5, window_share: float = 0.5) -> tf.Tensor:
    """The "robust" augmentation on a random `share` of the batch: framing, stain, colour and optics.

    The rest get only turns, flips and a little zoom, so every batch still shows cells as Herlev crops
    them: a network that only ever sees shifted cells loses accuracy on the plain ones.

    images: (n, size, size, 3), or (n, views, size, size, 3) with view 0 the crop and the others fixed-size
    windows (`app.ml.windows`). Then `window_share` of the shifted cells are one of their windows, turned and
    zoomed a little (the window already sets the framing), instead of the crop re-framed.
    """
    x = tf.cast(images, tf.float32)
    views = x if x.shape.rank == 5 else x[:, None]
    n, count = tf.shape(views)[0], tf.shape(views)[1]
    crop = views[:, 0]
    plain = reframe(crop, min_scale=0.9, max_scale=1.1, shift=0.03)
    windowed = (tf.random.uniform([n]) < window_share) & (count > 1)
    pick = tf.where(windowed, tf.random.uniform([n], 1, tf.maximum(count, 2), dtype=tf.int32), 0)
    window = reframe(tf.gather(views, pick, batch_dims=1), min_scale=0.8, max_scale=1.25, shift=0.03)
    shifted = _blend(window, reframe(crop), _per_image(tf.cast(windowed, tf.float32)))
    shifted = _blend(hed_jitter(shifted, sigma=0.15, bias=0.03), shifted, _chance(n, 0.7))
    shifted = optics(colour(shifted))
    return tf.clip_by_value(_blend(shifted, plain, _chance(n, share)), 0.0, 255.0)
