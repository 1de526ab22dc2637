"""Image shifts do what their names say, every time; the robustness run scores a split under all of them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import cli
from app.ml.artifact import read_card, write_card
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.data import discover
from app.ml.shifts import border_colour, standard_shifts

SHIFT_NAMES = [
    "none", "stain_hed_weak", "stain_hed_strong", "hue_+0.05", "saturation_x1.5", "saturation_x0.5",
    "brightness_x1.2", "contrast_x0.7", "gamma_1.5", "defocus_blur_r2", "gaussian_noise_sd10", "jpeg_q30",
    "grayscale", "magnification_x0.75", "magnification_x1.5", "central_crop_60", "slide_field_x1.6",
    "window_100px", "window_160px",
]  # fmt: skip


@pytest.fixture(scope="module")
def cells(herlev_one_per_class) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in herlev_one_per_class.values()]


@pytest.fixture(scope="module")
def shifts(cells):
    return {s.name: s for s in standard_shifts(cells)}


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def saturation(image: Image.Image) -> float:
    return float(np.asarray(image.convert("HSV"))[..., 1].mean())


def sharpness(image: Image.Image) -> float:
    """Mean absolute difference between neighbouring pixels: falls when an image is blurred."""
    a = px(image.convert("L"))
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def test_the_suite_has_every_named_shift_and_each_is_deterministic(cells, shifts):
    assert list(shifts) == SHIFT_NAMES
    for shift in shifts.values():
        for cell in cells[:3]:
            first, second = shift(cell), shift(cell.copy())
            assert first.mode == "RGB"
            assert np.array_equal(px(first), px(second)), shift.name
            if shift.name != "none":
                assert not np.array_equal(px(first), px(cell)) or first.size != cell.size, shift.name
    # A fresh suite built from the same pool gives the same images.
    again = {s.name: s for s in standard_shifts(cells)}
    for name in ("stain_hed_strong", "gaussian_noise_sd10", "slide_field_x1.6"):
        assert np.array_equal(px(again[name](cells[0])), px(shifts[name](cells[0])))


def test_random_shifts_draw_differently_for_different_images(cells, shifts):
    a, b = cells[0].resize((60, 60)), cells[1].resize((60, 60))
    noise_a = px(shifts["gaussian_noise_sd10"](a)) - px(a)
    noise_b = px(shifts["gaussian_noise_sd10"](b)) - px(b)
    assert not np.allclose(noise_a, noise_b)
    assert 6 < np.abs(noise_a).mean() < 10  # SD 10 noise: mean |N| = 8, a little less after clipping


def test_colour_shifts_change_colour_as_named(cells, shifts):
    cell = cells[3]
    assert saturation(shifts["saturation_x1.5"](cell)) > saturation(cell) > saturation(shifts["saturation_x0.5"](cell))
    gray = px(shifts["grayscale"](cell))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    assert px(shifts["brightness_x1.2"](cell)).mean() > px(cell).mean()
    assert px(shifts["contrast_x0.7"](cell)).std() < px(cell).std()
    assert px(shifts["gamma_1.5"](cell)).mean() < px(cell).mean()
    hue_before = np.asarray(cell.convert("HSV"))[..., 0].astype(int)
    hue_after = np.asarray(shifts["hue_+0.05"](cell).convert("HSV"))[..., 0].astype(int)
    assert np.median((hue_after - hue_before) % 256) == pytest.approx(13, abs=2)  # 0.05 of a turn = 13/256
    weak = np.abs(px(shifts["stain_hed_weak"](cell)) - px(cell)).mean()
    strong = np.abs(px(shifts["stain_hed_strong"](cell)) - px(cell)).mean()
    assert 0 < weak < strong


def test_optical_shifts_blur_add_noise_and_compress(cells, shifts):
    cell = cells[2]
    assert sharpness(shifts["defocus_blur_r2"](cell)) < 0.7 * sharpness(cell)
    assert sharpness(shifts["gaussian_noise_sd10"](cell)) > sharpness(cell)
    jpeg = px(shifts["jpeg_q30"](cell))
    assert jpeg.shape == px(cell).shape and 0 < np.abs(jpeg - px(cell)).mean() < 20


def test_framing_shifts_keep_or_change_the_canvas_as_named(cells, shifts):
    cell = cells[0]
    w, h = cell.size
    smaller, larger = shifts["magnification_x0.75"](cell), shifts["magnification_x1.5"](cell)
    assert smaller.size == larger.size == cell.size
    # At 0.75x the edge of the canvas is the crop's border colour; at 1.5x the centre is magnified.
    assert tuple(px(smaller)[0, 0].astype(int)) == border_colour(cell)
    assert not np.array_equal(px(larger), px(cell))
    crop = shifts["central_crop_60"](cell)
    assert crop.size == (round(w * 0.6), round(h * 0.6))
    left, top = (w - crop.width) // 2, (h - crop.height) // 2
    assert np.array_equal(px(crop), px(cell)[top : top + crop.height, left : left + crop.width])
    field = shifts["slide_field_x1.6"](cell)
    assert field.size == (round(w * 1.6), round(h * 1.6))
    fx, fy = (field.width - w) // 2, (field.height - h) // 2
    assert np.array_equal(px(field)[fy : fy + h, fx : fx + w], px(cell))  # the cell itself, untouched
    outside = px(field).copy()
    outside[fy : fy + h, fx : fx + w] = np.array(border_colour(cell))
    # Parts of other cells lie on the background around it.
    assert (np.abs(outside - np.array(border_colour(cell))).sum(axis=2) > 30).mean() > 0.05


def test_fixed_windows_have_one_size_whatever_the_cell(cells, shifts):
    """A large cell is cut to its centre; a small one keeps its true scale on a field with parts of other cells."""
    large = max(cells, key=lambda c: min(c.size))
    small = min(cells, key=lambda c: max(c.size))
    assert min(large.size) > 160 and max(small.size) < 100  # Herlev's superficial and carcinoma cells
    for name, side in (("window_100px", 100), ("window_160px", 160)):
        cut = shifts[name](large)
        assert cut.size == (side, side)
        left, top = (large.width - side) // 2, (large.height - side) // 2
        assert np.array_equal(px(cut), px(large)[top : top + side, left : left + side])
        placed = shifts[name](small)
        assert placed.size == (side, side)
        x, y = (side - small.width) // 2, (side - small.height) // 2
        assert np.array_equal(px(placed)[y : y + small.height, x : x + small.width], px(small))
        outside = px(placed).copy()
        outside[y : y + small.height, x : x + small.width] = np.array(border_colour(small))
        assert (np.abs(outside - np.array(border_colour(small))).sum(axis=2) > 30).mean() > 0.05


@pytest.fixture(scope="module")
def small_herlev(herlev_dir, tmp_path_factory) -> Path:
    """Five images per class, laid out like the Herlev folder (enough groups for a grouped 5-fold split)."""
    root = tmp_path_factory.mktemp("herlev_small")
    for name in CLASS_NAMES:
        (root / name).mkdir()
        for path in sorted((herlev_dir / name).glob("*.BMP"))[::12][:5]:
            shutil.copy(path, root / name / path.name)
    return root


@pytest.mark.slow
def test_robustness_run_writes_every_shift_with_plausible_metrics(tiny_model_dir, small_herlev, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    card = read_card(model_dir)
    card["data"] = {"fingerprint_sha256": discover(small_herlev).fingerprint(), "split": {"seed": 1234, "val_folds": 2}}
    write_card(model_dir, card)
    out = tmp_path / "robustness.json"

    result = CliRunner().invoke(
        cli, ["robustness", "--model", str(model_dir), "--data", str(small_herlev), "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {r["shift"]: r for r in report["shifts"]}
    assert list(rows) == SHIFT_NAMES
    assert report["split"] == "test" and report["n"] >= 4 and report["abnormal_threshold"] == 0.5
    for row in rows.values():
        assert 0 <= row["accuracy_7class"] <= 1
        assert row["roc_auc"] is None or 0 <= row["roc_auc"] <= 1
        for key in ("sensitivity", "specificity"):
            assert row[key] is None or 0 <= row[key] <= 1
        assert row["in_distribution"] is None  # the tiny model has no OOD model
        if row["accuracy_7class"] is not None:
            assert row["delta"]["accuracy_7class"] == pytest.approx(
                row["accuracy_7class"] - rows["none"]["accuracy_7class"], abs=1e-6
            )
    assert all(v in (0, None) for v in rows["none"]["delta"].values())
    assert "| grayscale |" in result.output  # the markdown table
    assert (model_dir / "robustness.png").stat().st_size > 10_000
    updated = read_card(model_dir)
    assert set(updated["robustness"]["shifts"]) == set(SHIFT_NAMES)
    assert Classifier.load(model_dir).weights_sha256 == card["weights_sha256"]  # the card still matches


def test_robustness_refuses_an_unknown_split(tiny_model_dir, small_herlev):
    result = CliRunner().invoke(
        cli, ["robustness", "--model", str(tiny_model_dir), "--data", str(small_herlev), "--split", "train"]
    )
    assert result.exit_code == 2 and "--split must be one of: test, validation" in result.output
