"""Forward pass with optional test-time augmentation, shared by evaluation and serving.

A cell has no orientation, so its flips and 90-degree rotations are equally valid views;
averaging the network's probabilities over them steadies the call. The model card's "tta" names
how many views the server runs (see `evaluate`, whose "tta_choice" section measures what each buys).

Memory: the views of a batch go through the network together (far cheaper than one pass per
view), but at most `max_images_per_pass` network inputs at a time, so a batch of 32 cells with 8
views does not hold the activations of 256 images at once.

Precision: on CPUs with bfloat16 instructions the network can be built under Keras'
"mixed_bfloat16" policy (same float32 weights, bfloat16 arithmetic); see `resolve_precision`.
"""

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args


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

TTA = Literal["none", "flips4", "dihedral8"]
Precision = Literal["float32", "bfloat16"]
PrecisionSetting = Literal["auto", "float32", "bfloat16"]

# Which of the eight dihedral views (index k < 4: turned k quarter turns; k >= 4: mirrored left-right,
# then turned k - 4 quarter turns) each setting averages. flips4 = original, mirrored, upside down, both.
VIEW_INDICES: dict[TTA, tuple[int, ...]] = {"none": (0,), "flips4": (0, 4, 6, 2), "dihedral8": tuple(range(8))}

# The environment variables the server's settings document (PAPCAD_INFERENCE_*), read here so that
# every process that loads a model (server, worker, registry reloads, CLI) follows them.
PRECISION_ENV = "PAPCAD_INFERENCE_PRECISION"
MAX_IMAGES_ENV = "PAPCAD_INFERENCE_MAX_IMAGES_PER_PASS"
DEFAULT_MAX_IMAGES_PER_PASS = 8

# CPU flags that mean hardware bfloat16 arithmetic (AVX-512 BF16, or Intel AMX tiles).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# Whether "auto" picks bfloat16 on such a CPU: only if it meets its bar (>= 1.8x throughput at <= 0.5 points of
# 7-class accuracy lost on the grouped test split, bench/bench_serving.py). For the bundled model it does not:
# 1.9-2.8x faster, but one test cell of 184 changes its call (0.54 points), so auto stays float32.
AUTO_BF16 = False


def view(batch: tf.Tensor, index: int) -> tf.Tensor:
    """Dihedral view `index` (0-7, see VIEW_INDICES) of a (n, h, w, c) batch."""
    source = tf.reverse(batch, [2]) if index >= 4 else batch
    return tf.image.rot90(source, index % 4)


def views(batch: tf.Tensor, tta: TTA) -> list[tf.Tensor]:
    """The symmetric views of a (n, h, w, c) batch that test-time augmentation averages over."""
    if tta not in VIEW_INDICES:
        raise ValueError(f"unknown test-time augmentation {tta!r}")
    return [view(batch, index) for index in VIEW_INDICES[tta]]


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises hardware bfloat16 arithmetic (False where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(BF16_CPU_FLAGS & set(line.split(":", 1)[-1].split()))
    return False


def resolve_precision(setting: str | None = None) -> Precision:
    """The precision to build the network in: the setting (default: $PAPCAD_INFERENCE_PRECISION, else
    "auto"); "auto" means bfloat16 on CPUs with bfloat16 instructions (when AUTO_BF16), else float32."""
    setting = (setting or os.environ.get(PRECISION_ENV) or "auto").lower()
    if setting not in get_args(PrecisionSetting):
        raise ValueError(f"inference precision must be one of {get_args(PrecisionSetting)}, not {setting!r}")
    if setting == "auto":
        return "bfloat16" if AUTO_BF16 and cpu_has_bf16() else "float32"
    return setting  # type: ignore[return-value]


def max_images_per_pass(value: int | None = None) -> int:
    """Network inputs per forward call (argument, else $PAPCAD_INFERENCE_MAX_IMAGES_PER_PASS, else 8)."""
    value = value if value is not None else int(os.environ.get(MAX_IMAGES_ENV, DEFAULT_MAX_IMAGES_PER_PASS))
    if value < 1:
        raise ValueError("at least one image per forward pass")
    return value


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


def release_free_memory() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise): loading a model leaves
    tens of MiB of temporaries behind. A no-op where glibc's malloc_trim is not available."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Predictor:
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

    def per_view(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, size, size, 3) -> float32 probabilities (views, n, classes) and features (views, n, d)."""
        prob_chunks, feature_chunks = [], []
        step = min(self.batch_size, self.cells_per_pass)
        for i in range(0, len(pixels), step):
            probs, features = self._forward(tf.constant(pixels[i : i + step]))
            prob_chunks.append(probs.numpy())
            feature_chunks.append(features.numpy())
        return np.concatenate(prob_chunks, axis=1), np.concatenate(feature_chunks, axis=1)

    def with_features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, size, size, 3) -> float64 (n, classes) probabilities summing to 1, float32 (n, d) features."""
        per_view_probs, per_view_features = self.per_view(pixels)
        probs = per_view_probs.mean(axis=0, dtype=np.float64)
        return probs / probs.sum(axis=1, keepdims=True), per_view_features.mean(axis=0).astype(np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, size, size, 3) -> float64 (n, classes) probabilities summing to 1."""
        return self.with_features(pixels)[0]
