"""The `papcad` command line (app.cli), run as a real subprocess: `python -m app.cli ...`.

Failures must be one clear `error:` line and a non-zero exit code, never a traceback.
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.ml.artifact import CARD_FILE, WEIGHTS_FILE, read_card, sha256_file
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_PER_CLASS = 12  # enough for the default split: 5 test folds, then 8 validation folds per class


def papcad(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    assert "error:" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def last_json_block(stdout: str) -> dict:
    """The indented JSON object the command prints last (Keras may print epoch lines before it)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _generated_folder(root: Path, classes, per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{500 + 10 * c + i}-1-001.png").write_bytes(_png(10 * c + i))
    return root


# --- predict ------------------------------------------------------------------------------------


def test_predict_prints_one_json_line_per_image(tiny_model_dir, herlev_one_per_class):
    image = herlev_one_per_class["severe_dysplastic"]
    result = papcad("predict", "--model", tiny_model_dir, image)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["file"] == str(image)
    assert record["predicted_class"] in CLASS_NAMES
    assert record["model_version"] == read_card(tiny_model_dir)["version"]
    # The same call as the in-process Classifier makes, to the printed precision.
    expected = Classifier.load(tiny_model_dir).predict([image.read_bytes()])[0]
    assert record["predicted_class"] == expected.predicted_class
    assert record["probabilities"] == pytest.approx(expected.probabilities, abs=2e-6)
    assert record["abnormal_probability"] == pytest.approx(expected.abnormal_probability, abs=2e-6)


def test_predict_reports_bad_files_without_a_traceback(tiny_model_dir, tmp_path):
    not_an_image = tmp_path / "cell.bmp"
    not_an_image.write_text("this is a text file, not a cell image\n")
    missing = tmp_path / "missing.bmp"
    result = papcad("predict", "--model", tiny_model_dir, not_an_image, missing)
    assert_clean_failure(result, 1, str(not_an_image))
    assert f"error: {missing}: no such file" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [r["file"] for r in records] == [str(not_an_image), str(missing)]
    assert "not an image" in records[0]["error"]
    assert all("predicted_class" not in r for r in records)


# --- train / evaluate refusals ------------------------------------------------------------------


def test_train_refuses_a_folder_without_class_folders(tmp_path):
    data = _generated_folder(tmp_path / "data", ["cats", "dogs"])
    result = papcad("train", "--data", data, "--out", tmp_path / "m", "--epochs", 1, "--image-size", 32)
    assert_clean_failure(result, 2, "none of the class folders")
    assert not (tmp_path / "m" / WEIGHTS_FILE).exists()


def test_train_refuses_a_folder_missing_one_class(tmp_path):
    data = _generated_folder(tmp_path / "data", CLASS_NAMES[:-1])
    result = papcad("train", "--data", data, "--out", tmp_path / "m", "--epochs", 1, "--image-size", 32)
    assert_clean_failure(result, 2, "carcinoma_in_situ")


def test_train_refuses_a_folder_too_small_to_split(tmp_path):
    data = _generated_folder(tmp_path / "data", CLASS_NAMES, per_class=3)
    result = papcad("train", "--data", data, "--out", tmp_path / "m", "--epochs", 1, "--image-size", 32)
    assert_clean_failure(result, 2, "too few")


@pytest.mark.parametrize(
    "option, message", [(["--recipe", "nope"], "unknown recipe 'nope'"), (["--fit", "crop"], "--fit must be")]
)
def test_train_refuses_unknown_options(option, message, tmp_path):
    result = papcad("train", "--data", tmp_path, "--out", tmp_path / "m", *option)
    assert_clean_failure(result, 2, message)


def test_evaluate_refuses_a_missing_model_directory(tmp_path, herlev_dir):
    result = papcad("evaluate", "--model", tmp_path / "no_such_model", "--data", herlev_dir)
    assert_clean_failure(result, 2, CARD_FILE)


# --- a real, tiny training run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(herlev_dir, tmp_path_factory) -> Path:
    """IMAGES_PER_CLASS real Herlev images per class, no two sharing a group prefix."""
    root = tmp_path_factory.mktemp("tiny_herlev") / "herlev"
    with open(herlev_dir / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    used_groups: set[str] = set()
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True)
        picked = 0
        for row in rows:
            if row["class"] == name and row["group_prefix"] not in used_groups and picked < IMAGES_PER_CLASS:
                used_groups.add(row["group_prefix"])
                shutil.copy(herlev_dir / row["path"], root / row["path"])
                picked += 1
        assert picked == IMAGES_PER_CLASS
    return root


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> tuple[Path, dict, dict]:
    """Run `papcad train` once: (model dir, metrics it printed, its card right after training)."""
    out = tmp_path_factory.mktemp("train") / "m"
    result = papcad("train", "--data", tiny_dataset, "--out", out, "--epochs", 1, "--image-size", 32)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return out, last_json_block(result.stdout), read_card(out)


def test_train_writes_an_evaluated_model_directory(trained):
    out, printed, card = trained
    assert card["version"] == "m"
    assert card["weights_sha256"] == sha256_file(out / WEIGHTS_FILE)
    assert card["input"]["size"] == 32
    assert card["data"]["images"] == len(CLASS_NAMES) * IMAGES_PER_CLASS
    split = card["data"]["split"]
    assert split["train"] + split["val"] + split["test"] == card["data"]["images"]
    assert split["val"] > 0 and split["test"] > 0

    metrics = card["metrics"]
    assert metrics == printed
    assert metrics["split"] == "test" and metrics["n"] == split["test"]
    assert metrics["tta"] == card["tta"]
    for key in ("accuracy_7class", "macro_f1", "binary_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    for name in ("training_curves.png", "test_confusion_7class.png", "test_confusion_binary.png"):
        assert (out / name).stat().st_size > 1000, name
        assert Image.open(out / name).format == "PNG"
    assert set(json.loads((out / "history.json").read_text())) >= {"accuracy", "loss", "val_accuracy", "val_loss"}
    assert json.loads((out / "test_metrics.json").read_text())["n"] == metrics["n"]


def test_evaluate_reproduces_the_training_metrics(trained, tiny_dataset):
    out, _, card = trained
    result = papcad("evaluate", "--model", out, "--data", tiny_dataset)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = last_json_block(result.stdout)
    assert printed.keys() == card["metrics"].keys()
    for key, value in card["metrics"].items():
        if isinstance(value, float):
            assert printed[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert printed[key] == value, key
    assert read_card(out)["metrics"] == printed
    assert read_card(out)["weights_sha256"] == card["weights_sha256"]


def test_evaluate_refuses_data_the_model_was_not_trained_on(trained, tiny_dataset, tmp_path):
    out, _, _ = trained
    other = tmp_path / "herlev"
    shutil.copytree(tiny_dataset, other)
    next((other / "light_dysplastic").iterdir()).unlink()
    result = papcad("evaluate", "--model", out, "--data", other)
    assert_clean_failure(result, 2, "fingerprint differs")
