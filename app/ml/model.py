"""The network: Keras ResNet50 backbone + global average pooling + dropout 0.5 + softmax head.

Backbone weights come from one of three places (see `BackboneWeights`): none (random
initialisation, what our offline build machines train from), Keras' own ImageNet download,
or a local copy of Keras' ImageNet file verified against its published MD5 before use.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Keep TensorFlow's C++ start-up chatter out of CLI output and server logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from app.errors import ChecksumError  # noqa: E402

# The file Keras downloads for ResNet50(include_top=False, weights="imagenet").
IMAGENET_NOTOP_FILENAME = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"

# Caffe-style ImageNet means (BGR order), as in keras.applications.resnet50.preprocess_input.
_BGR_MEANS = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class BackboneWeights:
    """Where the backbone's starting weights come from.

    source: "none" (random init), "imagenet" (Keras download/cache) or "file".
    """

    source: str = "none"
    path: Path | None = None
    md5: str = IMAGENET_NOTOP_MD5

    def describe(self) -> dict[str, Any]:
        if self.source == "file":
            assert self.path is not None, "a backbone file needs its path"
            return {"source": "file", "file": Path(self.path).name, "md5": self.md5}
        return {"source": self.source}


def file_md5(path: Path) -> str:
    """MD5 only because that is the checksum Keras publishes for its weight files."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def verify_md5(path: Path, expected: str) -> None:
    """Raise ChecksumError unless the file exists and has the expected MD5."""
    path = Path(path)
    if not path.is_file():
        raise ChecksumError(f"backbone weights file not found: {path}")
    actual = file_md5(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"backbone weights file {path.name} has MD5 {actual}, expected {expected}; "
            "it is not the official Keras ResNet50 ImageNet (no-top) file, or it is damaged"
        )


Normalization = Literal["caffe", "unit"]


@keras.saving.register_keras_serializable(package="papcad")
class PixelNormalization(keras.layers.Layer):  # type: ignore[misc]  # Keras ships no types
    """Input normalisation in the graph, so every caller feeds the same plain 0-255 RGB pixels.

    caffe: ResNet50's own (RGB->BGR, subtract the ImageNet means), required for ImageNet weights.
    unit:  scale to [-1, 1], a better-conditioned start for a network trained from scratch.
    """

    def __init__(self, mode: Normalization = "caffe", **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in ("caffe", "unit"):
            raise ValueError(f"unknown normalisation {mode!r}")
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "unit":
            return x / 127.5 - 1.0
        return keras.ops.flip(x, axis=-1) - keras.ops.convert_to_tensor(_BGR_MEANS, dtype=self.compute_dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


def build_backbone(image_size: int, weights: BackboneWeights) -> keras.Model:
    shape = (image_size, image_size, 3)
    if weights.source == "imagenet":
        return keras.applications.ResNet50(include_top=False, weights="imagenet", input_shape=shape)
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=shape)
    if weights.source == "file":
        assert weights.path is not None, "a backbone file needs its path"
        verify_md5(weights.path, weights.md5)
        backbone.load_weights(str(weights.path))
    elif weights.source != "none":
        raise ValueError(f"unknown backbone weights source {weights.source!r}")
    return backbone


def build_model(
    image_size: int,
    num_classes: int = 7,
    weights: BackboneWeights = BackboneWeights(),
    freeze_backbone: bool = False,
    dropout: float = 0.5,
    normalization: Normalization = "caffe",
) -> keras.Model:
    """ResNet50 -> GlobalAveragePooling -> Dropout -> Dense(softmax), fed 0-255 RGB pixels."""
    backbone = build_backbone(image_size, weights)
    backbone.trainable = not freeze_backbone
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    if weights.source != "none" and normalization != "caffe":
        raise ValueError("ImageNet backbone weights expect ResNet50's own (caffe) normalisation")
    x = PixelNormalization(normalization, name="resnet_preprocess")(inputs)
    x = backbone(x, training=False if freeze_backbone else None)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    # Softmax in float32 even under mixed precision, for stable probabilities.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name="papcad_resnet50")


def count_params(model: keras.Model) -> tuple[int, int]:
    """(trainable, non-trainable) parameter counts."""
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    frozen = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)
    return trainable, frozen


