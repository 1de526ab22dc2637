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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.ml.artifact import CARD_FILE, WEIGHTS_FILE, read_card, sha256_file
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier

pytestmark = [pytest.mark.slow, pytest.mark.cli]  # a real tiny training run and ten `papcad` start-ups

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


# --- every command run once, side by side -------------------------------------------------------
#
# Each run is mostly TensorFlow's start-up and graph building, so they run a few at a time: the
# longest chain (train, then evaluate its model twice) and the cross-validation start first, and
# the short runs share the third slot; the tests below only read the results.


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
def cli_inputs(tmp_path_factory, herlev_dir, herlev_one_per_class, tiny_model_dir, tiny_dataset) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    not_an_image = root / "cell.bmp"
    not_an_image.write_text("this is a text file, not a cell image\n")
    return {
        "root": root,
        "herlev": herlev_dir,
        "tiny_model": tiny_model_dir,
        "tiny_dataset": tiny_dataset,
        "image": herlev_one_per_class["severe_dysplastic"],
        "not_an_image": not_an_image,
        "missing_file": root / "missing.bmp",
        "no_class_folders": _generated_folder(root / "no_class_folders", ["cats", "dogs"]),
        "one_class_missing": _generated_folder(root / "one_class_missing", CLASS_NAMES[:-1]),
        "too_small": _generated_folder(root / "too_small", CLASS_NAMES, per_class=3),
        "trained_model": root / "m",
    }


def _train_then_evaluate(i: dict[str, Path], tiny_train: list) -> dict[str, subprocess.CompletedProcess]:
    """`papcad train`; then `papcad evaluate` on its data, and (on a copy of the model) on data with one image
    fewer. The card as training wrote it is kept beside, since evaluating rewrites it."""
    out = i["trained_model"]
    results = {"train": papcad("train", "--data", i["tiny_dataset"], "--out", out, *tiny_train)}
    if results["train"].returncode != 0:
        return results
    shutil.copy(out / CARD_FILE, i["root"] / "card_after_training.json")
    other_data = shutil.copytree(i["tiny_dataset"], i["root"] / "evaluate" / "herlev")
    next((other_data / "light_dysplastic").iterdir()).unlink()
    model_copy = shutil.copytree(out, i["root"] / "evaluate" / "m")
    shifted = shutil.copytree(out, i["root"] / "evaluate" / "shifted")
    results["evaluate_same_data"] = papcad("evaluate", "--model", out, "--data", i["tiny_dataset"])
    results["evaluate_other_data"] = papcad("evaluate", "--model", model_copy, "--data", other_data)
    results["evaluate_under_shifts"] = papcad(
        "evaluate", "--model", shifted, "--data", i["tiny_dataset"], "--cutoff-under-shifts"
    )
    shutil.copy(shifted / CARD_FILE, i["root"] / "card_under_shifts.json")
    results["evaluate_again"] = papcad("evaluate", "--model", shifted, "--data", i["tiny_dataset"])
    return results


