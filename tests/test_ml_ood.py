"""The "not a typical cell" guard: input checks, the feature distance, and the shipped model refusing non-cells."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import DEFAULT_MODEL_DIR
from app.errors import ModelIntegrityError
from app.ml.artifact import read_card, sha256_file, write_card
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.data import discover
from app.ml.input_checks import input_flags
from app.ml.ood import OOD_FILE, FeatureDistance
from app.ml.ood_fit import fit_ood_model_dir
from app.ml.ood_sets import ood_sets


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- input checks -----------------------------------------------------------------------------------------------


def flags_of(data: bytes | Image.Image) -> list[str]:
    from app.ml.input_checks import as_sent
    from app.ml.preprocessing import decode_image

    return input_flags(as_sent(data), decode_image(data))


def test_input_checks_name_what_is_odd(non_cell_images):
    inputs = non_cell_images
    assert any("too small (1x1 px" in f for f in flags_of(inputs["1x1 image"]))
    assert any("nearly uniform" in f for f in flags_of(inputs["flat grey square"]))
    assert any("16-bit image (mode I;16)" in f for f in flags_of(inputs["16-bit gradient"]))
    assert flags_of(inputs["random noise"]) == []  # noise is for the feature-space score to catch
    opaque = Image.fromarray(np.random.default_rng(2).integers(0, 256, (80, 80, 3), dtype=np.uint8)).convert("RGBA")
    assert flags_of(png(opaque)) == []  # an alpha channel that hides nothing is fine
    transparent = opaque.copy()
    transparent.putpixel((3, 3), (0, 0, 0, 0))
    assert flags_of(png(transparent)) == ["transparent pixels (alpha channel)"]
    palette = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 80, 3), dtype=np.uint8)).quantize(16)
    assert any("palette image" in f for f in flags_of(png(palette)))
    assert any(
        "extreme aspect ratio (10.0:1)" in f for f in flags_of(png(Image.effect_noise((400, 40), 40).convert("RGB")))
    )
    assert any("grayscale" in f for f in flags_of(png(Image.effect_noise((80, 80), 40))))
    # Decoded to 8-bit RGB first (as a single upload is), the 16-bit gradient is clipped to mostly white.
    clipped = Image.open(io.BytesIO(inputs["16-bit gradient"])).convert("RGB")
    assert flags_of(clipped) == ["mostly white (100% of pixels): over-exposed or clipped"]
    dark = np.zeros((100, 100, 3), dtype=np.uint8)
    dark[:10] = 200  # a bright band: not flat, but 90 % black
    assert flags_of(Image.fromarray(dark)) == ["mostly black (90% of pixels): under-exposed or clipped"]


def test_herlev_cells_raise_no_input_flag(herlev_one_per_class):
    for path in herlev_one_per_class.values():
        assert flags_of(path.read_bytes()) == [], path.name


# --- the distance ---------------------------------------------------------------------------------------------


def test_feature_distance_keeps_95_percent_of_validation_and_rejects_far_points(tmp_path: Path):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 16))
    labels = np.repeat(np.arange(3), 200)
    train = centres[labels] + rng.normal(0, 1, (600, 16))
    val = centres[np.repeat(np.arange(3), 100)] + rng.normal(0, 1, (300, 16))
    distance = FeatureDistance.fit(train, labels).with_cutoff(val)
    assert np.mean(distance.scores(val) <= 1.0) == pytest.approx(0.95, abs=0.005)
    far = centres[:1] + 8.0
    midway = centres[:2].mean(axis=0, keepdims=True)  # near neither class: class-conditional sees it
    assert distance.scores(far)[0] > 1 and distance.scores(midway)[0] > 1
    distance.save(tmp_path / OOD_FILE)
    loaded = FeatureDistance.load(tmp_path / OOD_FILE)
    assert loaded.dims == (16,) and loaded.stages[0].precision.dtype == np.float32
    assert np.allclose(loaded.scores(val), distance.scores(val), rtol=1e-4)
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not an OOD model"):
        FeatureDistance.load(tmp_path / "other.npz")


def test_a_point_typical_in_the_last_stage_but_not_in_an_earlier_one_is_not_typical(tmp_path: Path):
    """The case the stages are for: what the final features learnt to ignore, an earlier stage still sees."""
    rng = np.random.default_rng(1)
    early_centres, late_centres = rng.normal(0, 5, (2, 8)), rng.normal(0, 5, (2, 32))
    labels = np.repeat(np.arange(2), 300)

    def cells(classes: np.ndarray) -> np.ndarray:
        n = len(classes)
        return np.c_[
            early_centres[classes] + rng.normal(0, 1, (n, 8)), late_centres[classes] + rng.normal(0, 1, (n, 32))
        ]

    distance = FeatureDistance.fit(cells(labels), labels, dims=(8, 32)).with_cutoff(cells(np.repeat([0, 1], 200)))
    assert distance.dims == (8, 32)
    assert np.mean(distance.scores(cells(np.repeat([0, 1], 500))) <= 1.0) == pytest.approx(0.95, abs=0.02)
    odd = cells(np.array([0]))
    odd[0, :8] += 10.0  # unlike any cell in the early stage, an ordinary cell in the last one
    assert distance.stages[1].distances(odd[:, 8:])[0] < distance.stages[1].scale
    assert distance.scores(odd)[0] > 1
    distance.save(tmp_path / OOD_FILE)
    assert FeatureDistance.load(tmp_path / OOD_FILE).scores(odd)[0] == pytest.approx(distance.scores(odd)[0], rel=1e-4)
    with pytest.raises(ValueError, match="columns"):
        distance.scores(odd[:, 8:])


def test_ood_sets_are_deterministic_and_complete(herlev_one_per_class):
    crops = [Image.open(p) for p in herlev_one_per_class.values()]
    first, second = ood_sets(crops, n=3), ood_sets(crops, n=3)
    assert set(first) == {
        "uniform_noise", "gaussian_noise", "smooth_gradient", "rendered_text", "photograph", "slide_background",
        "flat_square",
    }  # fmt: skip
    for name in first:
        assert len(first[name]) == 3
        for a, b in zip(first[name], second[name], strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), name


# --- the shipped model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refitted_model(herlev_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The shipped network with an OOD model fitted on a small, class-spread subset of each split."""
    model_dir = tmp_path_factory.mktemp("shipped_copy")
    for name in ("weights.npz", "model_card.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, model_dir / name)
    card = read_card(model_dir)
    card.pop("ood", None)
    card.pop("serving", None)  # the int8 network is not copied: this copy runs on Keras
    write_card(model_dir, card)
    section = fit_ood_model_dir(model_dir, discover(herlev_dir), limit=21)
    return model_dir, section


@pytest.mark.slow  # fits the OOD model of the shipped network on a subset of Herlev
def test_fit_writes_a_verified_ood_file_and_its_numbers(refitted_model):
    model_dir, section = refitted_model
    card = read_card(model_dir)
    assert card["ood"] == section and section["file"] == OOD_FILE
    assert section["sha256"] == sha256_file(model_dir / OOD_FILE)
    assert card["weights_sha256"] == sha256_file(model_dir / "weights.npz")
    evaluation = section["evaluation"]
    assert set(evaluation["sets"]) == set(ood_sets([Image.new("RGB", (40, 40))], n=1))
    assert 0.5 < evaluation["auroc_overall"] <= 1 and evaluation["auroc_overall_with_input_checks"] >= 0.5
    assert section["limit"] == 21 and section["fitted_on"]["n"] <= 21
    classifier = Classifier.load(model_dir)
    assert classifier.ood is not None and classifier.ood.cutoff == pytest.approx(section["cutoff"]["score"])


@pytest.mark.parametrize(
    "refit", [pytest.param(True, marks=pytest.mark.slow), False], ids=["refitted-on-a-subset", "shipped-ood-file"]
)
def test_named_non_cells_are_out_of_distribution_or_flagged(refit, request, non_cell_images):
    model_dir = request.getfixturevalue("refitted_model")[0] if refit else DEFAULT_MODEL_DIR
    classifier = Classifier.load(model_dir)
    inputs = non_cell_images
    for name, prediction in zip(inputs, classifier.predict(list(inputs.values())), strict=True):
        assert prediction.in_distribution is not None, name
        assert prediction.in_distribution is False or prediction.input_flags, (name, prediction)
    noise = classifier.predict([inputs["random noise"]])[0]
    assert noise.in_distribution is False and noise.ood_score > 1  # caught by the features, not by the checks


@pytest.mark.slow
def test_shipped_model_calls_most_herlev_cells_typical(herlev_dir):
    classifier = Classifier.load(DEFAULT_MODEL_DIR)
    paths = [p for name in CLASS_NAMES for p in sorted((herlev_dir / name).glob("*.BMP"))[:3]]
    predictions = classifier.predict([p.read_bytes() for p in paths])
    assert np.mean([p.in_distribution for p in predictions]) >= 0.85
    assert all(p.input_flags == [] and 0 < p.ood_score for p in predictions)


@pytest.mark.slow
def test_a_tampered_ood_file_is_refused_and_a_model_without_one_still_loads(
    refitted_model, tiny_model_dir, tmp_path, non_cell_images
):
    broken = tmp_path / "broken"
    shutil.copytree(refitted_model[0], broken)
    with open(broken / OOD_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelIntegrityError, match="out-of-distribution file .* SHA-256"):
        Classifier.load(broken)
    (broken / OOD_FILE).unlink()
    with pytest.raises(ModelIntegrityError, match="out-of-distribution file missing"):
        Classifier.load(broken)
    tiny = Classifier.load(tiny_model_dir)
    assert tiny.ood is None
    prediction = tiny.predict([non_cell_images["1x1 image"]])[0]
    assert prediction.in_distribution is None and prediction.ood_score is None
    assert prediction.input_flags and "too small" in prediction.input_flags[0]