def save_weights(model: keras.Model, path: Path) -> None:
    """Store every variable as float16, keyed by its path: half the size of float32, same calls."""
    arrays: dict[str, Any] = {v.path: np.asarray(v.numpy(), dtype=np.float16) for v in model.weights}
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def load_weights(model: keras.Model, path: Path) -> None:
    """Load weights written by `save_weights`: all or nothing, names and shapes must match exactly."""
    with np.load(path) as stored:
        names = {v.path for v in model.weights}
        if set(stored.files) != names:
            missing = sorted(names - set(stored.files))[:3]
            extra = sorted(set(stored.files) - names)[:3]
            raise ValueError(f"weights do not fit the network (missing {missing}, unexpected {extra})")
        arrays = {v.path: stored[v.path] for v in model.weights}
    wrong = [v.path for v in model.weights if tuple(arrays[v.path].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"weights do not fit the network (shape differs for {wrong[:3]})")
    for variable in model.weights:
        variable.assign(arrays[variable.path].astype(variable.dtype))


# Backbone stages whose average-pooled outputs the typical-cell guard (`app.ml.ood`) reads, from texture
# (conv2) to the features the classifier itself uses (conv5, the "gap" layer's input).
FEATURE_STAGES = ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")


def feature_dims(model: keras.Model) -> tuple[int, ...]:
    """Widths of the FEATURE_STAGES outputs: the parts of the feature vector `with_features` returns."""
    backbone = model.get_layer("resnet50")
    return tuple(int(backbone.get_layer(name).output.shape[-1]) for name in FEATURE_STAGES)


def _outputs(model: keras.Model, inputs: Any) -> tuple[Any, Any, Any]:
    """`model` applied to `inputs` with every layer shared: probabilities, the concatenated average-pooled
    FEATURE_STAGES outputs (the last part is the "gap" layer's output, before dropout) and the last block's maps."""
    backbone = model.get_layer("resnet50")
    stages = keras.Model(backbone.input, [backbone.get_layer(name).output for name in FEATURE_STAGES])
    outputs = stages(model.get_layer("resnet_preprocess")(inputs))
    pooled = [keras.layers.GlobalAveragePooling2D(dtype="float32")(out) for out in outputs[:-1]]
    last = model.get_layer("gap")(outputs[-1])
    probs = model.get_layer("head")(model.get_layer("dropout")(last))
    features = keras.layers.Concatenate(dtype="float32")([*pooled, keras.ops.cast(last, "float32")])
    return probs, features, outputs[-1]


def with_features(model: keras.Model) -> keras.Model:
    """The same network with a second output: the features the out-of-distribution score is computed on.

    Shares every layer and weight with `model`, so one forward pass yields the call and the features.
    """
    probs, features, _ = _outputs(model, model.input)
    return keras.Model(model.input, [probs, features], name=f"{model.name}_features")


def lite_network(model: keras.Model) -> keras.Model:
    """The network `app.ml.lite` runs: uint8 pixels in; "probs", "features" and "class_maps" out.

    class_maps are the last block's maps times the head's weights (n, h, w, classes): for a pooled linear head
    the Grad-CAM map of a class score is exactly the rectified class map, so no gradient is needed to serve it.
    """
    size = model.input_shape[1]
    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    probs, features, maps = _outputs(model, keras.ops.cast(pixels, "float32"))
    class_maps = keras.ops.matmul(keras.ops.cast(maps, "float32"), model.get_layer("head").kernel)
    return keras.Model(pixels, {"probs": probs, "features": features, "class_maps": class_maps}, name="papcad_lite")
