"""`Classifier` (app.ml.classifier): a real model directory in, verified predictions out.

Most tests use the tiny random-weight model from conftest (`tiny_model_dir`); the last one loads
the bundled, trained model and fails when it is missing.
"""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from app.config import DEFAULT_MODEL_DIR
from app.errors import InvalidImageError, ModelIntegrityError
from app.ml.artifact import CARD_FILE, WEIGHTS_FILE, read_card, sha256_file
from app.ml.classes import ABNORMAL_CLASSES, CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.preprocessing import prepare_batch


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Classifier:
    return Classifier.load(tiny_model_dir)


@pytest.fixture(scope="module")
def three_images(herlev_one_per_class) -> list[bytes]:
    return [
        herlev_one_per_class[c].read_bytes() for c in ("normal_columnar", "moderate_dysplastic", "carcinoma_in_situ")
    ]


def _copy_with_card(model_dir, tmp_path, **changes):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    card = read_card(copy)
    card.update(changes)
    (copy / CARD_FILE).write_text(json.dumps(card))
    return copy


def _check_prediction(prediction, version: str) -> None:
    probs = prediction.probabilities
    assert list(probs) == list(CLASS_NAMES)
    values = np.array(list(probs.values()))
    assert np.all(np.isfinite(values)) and np.all(values >= 0) and np.all(values <= 1)
    assert values.sum() == pytest.approx(1.0, abs=1e-6)
    assert prediction.abnormal_probability == pytest.approx(sum(probs[c] for c in ABNORMAL_CLASSES), abs=1e-9)
    assert prediction.predicted_class == CLASS_NAMES[int(np.argmax(values))]
    assert prediction.model_version == version


def test_load_reads_the_card(tiny, tiny_model_dir):
    card = read_card(tiny_model_dir)
    assert tiny.version == card["version"]
    assert tiny.class_names == CLASS_NAMES
    assert tiny.spec.to_dict() == card["input"]
    assert tiny.predictor.tta == card["tta"] == "dihedral8"
    assert tiny.weights_sha256 == sha256_file(tiny_model_dir / WEIGHTS_FILE)


def test_predict_returns_valid_probabilities_for_real_images(tiny, three_images):
    predictions = tiny.predict(three_images)
    assert len(predictions) == 3
    for prediction in predictions:
        _check_prediction(prediction, tiny.version)
    # The same numbers as the lower-level path the evaluation uses.
    probs = tiny.predict_pixels(prepare_batch(three_images, tiny.spec))
    for prediction, row in zip(predictions, probs, strict=True):
        assert list(prediction.probabilities.values()) == pytest.approx(row.tolist(), abs=1e-12)


def test_predict_does_not_depend_on_batching_or_input_kind(tiny, tiny_model_dir, three_images):
    together = tiny.predict(three_images)
    alone = [tiny.predict([image])[0] for image in three_images]
    small_batches = Classifier.load(tiny_model_dir, batch_size=2).predict(three_images)
    as_pil = tiny.predict([Image.open(io.BytesIO(image)) for image in three_images])
    for reference, *others in zip(together, alone, small_batches, as_pil, strict=True):
        for other in others:
            assert other.predicted_class == reference.predicted_class
            assert list(other.probabilities.values()) == pytest.approx(list(reference.probabilities.values()), abs=1e-5)


def test_predict_on_nothing_and_on_a_bad_image(tiny, three_images):
    assert tiny.predict([]) == []
    with pytest.raises(InvalidImageError):
        tiny.predict([three_images[0], b"not an image", three_images[1]])


