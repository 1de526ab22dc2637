"""Forward pass with optional test-time augmentation, shared by evaluation and serving.

A cell has no orientation, so its flips and 90-degree rotations are equally valid views;
averaging the network's probabilities over them steadies the call.
"""

from typing import Literal

import keras
import numpy as np
import tensorflow as tf

TTA = Literal["none", "flips4", "dihedral8"]


def views(batch: tf.Tensor, tta: TTA) -> list[tf.Tensor]:
    """The symmetric views of a (n, h, w, c) batch that test-time augmentation averages over."""
    if tta == "none":
        return [batch]
    if tta == "flips4":
        return [batch, tf.reverse(batch, [2]), tf.reverse(batch, [1]), tf.reverse(batch, [1, 2])]
    if tta == "dihedral8":
        mirrored = tf.reverse(batch, [2])
        return [tf.image.rot90(b, k) for b in (batch, mirrored) for k in range(4)]
    raise ValueError(f"unknown test-time augmentation {tta!r}")


class Predictor:
    """A compiled `pixels -> probabilities` function for one network and one TTA setting."""

    def __init__(self, model: keras.Model, tta: TTA = "none", batch_size: int = 32):
        self.model = model
        self.tta = tta
        self.batch_size = batch_size
        size = model.input_shape[1]

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def forward(pixels: tf.Tensor) -> tf.Tensor:
            batch = tf.cast(pixels, tf.float32)
            all_views = views(batch, tta)
            # One forward pass over every view at once: far cheaper than one pass per view.
            probs = model(tf.concat(all_views, axis=0), training=False)
            probs = tf.reshape(probs, [len(all_views), tf.shape(pixels)[0], -1])
            return tf.reduce_mean(probs, axis=0)

        self._forward = forward

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, size, size, 3) -> float64 (n, classes) probabilities summing to 1."""
        chunks = [
            self._forward(tf.constant(pixels[i : i + self.batch_size])).numpy()
            for i in range(0, len(pixels), self.batch_size)
        ]
        probs = np.concatenate(chunks).astype(np.float64)
        return probs / probs.sum(axis=1, keepdims=True)
