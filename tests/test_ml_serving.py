"""Lean serving: what the server imports, the inference precision, chunked views and the TTA measurements."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from app.ml.classifier import Classifier
from app.ml.colormap import INFERNO
from app.ml.evaluate import average_views, tta_choice
from app.ml.explain import MAX_OVERLAY_SIDE, heatmap_png
from app.ml.inference import Predictor, views
from app.ml.preprocessing import prepare_batch
from app.ml.runtime import VIEW_INDICES, cpu_has_bf16, resolve_precision

REPO = Path(__file__).resolve().parents[1]

# Builds the app, runs its start-up (migrations, model load) and asks /readyz, in a fresh interpreter.
SERVER_PROBE = r"""
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from app.config import Settings
from app.main import create_app

settings = Settings(data_dir=Path(sys.argv[1]), model_dir=Path(sys.argv[2]), database_url=None)
with TestClient(create_app(settings)) as client:
    ready = client.get("/readyz").json()
print("RESULT " + json.dumps({"ready": ready, "loaded": [m for m in ("matplotlib", "skimage") if m in sys.modules]}))
"""


def _probe(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Classifier:
    return Classifier.load(tiny_model_dir, precision="float32")


@pytest.fixture(scope="module")
def pixels(tiny, herlev_one_per_class) -> np.ndarray:
    return prepare_batch([path.read_bytes() for path in herlev_one_per_class.values()], tiny.spec)


@pytest.mark.slow
def test_the_server_starts_without_matplotlib_and_states_its_precision(tiny_model_dir, tmp_path):
    # bfloat16 forced: the setting reaches every load and /readyz (it runs, if slowly, on any CPU).
    env = {"PAPCAD_INFERENCE_PRECISION": "bfloat16"}
    result = _probe(SERVER_PROBE, str(tmp_path / "data"), str(tiny_model_dir), env=env)
    assert result["loaded"] == []
    assert result["ready"]["status"] == "ready"
    assert result["ready"]["inference_precision"] == "bfloat16"
    assert result["ready"]["tta"] == "dihedral8"


def test_calibration_maths_imports_neither_plotting_nor_fitting_libraries():
    script = (
        "import sys, json; import app.ml.calibration; "
        "print('RESULT ' + json.dumps([m for m in ('matplotlib', 'scipy', 'sklearn') if m in sys.modules]))"
    )
    assert _probe(script) == []


def test_cpu_capability_decides_auto(tmp_path, monkeypatch):
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_has_bf16(with_bf16) and not cpu_has_bf16(without) and not cpu_has_bf16(tmp_path / "missing")
    monkeypatch.setenv("PAPCAD_INFERENCE_PRECISION", "float32")
    assert resolve_precision() == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"
    monkeypatch.setattr("app.ml.runtime.cpu_has_bf16", lambda: False)
    assert resolve_precision("auto") == "float32"
    monkeypatch.setattr("app.ml.runtime.cpu_has_bf16", lambda: True)
    monkeypatch.setattr("app.ml.runtime.AUTO_BF16", True)
    assert resolve_precision("auto") == "bfloat16"
    monkeypatch.setattr("app.ml.runtime.AUTO_BF16", False)  # the bundled model misses bfloat16's bar
    assert resolve_precision("auto") == "float32"


def test_a_wrong_precision_setting_is_refused_as_such(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PAPCAD_INFERENCE_PRECISION", "fp8")
    with pytest.raises(ValueError, match="inference precision must be one of"):
        Classifier.load(tiny_model_dir)


@pytest.mark.slow
def test_bfloat16_runs_the_same_weights_in_bfloat16(tiny, tiny_model_dir, pixels):
    half = Classifier.load(tiny_model_dir, precision="bfloat16")
    assert half.predictor.precision == "bfloat16" and tiny.predictor.precision == "float32"
    conv = half.predictor.model.get_layer("resnet50").get_layer("conv1_conv")
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    for a, b in zip(half.predictor.model.weights, tiny.predictor.model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    full, low = tiny.predict_pixels(pixels), half.predict_pixels(pixels)
    np.testing.assert_allclose(low.sum(axis=1), 1.0, atol=1e-6)
    assert not np.array_equal(full, low)  # really computed in another precision
    np.testing.assert_allclose(low, full, atol=0.05)
    heat = half.heatmap(pixels[0], 3)  # Grad-CAM explains the bfloat16 network too
    assert np.all(np.isfinite(heat)) and heat.min() >= 0 and heat.max() <= 1


def test_chunking_the_views_changes_memory_not_results(tiny, pixels):
    whole = Predictor(tiny.predictor.model, "dihedral8", max_images=8 * len(pixels))
    chunked = Predictor(tiny.predictor.model, "dihedral8", max_images=3)
    assert (whole.cells_per_pass, chunked.cells_per_pass) == (len(pixels), 1)
    a, fa = whole.with_features(pixels)
    b, fb = chunked.with_features(pixels)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)


def test_flips4_is_the_four_flips_and_a_subset_of_dihedral8():
    batch = tf.constant(np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1))
    expected = [batch, tf.reverse(batch, [2]), tf.reverse(batch, [1]), tf.reverse(batch, [1, 2])]
    for got, want in zip(views(batch, "flips4"), expected, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    eight = [v.numpy().tobytes() for v in views(batch, "dihedral8")]
    assert len(set(eight)) == 8
    assert set(VIEW_INDICES["flips4"]) < set(VIEW_INDICES["dihedral8"])


@pytest.mark.slow
def test_tta_choice_states_accuracy_auc_and_cost_of_each_setting(tiny, pixels):
    per_view = Predictor(tiny.predictor.model, "dihedral8").per_view(pixels)[0]
    assert per_view.shape == (8, len(pixels), 7)
    np.testing.assert_allclose(average_views(per_view, "dihedral8"), tiny.predictor(pixels), atol=1e-6)
    np.testing.assert_allclose(
        average_views(per_view, "none"), Predictor(tiny.predictor.model, "none")(pixels), atol=1e-6
    )
    labels = np.arange(len(pixels)) % 7
    choice = tta_choice(tiny, (per_view, labels), (per_view, labels), pixels[:4])
    assert set(choice["settings"]) == {"none", "flips4", "dihedral8"}
    assert [row["views"] for row in choice["settings"].values()] == [1, 4, 8]
    assert choice["settings"]["none"]["relative_cost"] == 1.0
    assert all(row["ms_per_image"] > 0 for row in choice["settings"].values())
    assert choice["in_use"] == "dihedral8" and choice["recommended"] in choice["settings"]
    for tta, row in choice["settings"].items():
        accuracy = float((average_views(per_view, tta).argmax(1) == labels).mean())
        assert row["test"]["accuracy_7class"] == row["validation"]["accuracy_7class"] == pytest.approx(accuracy)


def test_the_colour_table_is_matplotlibs_inferno():
    import matplotlib

    table = (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(INFERNO, table)


def test_a_huge_upload_gets_a_bounded_heatmap(tiny, herlev_one_per_class):
    cell = Image.open(herlev_one_per_class["carcinoma_in_situ"]).convert("RGB")
    buffer = io.BytesIO()
    cell.resize((4000, 3000), Image.Resampling.BILINEAR).save(buffer, format="PNG")
    png = Image.open(io.BytesIO(heatmap_png(tiny.heatmap, buffer.getvalue(), tiny.spec, 2)))
    assert png.size == (MAX_OVERLAY_SIDE, 768)
    colours = np.asarray(png).reshape(-1, 3)
    assert {tuple(c) for c in np.unique(colours, axis=0)} <= {tuple(c) for c in INFERNO}