@pytest.fixture(scope="module")
def runs(cli_inputs) -> dict[str, subprocess.CompletedProcess]:
    i = cli_inputs
    tiny_train = ["--epochs", 1, "--image-size", 32]
    commands = {  # longest first: the pool starts them in this order
        "cross_validate": ["train", "--data", i["tiny_dataset"], "--out", i["root"] / "cv", "--cv", 2, *tiny_train],
        "predict": ["predict", "--model", i["tiny_model"], i["image"]],
        "predict_bad_files": ["predict", "--model", i["tiny_model"], i["not_an_image"], i["missing_file"]],
        "train_no_class_folders": ["train", "--data", i["no_class_folders"], "--out", i["root"] / "a", *tiny_train],
        "train_one_class_missing": ["train", "--data", i["one_class_missing"], "--out", i["root"] / "b", *tiny_train],
        "train_too_small": ["train", "--data", i["too_small"], "--out", i["root"] / "c", *tiny_train],
        "train_unknown_recipe": ["train", "--data", i["tiny_dataset"], "--out", i["root"] / "d", "--recipe", "nope"],
        "evaluate_missing_model": ["evaluate", "--model", i["root"] / "no_such_model", "--data", i["herlev"]],
        "record_cv_not_run": ["record-cv", "--model", i["tiny_model"], "--cv", i["root"] / "no_cv_here"],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        chain = pool.submit(_train_then_evaluate, i, tiny_train)
        futures = {name: pool.submit(papcad, *args) for name, args in commands.items()}
        return {**chain.result(), **{name: future.result() for name, future in futures.items()}}


# --- predict ------------------------------------------------------------------------------------


def test_predict_prints_one_json_line_per_image(runs, cli_inputs):
    result, image, tiny_model = runs["predict"], cli_inputs["image"], cli_inputs["tiny_model"]
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["file"] == str(image)
    assert record["predicted_class"] in CLASS_NAMES
    assert record["model_version"] == read_card(tiny_model)["version"]
    # The same call as the in-process Classifier makes, to the printed precision.
    expected = Classifier.load(tiny_model).predict([image.read_bytes()])[0]
    assert record["predicted_class"] == expected.predicted_class
    assert record["probabilities"] == pytest.approx(expected.probabilities, abs=2e-6)
    assert record["abnormal_probability"] == pytest.approx(expected.abnormal_probability, abs=2e-6)


def test_predict_reports_bad_files_without_a_traceback(runs, cli_inputs):
    result, not_an_image, missing = runs["predict_bad_files"], cli_inputs["not_an_image"], cli_inputs["missing_file"]
    assert_clean_failure(result, 1, f"error: {not_an_image}: ")
    assert f"error: {missing}: no such file" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [r["file"] for r in records] == [str(not_an_image), str(missing)]
    assert "not an image" in records[0]["error"]
    assert all("predicted_class" not in r for r in records)


# --- train / evaluate refusals ------------------------------------------------------------------


def test_train_refuses_a_folder_without_class_folders(runs, cli_inputs):
    assert_clean_failure(runs["train_no_class_folders"], 2, "none of the class folders")
    assert not (cli_inputs["root"] / "a" / WEIGHTS_FILE).exists()


def test_train_refuses_a_folder_missing_one_class(runs):
    assert_clean_failure(runs["train_one_class_missing"], 2, "lacks the class folder(s): carcinoma_in_situ")


def test_train_refuses_a_folder_too_small_to_split(runs):
    assert_clean_failure(runs["train_too_small"], 2, "too few for a grouped")


def test_train_refuses_an_unknown_recipe(runs):
    assert_clean_failure(runs["train_unknown_recipe"], 2, "unknown recipe 'nope'")


def test_evaluate_refuses_a_missing_model_directory(runs, cli_inputs):
    assert_clean_failure(runs["evaluate_missing_model"], 2, f"no {CARD_FILE} in model directory")
    assert str(cli_inputs["root"] / "no_such_model") in runs["evaluate_missing_model"].stderr


# --- a real, tiny training run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(runs, cli_inputs) -> tuple[Path, dict, dict]:
    """The `papcad train` run: (model dir, metrics it printed, its card right after training)."""
    result, out = runs["train"], cli_inputs["trained_model"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return (
        out,
        last_json_block(result.stdout),
        json.loads((cli_inputs["root"] / "card_after_training.json").read_text()),
    )


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
    assert Image.open(out / "test_reliability.png").format == "PNG"
    assert card["calibration"]["temperature"] > 0
    assert {"ece_before", "ece_after", "brier_before", "brier_after"} <= set(card["calibration"]["test"])
    assert 0.0 <= card["abnormal_threshold"]["value"] <= 1.0
    assert card["abnormal_threshold"]["chosen_on"] == "validation"
    assert json.loads((out / "test_metrics.json").read_text())["n"] == metrics["n"]


@pytest.fixture(scope="module")
def evaluations(runs, trained) -> dict[str, subprocess.CompletedProcess]:
    """`papcad evaluate` on the training data, and (on a copy of the model) on data with one image fewer."""
    return {"same_data": runs["evaluate_same_data"], "other_data": runs["evaluate_other_data"]}


def test_evaluate_reproduces_the_training_metrics(trained, evaluations):
    out, _, card = trained
    result = evaluations["same_data"]
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


def test_evaluate_can_choose_the_cutoff_on_shifted_validation_cells_and_keeps_that_basis(runs, cli_inputs):
    from app.ml.evaluate import SHIFTED_BASIS, TARGET_SENSITIVITY
    from app.ml.shifts import standard_shifts

    for name in ("evaluate_under_shifts", "evaluate_again"):
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    cutoff = json.loads((cli_inputs["root"] / "card_under_shifts.json").read_text())["abnormal_threshold"]
    assert cutoff["chosen_on"] == SHIFTED_BASIS
    shifted = cutoff["validation_under_shifts"]
    assert shifted["shifts"] == len(standard_shifts([])) - 1  # every shift of the suite but "none"
    assert 0.0 <= shifted["lowest_shift_sensitivity"] <= shifted["shifted_sensitivity"] <= 1.0
    # Each condition holds the same validation cells, so the pooled sensitivity is the mean over conditions.
    pooled = (cutoff["validation_sensitivity"] + shifted["shifts"] * shifted["shifted_sensitivity"]) / (
        shifted["shifts"] + 1
    )
    assert pooled >= TARGET_SENSITIVITY - 1e-9
    # A later evaluate without the option chooses on the same basis, so it gives the same cut-off.
    again = read_card(cli_inputs["root"] / "evaluate" / "shifted")["abnormal_threshold"]
    assert again["chosen_on"] == SHIFTED_BASIS
    assert again["value"] == pytest.approx(cutoff["value"])


def test_grouped_cross_validation_runs_every_fold(runs, cli_inputs):
    result = runs["cross_validate"]
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((cli_inputs["root"] / "cv" / "cv_metrics.json").read_text())
    assert report["k"] == 2 and len(report["folds"]) == 2
    cells = report["cells"]  # the test split stays out of every fold; each development image is held out once
    assert cells["development"] + cells["test"] == len(CLASS_NAMES) * IMAGES_PER_CLASS
    assert sum(fold["n"] for fold in report["folds"]) == cells["development"]
    assert report["test"]["ensemble"]["n"] == cells["test"]
    for name in ("accuracy_7class", "macro_f1", "binary_accuracy"):
        summary = report["summary"][name]
        assert len(summary["folds"]) == 2 and summary["mean"] == pytest.approx(np.mean(summary["folds"]))
    assert last_json_block(result.stdout) == report["summary"]


def test_record_cv_refuses_a_folder_without_a_finished_cross_validation(runs, cli_inputs):
    assert_clean_failure(runs["record_cv_not_run"], 2, "no finished cross-validation")
    assert "cross_validation" not in read_card(cli_inputs["tiny_model"])


def test_evaluate_refuses_data_the_model_was_not_trained_on(evaluations):
    assert_clean_failure(evaluations["other_data"], 2, "fingerprint differs")


# --- cross-validation of a recipe that starts from another model ---------------------------------------------


@pytest.fixture(scope="module")
def two_stage_recipe(tiny_model_dir, tmp_path_factory):
    """A tiny 'robust_windows' recipe starting from a model whose card records a tiny 'default' recipe."""
    from app.ml.preprocessing import InputSpec
    from app.ml.recipes import DEFAULT, ROBUST_WINDOWS

    tiny = {"epochs": 1, "warmup_epochs": 0, "input": InputSpec(size=32, fit="resize"), "tta": "none"}
    first = DEFAULT.with_overrides(**tiny)
    starting = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("starting") / "m")
    card = read_card(starting)
    card["recipe"] = first.to_dict()
    (starting / CARD_FILE).write_text(json.dumps(card))
    return first, ROBUST_WINDOWS.with_overrides(**tiny, init_from=str(starting))


def test_a_starting_models_recipe_is_read_from_its_card(two_stage_recipe):
    from app.ml.cross_validation import recipe_stages

    first, second = two_stage_recipe
    stages = recipe_stages(second)
    assert [s.to_dict() for s in stages] == [first.to_dict(), second.to_dict()]


def test_cross_validation_retrains_every_stage_per_fold_and_resumes(two_stage_recipe, tiny_dataset, tmp_path, capsys):
    """The starting model saw other folds' held-out cells, so each fold trains both stages; a rerun keeps the
    folds already scored (a fold file whose recipe differs is redone). Each fold's network is kept and scored on
    the test split, alone and in the ensemble."""
    from app.ml.classifier import keras_network
    from app.ml.cross_validation import cross_validate
    from app.ml.data import discover, fixed_split, load_arrays
    from app.ml.evaluation import compute_metrics
    from app.ml.inference import Predictor

    _, recipe = two_stage_recipe
    dataset = discover(tiny_dataset)
    report = cross_validate(dataset, recipe, 2, tmp_path)
    captured = capsys.readouterr()
    printed = captured.out
    assert printed.count("stage 1/2: recipe default") == 2 and printed.count("stage 2/2: recipe robust_windows") == 2
    assert captured.err.count("cutting windows: 100%") == 2  # each fold cuts windows of its own training cells
    assert [s["name"] for s in report["stages"]] == ["default", "robust_windows"]
    test = fixed_split(dataset, recipe.seed, val_folds=recipe.val_folds).test
    assert sum(fold["n"] for fold in report["folds"]) == len(dataset.samples) - len(test)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cv_metrics.json",
        "fold_1_of_2.json",
        "fold_1_of_2.weights.npz",
        "fold_2_of_2.json",
        "fold_2_of_2.weights.npz",
    ]
    minutes = report["minutes_by_fold"]
    assert len(minutes) == 2 and all(m >= 0 for m in minutes)
    records = [json.loads((tmp_path / f"fold_{n}_of_2.json").read_text()) for n in (1, 2)]
    for record in records:
        assert sha256_file(tmp_path / record["weights"]) == record["weights_sha256"]
        assert record["test_metrics"]["n"] == len(test)
    # The kept weights are the network that was scored, in float32 as the server runs it.
    pixels, _ = load_arrays(dataset.subset(test), recipe.input, progress=False)
    card = {"input": {**recipe.input.to_dict(), "normalization": recipe.normalization}, "recipe": recipe.to_dict()}
    kept = keras_network(card, tmp_path / records[0]["weights"])
    assert np.allclose(Predictor(kept, recipe.tta)(pixels), records[0]["test_probabilities"], atol=1e-4)
    mean = np.mean([r["test_probabilities"] for r in records], axis=0)
    assert report["test"]["ensemble"] == compute_metrics(dataset.labels[test], mean)
    assert report["test"]["single_networks"]["accuracy_7class"]["folds"] == [
        r["test_metrics"]["multiclass"]["accuracy"] for r in records
    ]

    record = json.loads((tmp_path / "fold_2_of_2.json").read_text())
    assert record["minutes"] == minutes[1]
    (tmp_path / "fold_2_of_2.json").write_text(json.dumps({**record, "key": "another recipe"}))
    again = cross_validate(dataset, recipe, 2, tmp_path)
    printed = capsys.readouterr().out
    assert "fold 1/2: scored by an earlier run" in printed and printed.count("stage 1/2") == 1
    assert again["folds"][0] == report["folds"][0] and again["minutes_by_fold"][0] == minutes[0]
    assert json.loads((tmp_path / "fold_2_of_2.json").read_text())["key"] == record["key"]


