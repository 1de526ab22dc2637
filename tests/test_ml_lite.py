"""The LiteRT networks (int8, and float16 where int8 fails its check): export, checks, loading them, and a server
that runs without TensorFlow."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.config import DEFAULT_MODEL_DIR
from app.errors import ModelIntegrityError
from app.ml import export
from app.ml.artifact import read_card, sha256_file, write_card
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.export import INT8_FILE, LITE_FILES, export_lite
from app.ml.inference import GradCam
from app.ml.lite import LitePredictor
from app.ml.preprocessing import prepare_batch
from app.ml.runtime import resolve_precision

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Classifier:
    return Classifier.load(tiny_model_dir, precision="float32")


@pytest.fixture(scope="module")
def exported(tiny_model_dir, herlev_dir, tmp_path_factory) -> tuple[Path, dict, np.ndarray, np.ndarray]:
    """A copy of the tiny model with its int8 network, checked on three cells of each class."""
    model_dir = tmp_path_factory.mktemp("lite") / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    paths = [p for name in CLASS_NAMES for p in sorted((herlev_dir / name).glob("*.BMP"))[:3]]
    pixels = prepare_batch([p.read_bytes() for p in paths], Classifier.load(model_dir, precision="float32").spec)
    labels = np.repeat(np.arange(len(CLASS_NAMES)), 3)
    section = export_lite(model_dir, pixels, labels, "three cells per class")
    return model_dir, section, pixels, labels


@pytest.mark.slow  # converts a network to LiteRT
def test_export_records_a_verified_file_made_from_these_weights_and_its_check(exported):
    model_dir, section, _, labels = exported
    card = read_card(model_dir)
    assert card["serving"] == section
    int8 = section["int8"]
    assert int8["file"] == INT8_FILE and int8["sha256"] == sha256_file(model_dir / INT8_FILE)
    assert int8["weights_sha256"] == card["weights_sha256"] and sum(int8["feature_dims"]) == 256 + 512 + 1024 + 2048
    check = section["check"]
    assert check["n"] == len(labels) and 0 <= check["calls_changed"] <= len(labels)
    for name in ("float32", "int8"):
        assert 0 <= check[name]["accuracy_7class"] <= 1 and check[name]["seconds_per_cell"] > 0
    assert check["passed"] == (check["points_lost_7class"] <= 0.5 and check["points_lost_sensitivity"] <= 0.5)
    if check["passed"]:
        assert section["auto"] == "int8" and "float16" not in section
    else:  # the float16 network was written and checked instead
        assert section["auto"] == ("float16" if section["float16_check"]["passed"] else "float32")


def _int8_check_forced(monkeypatch, passed: bool) -> None:
    """Run the real conversions and checks, but record int8's as passed or failed (a tiny model's int8 network
    may pass or fail on its own)."""
    real = export._convert_and_check

    def convert_and_check(keras_model, card, precision, cells):
        entry, check = real(keras_model, card, precision, cells)
        return entry, (check | {"passed": passed} if precision == "int8" else check)

    monkeypatch.setattr(export, "_convert_and_check", convert_and_check)


@pytest.mark.slow  # converts a network to LiteRT, twice
def test_where_int8_fails_its_check_float16_weights_are_written_checked_and_served(
    exported, tiny, tmp_path, monkeypatch
):
    model_dir, _, pixels, labels = exported
    model_dir = shutil.copytree(model_dir, tmp_path / "m")
    _int8_check_forced(monkeypatch, passed=False)
    section = export_lite(model_dir, pixels, labels, "three cells per class")
    float16, check = section["float16"], section["float16_check"]
    assert float16["file"] == LITE_FILES["float16"] and float16["sha256"] == sha256_file(model_dir / float16["file"])
    assert float16["weights_sha256"] == read_card(model_dir)["weights_sha256"]
    # float16 weights keep the float32 network's answers: nothing is lost, no call changes.
    assert check["passed"] and check["calls_changed"] == 0 and check["typical_verdicts_changed"] == 0
    assert abs(check["points_lost_7class"]) <= 0.5 and check["speed_float16_over_float32"] > 0
    assert section["auto"] == "float16" and read_card(model_dir)["serving"] == section

    served = Classifier.load(model_dir, precision="auto")
    assert isinstance(served.predictor, LitePredictor) and served.predictor.precision == "float16"
    reference = tiny.predict_pixels(pixels)
    np.testing.assert_allclose(served.predict_pixels(pixels), reference, atol=2e-3)
    assert Classifier.load(model_dir, precision="int8").predictor.precision == "int8"  # asked for: still there

    _int8_check_forced(monkeypatch, passed=True)  # a later export whose int8 passes drops the float16 file
    section = export_lite(model_dir, pixels, labels, "three cells per class")
    assert section["auto"] == "int8" and "float16" not in section
    assert not (model_dir / LITE_FILES["float16"]).exists()


@pytest.mark.slow  # converts a network to LiteRT
def test_the_int8_network_answers_like_the_keras_network(exported, tiny):
    model_dir, _, pixels, _ = exported
    lite = Classifier.load(model_dir, precision="int8")
    assert isinstance(lite.predictor, LitePredictor) and lite.predictor.precision == "int8"
    assert lite.predictor.tta == tiny.predictor.tta == "dihedral8"
    probs, features = lite.predict_pixels_with_features(pixels)
    reference, ref_features = tiny.predict_pixels_with_features(pixels)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert not np.array_equal(probs, reference)  # int8 weights really are different numbers
    np.testing.assert_allclose(probs, reference, atol=0.05)
    assert features.shape == ref_features.shape
    assert np.corrcoef(features.ravel(), ref_features.ravel())[0, 1] > 0.99
    # The per-pass bound holds on LiteRT too: chunking changes nothing.
    chunked = Classifier.load(model_dir, precision="int8", max_images_per_pass=3)
    np.testing.assert_allclose(chunked.predict_pixels(pixels), probs, atol=1e-5)


@pytest.mark.slow  # converts a network to LiteRT
def test_the_class_activation_map_is_grad_cam(exported, tiny):
    """For a pooled linear head, Grad-CAM of a class score is the rectified class map: same maps, no gradient."""
    model_dir, _, pixels, _ = exported
    lite = Classifier.load(model_dir, precision="int8")
    cam = GradCam(tiny.network)
    compared = 0
    for image in pixels[:6]:
        for class_index in range(len(CLASS_NAMES)):
            reference = cam.heatmap(image, class_index)
            heat = lite.heatmap(image, class_index)
            assert heat.shape == reference.shape and heat.min() >= 0 and heat.max() <= 1 + 1e-6
            if reference.max() > 0.5:  # a map with a peak (an all-negative class map rectifies to zero)
                np.testing.assert_allclose(heat, reference, atol=0.15)
                compared += 1
    assert compared >= 6


@pytest.mark.slow  # converts a network to LiteRT
def test_a_tampered_or_foreign_int8_file_is_refused(exported, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(exported[0], model_dir)
    with open(model_dir / INT8_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelIntegrityError, match="int8 serving file"):
        Classifier.load(model_dir, precision="int8")
    shutil.copy(exported[0] / INT8_FILE, model_dir / INT8_FILE)
    card = read_card(model_dir)
    card["serving"]["int8"]["weights_sha256"] = "0" * 64  # made from other weights
    write_card(model_dir, card)
    with pytest.raises(ModelIntegrityError, match="not made from these weights"):
        Classifier.load(model_dir, precision="int8")


def test_auto_follows_the_card_and_int8_needs_the_file(monkeypatch):
    monkeypatch.delenv("PAPCAD_INFERENCE_PRECISION", raising=False)
    monkeypatch.setattr("app.ml.runtime.AUTO_BF16", False)
    with_int8 = {"serving": {"int8": {"file": INT8_FILE}, "auto": "int8"}}
    failed_check = {"serving": {"int8": {"file": INT8_FILE}, "auto": "float32"}}
    with_float16 = {"serving": {"int8": {"file": INT8_FILE}, "float16": {"file": "f.tflite"}, "auto": "float16"}}
    assert resolve_precision("auto", with_int8) == "int8"
    assert resolve_precision("auto", failed_check) == "float32"
    assert resolve_precision("auto", with_float16) == "float16"
    assert resolve_precision("auto", {}) == "float32"
    assert resolve_precision("int8", failed_check) == "int8"  # asked for: runs even if auto would not
    assert resolve_precision("int8", {}) == "float32"  # an older model without the file still serves
    assert resolve_precision("float16", with_int8) == "float32"
    assert resolve_precision("float32", with_int8) == "float32"
    assert resolve_precision("float32", with_float16) == "float32"


@pytest.mark.slow  # a server start-up in a fresh interpreter
@pytest.mark.parametrize("setting", ["auto", "int8"])
def test_the_bundled_model_serves_on_litert_without_tensorflow(setting, tmp_path, herlev_one_per_class):
    """Its LiteRT networks are bundled and checked; "auto" serves int8 if it passed its check, else float16 if that
    passed (the bundled model must be one of the two: the server's memory bar needs TensorFlow out), and "int8"
    always serves int8."""
    serving = read_card(DEFAULT_MODEL_DIR)["serving"]
    assert (DEFAULT_MODEL_DIR / serving["int8"]["file"]).is_file()
    expected_auto = "int8" if serving["check"]["passed"] else "float16"
    assert serving["auto"] == expected_auto
    if expected_auto == "float16":
        assert serving["float16_check"]["passed"] and (DEFAULT_MODEL_DIR / serving["float16"]["file"]).is_file()
    expected = expected_auto if setting == "auto" else setting
    script = r"""
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from app.config import Settings
from app.main import create_app

settings = Settings(data_dir=Path(sys.argv[1]), database_url=None)
with TestClient(create_app(settings)) as client:
    ready = client.get("/readyz").json()
    from app.ml.classifier import Classifier
    model = Classifier.load(settings.model_dir)
    prediction = model.predict([Path(sys.argv[2]).read_bytes()])[0]
print("RESULT " + json.dumps({"ready": ready, "call": prediction.predicted_class,
                              "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules}))
"""
    cell = herlev_one_per_class["carcinoma_in_situ"]
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data"), str(cell)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env=os.environ | {"PAPCAD_INFERENCE_PRECISION": setting},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(next(x for x in result.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    assert answer["ready"]["status"] == "ready" and answer["ready"]["inference_precision"] == expected
    assert answer["call"] in CLASS_NAMES
    assert answer["tensorflow"] is False and answer["keras"] is False
