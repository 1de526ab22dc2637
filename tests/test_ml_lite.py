"""The int8 network on LiteRT: export, its check, loading it, and a server that runs without TensorFlow."""

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
from app.ml.artifact import read_card, sha256_file, write_card
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.export import INT8_FILE, export_int8
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
    section = export_int8(model_dir, pixels, labels, "three cells per class")
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
    assert section["auto"] == ("int8" if check["passed"] else "float32")
    assert check["passed"] == (check["points_lost_7class"] <= 0.5 and check["points_lost_sensitivity"] <= 0.5)


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
    assert resolve_precision("auto", with_int8) == "int8"
    assert resolve_precision("auto", failed_check) == "float32"
    assert resolve_precision("auto", {}) == "float32"
    assert resolve_precision("int8", failed_check) == "int8"  # asked for: runs even if auto would not
    assert resolve_precision("int8", {}) == "float32"  # an older model without the file still serves
    assert resolve_precision("float32", with_int8) == "float32"


@pytest.mark.slow  # a server start-up in a fresh interpreter
def test_the_bundled_model_serves_int8_without_tensorflow(tmp_path, herlev_one_per_class):
    """Its int8 network is bundled and checked; "auto" serves it only if it passed that check, "int8" always."""
    card = read_card(DEFAULT_MODEL_DIR)
    assert (DEFAULT_MODEL_DIR / card["serving"]["int8"]["file"]).is_file()
    assert card["serving"]["auto"] == ("int8" if card["serving"]["check"]["passed"] else "float32")
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
        env=os.environ | {"PAPCAD_INFERENCE_PRECISION": "int8"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(next(x for x in result.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    assert answer["ready"]["status"] == "ready" and answer["ready"]["inference_precision"] == "int8"
    assert answer["call"] in CLASS_NAMES
    assert answer["tensorflow"] is False and answer["keras"] is False
