"""Forward pass with optional test-time augmentation, shared by evaluation and serving.

A cell has no orientation, so its flips and 90-degree rotations are equally valid views;
averaging the network's probabilities over them steadies the call.
"""

from typing import Literal

import keras
import numpy as np
import tensorflow as tf

from app.ml.model import with_features

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
    """A compiled `pixels -> (probabilities, pooled features)` function for one network and one TTA setting.

    The features (the backbone's global-average-pooled output) come from the same forward pass as the
    probabilities, averaged over the same views, so the out-of-distribution score costs no second pass.
    """

    def __init__(self, model: keras.Model, tta: TTA = "none", batch_size: int = 32):
        self.model = model
        self.tta = tta
        self.batch_size = batch_size
        size = model.input_shape[1]
        both = with_features(model)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def forward(pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            batch = tf.cast(pixels, tf.float32)
            all_views = views(batch, tta)
            # One forward pass over every view at once: far cheaper than one pass per view.
            probs, features = both(tf.concat(all_views, axis=0), training=False)
            n = tf.shape(pixels)[0]
            probs = tf.reshape(tf.cast(probs, tf.float32), [len(all_views), n, -1])
            features = tf.reshape(tf.cast(features, tf.float32), [len(all_views), n, -1])
            return tf.reduce_mean(probs, axis=0), tf.reduce_mean(features, axis=0)

        self._forward = forward

    def with_features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, size, size, 3) -> float64 (n, classes) probabilities summing to 1, float32 (n, d) features."""
        prob_chunks, feature_chunks = [], []
        for i in range(0, len(pixels), self.batch_size):
            probs, features = self._forward(tf.constant(pixels[i : i + self.batch_size]))
            prob_chunks.append(probs.numpy())
            feature_chunks.append(features.numpy())
        probs = np.concatenate(prob_chunks).astype(np.float64)
        return probs / probs.sum(axis=1, keepdims=True), np.concatenate(feature_chunks).astype(np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, size, size, 3) -> float64 (n, classes) probabilities summing to 1."""
        return self.with_features(pixels)[0]
