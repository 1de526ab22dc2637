"""Forward pass with optional test-time augmentation, shared by evaluation and serving.

A cell has no orientation, so its flips and 90-degree rotations are equally valid views;
averaging the network's probabilities over them steadies the call. The model card's "tta" names
how many views the server runs (see `evaluate`, whose "tta_choice" section measures what each buys).

Memory: the views of a batch go through the network together (far cheaper than one pass per
view), but at most `max_images_per_pass` network inputs at a time, so a batch of 32 cells with 8
views does not hold the activations of 256 images at once.

Precision: on CPUs with bfloat16 instructions the network can be built under Keras'
"mixed_bfloat16" policy (same float32 weights, bfloat16 arithmetic); see `runtime.resolve_precision`. The int8
network runs without TensorFlow, in `app.ml.lite`.
"""

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def _without_matplotlib() -> Iterator[None]:
    """Keras imports matplotlib.pyplot (for its plotting helpers, unused here) whenever it is installed:
    about 25 MiB of a server that draws nothing. While Keras is first imported the import
    of matplotlib fails (Keras then leaves those helpers off); afterwards matplotlib imports as usual."""
    blocked = "matplotlib" not in sys.modules
    if blocked:
        sys.modules["matplotlib"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if blocked and sys.modules.get("matplotlib", ...) is None:
            del sys.modules["matplotlib"]


with _without_matplotlib():
    import keras

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from app.ml.model import feature_dims, with_features  # noqa: E402
from app.ml.runtime import TTA, VIEW_INDICES, Precision, ViewAverage, max_images_per_pass  # noqa: E402


def view(batch: tf.Tensor, index: int) -> tf.Tensor:
    """Dihedral view `index` (0-7, see VIEW_INDICES) of a (n, h, w, c) batch."""
    source = tf.reverse(batch, [2]) if index >= 4 else batch
    return tf.image.rot90(source, index % 4)


def views(batch: tf.Tensor, tta: TTA) -> list[tf.Tensor]:
    """The symmetric views of a (n, h, w, c) batch that test-time augmentation averages over."""
    if tta not in VIEW_INDICES:
        raise ValueError(f"unknown test-time augmentation {tta!r}")
    return [view(batch, index) for index in VIEW_INDICES[tta]]


_POLICY_LOCK = threading.Lock()


def build_in_precision(build: Callable[[], keras.Model], precision: Precision) -> keras.Model:
    """Call `build()` with Keras' global dtype policy set for `precision`, and restore it after.

    The policy is global in Keras, so the switch is serialised; layers keep the policy they were made with.
    """
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16"}[precision]
    with _POLICY_LOCK:
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            return build()
        finally:
            keras.config.set_dtype_policy(previous)


class Predictor(ViewAverage):
    """A compiled `pixels -> (probabilities, pooled features)` function for one network and one TTA setting.

    The features (average-pooled outputs of the backbone stages, `model.with_features`) come from the same
    forward pass as the probabilities, averaged over the same views, so the out-of-distribution score costs no
    second pass.
    """

    def __init__(
        self,
        model: keras.Model,
        tta: TTA = "none",
        batch_size: int = 32,
        max_images: int | None = None,
        precision: Precision = "float32",
    ):
        if tta not in VIEW_INDICES:
            raise ValueError(f"unknown test-time augmentation {tta!r}")
        self.model = model
        self.tta = tta
        self.precision = precision
        self.batch_size = batch_size
        self.n_views = len(VIEW_INDICES[tta])
        # Cells per network call, so that cells x views stays within the limit (at least one cell).
        self.cells_per_pass = max(1, max_images_per_pass(max_images) // self.n_views)
        size = model.input_shape[1]
        both = with_features(model)
        self.feature_dims = feature_dims(model)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])  # type: ignore[untyped-decorator]
        def forward(pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            """Per-view probabilities (views, n, classes) and features (views, n, d)."""
            batch = tf.cast(pixels, tf.float32)
            all_views = views(batch, tta)
            probs, features = both(tf.concat(all_views, axis=0), training=False)
            n = tf.shape(pixels)[0]
            probs = tf.reshape(tf.cast(probs, tf.float32), [len(all_views), n, -1])
            features = tf.reshape(tf.cast(features, tf.float32), [len(all_views), n, -1])
            return probs, features

        self._forward = forward
        self._cam: GradCam | None = None  # built on the first heatmap: the prediction path never pays for it
        self._cam_lock = threading.Lock()

    def per_view(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, size, size, 3) -> float32 probabilities (views, n, classes) and features (views, n, d)."""
        prob_chunks, feature_chunks = [], []
        step = min(self.batch_size, self.cells_per_pass)
        for i in range(0, len(pixels), step):
            probs, features = self._forward(tf.constant(pixels[i : i + step]))
            prob_chunks.append(probs.numpy())
            feature_chunks.append(features.numpy())
        return np.concatenate(prob_chunks, axis=1), np.concatenate(feature_chunks, axis=1)

    def heatmap(self, pixels: np.ndarray, class_index: int) -> np.ndarray:
        """Grad-CAM of one prepared uint8 image (size, size, 3) for a class: float map in [0, 1], 4x4 at 128 px."""
        with self._cam_lock:
            if self._cam is None:
                self._cam = GradCam(self.model)
        return self._cam.heatmap(pixels, class_index)


class GradCam:
    """Grad-CAM for the network built by `app.ml.model.build_model`."""

    def __init__(self, model: keras.Model):
        preprocess = model.get_layer("resnet_preprocess")
        backbone = model.get_layer("resnet50")
        gap = model.get_layer("gap")
        head = model.get_layer("head")
        size = model.input_shape[1]

        @tf.function(  # type: ignore[untyped-decorator]
            input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8), tf.TensorSpec([], tf.int32)]
        )
        def cam(pixels: tf.Tensor, class_index: tf.Tensor) -> tf.Tensor:
            # float32 whatever the network computes in (bfloat16 on CPUs that have it), for a stable gradient.
            features = tf.cast(backbone(preprocess(tf.cast(pixels, tf.float32)), training=False), tf.float32)
            with tf.GradientTape() as tape:
                tape.watch(features)
                # The class score before softmax, as Grad-CAM prescribes.
                logits = tf.matmul(tf.cast(gap(features), tf.float32), head.kernel) + head.bias
                score = logits[0, class_index]
            grads = tape.gradient(score, features)[0]
            weights = tf.reduce_mean(grads, axis=(0, 1))
            heat = tf.nn.relu(tf.reduce_sum(features[0] * weights, axis=-1))
            return heat / (tf.reduce_max(heat) + 1e-9)

        self._cam = cam

    def heatmap(self, pixels: np.ndarray, class_index: int) -> np.ndarray:
        """Prepared uint8 pixels (size, size, 3) -> float map in [0, 1] at the last block's resolution."""
        heat: np.ndarray = self._cam(tf.constant(pixels[None]), tf.constant(class_index, tf.int32)).numpy()
        return heat