def test_a_finished_cross_validation_goes_into_the_card_of_a_model_of_that_recipe(
    two_stage_recipe, tiny_dataset, tiny_model_dir, tmp_path
):
    """`papcad record-cv` writes the spread into the card, and refuses a CV of another recipe or other data."""
    from app.errors import DatasetError
    from app.ml.cross_validation import CV_FILE, recipe_stages, record_in_card
    from app.ml.data import discover

    _, recipe = two_stage_recipe
    fingerprint = discover(tiny_dataset).fingerprint()
    summary = {"accuracy_7class": {"mean": 0.5, "std": 0.1, "folds": [0.4, 0.6]}}
    ensemble = {"n": 3, "multiclass": {"accuracy": 0.7, "macro_f1": 0.6}, "binary": {"accuracy": 0.9, "roc_auc": 1.0}}
    report = {
        "k": 2,
        "cells": {"development": 60, "test": 24},
        "data": {"fingerprint_sha256": fingerprint},
        "summary": summary,
        "minutes_by_fold": [1.0, 2.0],
        "test": {"single_networks": summary, "ensemble": ensemble},
    }
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    card = read_card(model)
    card["recipe"], card["data"] = recipe.to_dict(), {"fingerprint_sha256": fingerprint}
    (model / CARD_FILE).write_text(json.dumps(card))

    real_stages = [stage.to_dict() for stage in recipe_stages(recipe)]
    for wrong, message in (
        ({"stages": [real_stages[-1]]}, "another recipe"),
        ({"stages": real_stages, "data": {"fingerprint_sha256": "0" * 64}}, "other data"),
    ):
        (cv_dir / CV_FILE).write_text(json.dumps({**report, **wrong}))
        with pytest.raises(DatasetError, match=message):
            record_in_card(model, cv_dir)
        assert "cross_validation" not in read_card(model)

    (cv_dir / CV_FILE).write_text(json.dumps({**report, "stages": real_stages}))
    section = record_in_card(model, cv_dir)
    assert read_card(model)["cross_validation"] == section
    assert section["k"] == 2 and section["held_out_folds"] == summary and section["cells"]["test"] == 24
    assert section["test_split"]["ensemble_of_folds"] == {
        "accuracy_7class": 0.7,
        "macro_f1": 0.6,
        "binary_accuracy": 0.9,
        "binary_roc_auc": 1.0,
    }
    assert read_card(model)["weights_sha256"] == card["weights_sha256"]  # nothing else in the card changed


