"""The network (app.ml.model): parameter counts, backbone weight verification, float16 weight files."""

import hashlib

import keras
import numpy as np
import pytest

from app.errors import ChecksumError
from app.ml.model import (
    IMAGENET_NOTOP_MD5,
    BackboneWeights,
    build_backbone,
    build_model,
    count_params,
    file_md5,
    load_weights,
    save_weights,
    verify_md5,
)

SIZE = 32


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


# --- parameter counts ---------------------------------------------------------------------------


def test_frozen_backbone_trains_only_the_14343_parameter_head():
    model = build_model(224, freeze_backbone=True)
    assert count_params(model) == (14_343, 23_587_712)
    # The head is Dense(2048 -> 7): 2048 * 7 weights + 7 biases, and nothing else trains.
    assert sorted(v.path for v in model.trainable_weights) == ["head/bias", "head/kernel"]


def test_unfrozen_model_trains_everything_but_batchnorm_moving_statistics():
    model = build_model(224, freeze_backbone=False)
    trainable, frozen = count_params(model)
    assert trainable + frozen == 14_343 + 23_587_712
    frozen_paths = [v.path for v in model.non_trainable_weights]
    assert frozen_paths, "expected the BatchNormalization moving statistics to be non-trainable"
    assert all(p.endswith(("/moving_mean", "/moving_variance")) for p in frozen_paths), frozen_paths
    # Every BN layer has a moving mean and variance of its channel count; those are all that is frozen.
    bn_layers = [
        layer for layer in model.get_layer("resnet50").layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert frozen == sum(2 * layer.moving_mean.shape[0] for layer in bn_layers)
    assert all(not p.endswith(("/moving_mean", "/moving_variance")) for p in (v.path for v in model.trainable_weights))


# --- backbone weights from a verified local file ------------------------------------------------


def test_imagenet_notop_md5_is_the_published_keras_checksum():
    assert IMAGENET_NOTOP_MD5 == "4d473c1dd8becc155b73f8504c6f6626"
    assert BackboneWeights(source="file").md5 == IMAGENET_NOTOP_MD5


def test_verify_md5_accepts_a_matching_file(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"some weights")
    digest = hashlib.md5(b"some weights").hexdigest()
    assert file_md5(path) == digest
    verify_md5(path, digest)
    verify_md5(path, digest.upper())  # hex case does not matter


def test_verify_md5_rejects_a_mismatch_naming_both_checksums(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"some weights")
    actual = hashlib.md5(b"some weights").hexdigest()
    with pytest.raises(ChecksumError) as caught:
        verify_md5(path, IMAGENET_NOTOP_MD5)
    assert actual in str(caught.value)
    assert IMAGENET_NOTOP_MD5 in str(caught.value)


def test_verify_md5_rejects_a_missing_file(tmp_path):
    with pytest.raises(ChecksumError, match="not found"):
        verify_md5(tmp_path / "absent.h5", IMAGENET_NOTOP_MD5)


@pytest.fixture(scope="module")
def saved_backbone(tmp_path_factory) -> tuple:
    """A seeded ResNet50 no-top saved as Keras weights: (path, md5, its weights)."""
    keras.utils.set_random_seed(11)
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    path = tmp_path_factory.mktemp("backbone") / "x.weights.h5"
    reference.save_weights(str(path))
    return path, hashlib.md5(path.read_bytes()).hexdigest(), [w.copy() for w in reference.get_weights()]


def test_build_model_loads_backbone_weights_from_a_verified_file(saved_backbone):
    path, md5, expected = saved_backbone
    keras.utils.set_random_seed(99)  # a different seed: equal weights can only come from the file
    model = build_model(SIZE, weights=BackboneWeights("file", path, md5))
    loaded = model.get_layer("resnet50").get_weights()
    assert len(loaded) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, expected, strict=True))

    keras.utils.set_random_seed(99)
    unloaded = build_model(SIZE).get_layer("resnet50").get_weights()
    assert not all(np.array_equal(a, b) for a, b in zip(unloaded, expected, strict=True))


def test_build_backbone_with_a_wrong_md5_raises_before_reading_the_file(saved_backbone, tmp_path):
    path, md5, _ = saved_backbone
    with pytest.raises(ChecksumError, match=md5):
        build_backbone(SIZE, BackboneWeights("file", path, IMAGENET_NOTOP_MD5))
    with pytest.raises(ChecksumError):
        build_model(SIZE, weights=BackboneWeights("file", path, "0" * 32))
    # A damaged file announced with the good file's MD5: the checksum, not the HDF5 reader, must object.
    damaged = tmp_path / "x.weights.h5"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ChecksumError, match=md5):
        build_model(SIZE, weights=BackboneWeights("file", damaged, md5))


def test_unknown_backbone_source_is_refused():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(SIZE, BackboneWeights(source="somewhere"))


# --- float16 weight files -----------------------------------------------------------------------


@pytest.mark.slow
def test_save_and_load_weights_round_trip_in_float16(tmp_path):
    keras.utils.set_random_seed(1)
    original = build_model(SIZE)
    x = _pixels(4)
    before = original.predict_on_batch(x)
    path = tmp_path / "weights.npz"
    save_weights(original, path)

    with np.load(path) as stored:
        assert set(stored.files) == {v.path for v in original.weights}
        assert len(stored.files) == len(original.weights)  # no two variables share a key
        assert all(stored[name].dtype == np.float16 for name in stored.files)

    keras.utils.set_random_seed(2)
    restored = build_model(SIZE)
    assert not np.allclose(restored.predict_on_batch(x), before, atol=1e-3)
    load_weights(restored, path)
    after = restored.predict_on_batch(x)
    np.testing.assert_allclose(after, before, atol=1e-2)  # float16 rounding of every weight
    assert (after.argmax(axis=1) == before.argmax(axis=1)).mean() >= 0.75

    # Exactly the original network with its weights rounded to float16: the same numbers.
    for variable in original.weights:
        variable.assign(variable.numpy().astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(after, original.predict_on_batch(x), rtol=0, atol=1e-6)


def test_load_weights_refuses_a_network_they_do_not_fit(tmp_path):
    keras.utils.set_random_seed(1)
    path = tmp_path / "weights.npz"
    save_weights(build_model(SIZE), path)

    other = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(), keras.layers.Dense(7)])
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(other, path)

    five_classes = build_model(SIZE, num_classes=5)  # same variable names, different head shape
    before = [v.numpy().copy() for v in five_classes.weights]
    with pytest.raises(ValueError, match="shape differs"):
        load_weights(five_classes, path)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, five_classes.weights, strict=True))  # untouched