def test_dihedral8_tta_makes_the_call_invariant_to_flips_and_turns(tiny, three_images):
    """A cell has no orientation: with dihedral8 averaging, a mirrored or turned cell gets the same call."""
    originals = [Image.open(io.BytesIO(image)) for image in three_images]
    reference = tiny.predict(originals)
    for transform in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM):
        moved = tiny.predict([image.transpose(transform) for image in originals])
        for a, b in zip(reference, moved, strict=True):
            assert list(b.probabilities.values()) == pytest.approx(list(a.probabilities.values()), abs=1e-4)
    # Turns on the prepared pixels: Pillow's two-pass resize of a turned crop may differ by 1 in a pixel value.
    pixels = prepare_batch(three_images, tiny.spec)
    expected = tiny.predict_pixels(pixels)
    for turns in (1, 2, 3):
        np.testing.assert_allclose(tiny.predict_pixels(np.rot90(pixels, turns, axes=(1, 2))), expected, atol=1e-4)


def test_without_tta_the_same_network_does_see_the_flip(tiny_model_dir, tmp_path, three_images):
    """The invariance above comes from the TTA, not from a network that ignores its input."""
    plain = Classifier.load(_copy_with_card(tiny_model_dir, tmp_path, tta="none"))
    originals = [Image.open(io.BytesIO(image)) for image in three_images]
    reference = plain.predict(originals)
    flipped = plain.predict([image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in originals])
    largest = max(
        abs(a.probabilities[c] - b.probabilities[c])
        for a, b in zip(reference, flipped, strict=True)
        for c in CLASS_NAMES
    )
    assert largest > 1e-3


def test_a_changed_weights_byte_is_refused(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    weights = bytearray((copy / WEIGHTS_FILE).read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (copy / WEIGHTS_FILE).write_bytes(bytes(weights))
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        Classifier.load(copy)


def test_a_missing_card_or_weights_file_is_refused(tiny_model_dir, tmp_path):
    no_card = tmp_path / "no_card"
    shutil.copytree(tiny_model_dir, no_card)
    (no_card / CARD_FILE).unlink()
    with pytest.raises(ModelIntegrityError, match=CARD_FILE):
        Classifier.load(no_card)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, no_weights)
    (no_weights / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        Classifier.load(no_weights)

    with pytest.raises(ModelIntegrityError):
        Classifier.load(tmp_path / "does_not_exist")


def test_a_card_that_is_not_json_is_refused(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (copy / CARD_FILE).write_text("{not json")
    with pytest.raises(ModelIntegrityError, match="not valid JSON"):
        Classifier.load(copy)


@pytest.mark.parametrize("broken", ["no_input", "no_recipe", "other_classes"])
def test_a_card_with_missing_or_wrong_fields_is_refused(tiny_model_dir, tmp_path, broken):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    card = json.loads((copy / CARD_FILE).read_text())
    if broken == "no_input":
        del card["input"]
    elif broken == "no_recipe":
        del card["recipe"]
    else:
        card["class_names"] = card["class_names"][::-1]
    (copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelIntegrityError, match="not usable"):
        Classifier.load(copy)


# --- the bundled model --------------------------------------------------------------------------


def test_bundled_model_loads_verifies_and_predicts(herlev_one_per_class):
    """The trained model shipped in model_store/: fails (never skips) when it is not there."""
    assert (DEFAULT_MODEL_DIR / CARD_FILE).is_file(), f"bundled model missing: {DEFAULT_MODEL_DIR}"
    card = read_card(DEFAULT_MODEL_DIR)
    weights_path = DEFAULT_MODEL_DIR / card.get("weights_file", WEIGHTS_FILE)
    assert card["weights_sha256"] == sha256_file(weights_path)
    with np.load(weights_path) as stored:  # float16 storage must not have overflowed anywhere
        assert all(np.all(np.isfinite(stored[name])) for name in stored.files)

    classifier = Classifier.load(DEFAULT_MODEL_DIR)
    assert classifier.version == card["version"]
    assert classifier.class_names == CLASS_NAMES
    assert "metrics" in card and card["metrics"]["n"] > 0

    predictions = classifier.predict([herlev_one_per_class[c].read_bytes() for c in CLASS_NAMES])
    assert len(predictions) == len(CLASS_NAMES)
    for prediction in predictions:
        _check_prediction(prediction, card["version"])