def test_a_killed_fold_continues_from_its_last_finished_epoch(
    two_stage_recipe, tiny_dataset, tmp_path, capsys, monkeypatch
):
    """A process killed in the middle of a stage keeps the finished stages and epochs: the rerun trains only
    what is left (the shipped recipe's fold is about 90 minutes of CPU)."""
    import keras

    from app.ml.cross_validation import fit_stages, recipe_stages
    from app.ml.data import discover, load_arrays

    _, recipe = two_stage_recipe
    stages = recipe_stages(recipe.with_overrides(epochs=3))
    dataset = discover(tiny_dataset)
    x, y = load_arrays(dataset, recipe.input, progress=False)
    work = tmp_path / "work"

    class Killed(Exception):
        pass

    original = keras.callbacks.BackupAndRestore

    class KilledAfterTwoEpochs(original):  # type: ignore[misc,valid-type]
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)  # the epoch is saved first, as it would be before a kill
            if epoch == 1:
                raise Killed

    monkeypatch.setattr(keras.callbacks, "BackupAndRestore", KilledAfterTwoEpochs)
    with pytest.raises(Killed):
        fit_stages(x, y, stages, work, key="fold A")
    printed = capsys.readouterr().out
    assert "stage 1/2: recipe default" in printed and "Epoch 2/3" in printed and "Epoch 3/3" not in printed
    assert (work / "stage_1" / WEIGHTS_FILE).is_file() and not (work / "stage_2").exists()

    monkeypatch.setattr(keras.callbacks, "BackupAndRestore", original)
    seconds_before = (work / "stage_2.backup.seconds").read_text().split()
    assert len(seconds_before) == 2  # the two epochs that finished before the kill

    weights, minutes = fit_stages(x, y, stages, work, key="fold A")
    printed = capsys.readouterr().out
    assert "stage 1/2: trained by an earlier run, kept" in printed
    assert "Epoch 3/3" in printed and "Epoch 1/3" not in printed and "Epoch 2/3" not in printed
    assert weights == work / "stage_2" / WEIGHTS_FILE and weights.is_file()
    logs = [work / "stage_1.backup.seconds", work / "stage_2.backup.seconds"]
    every_epoch = [float(seconds) for log in logs for seconds in log.read_text().split()]
    assert len(every_epoch) == 1 + 3 and minutes == pytest.approx(sum(every_epoch) / 60)  # both runs counted
    assert not (work / "stage_2.backup").exists()  # removed once the stage finished

    fit_stages(x, y, stages[:1], work, key="fold B")  # another fold's leftovers are not reused
    assert "stage 1/1: recipe default" in capsys.readouterr().out
