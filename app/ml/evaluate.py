"""Evaluate a model directory on its own held-out split, calibrate it, and write the numbers into its card.

1. Rebuild the grouped split from the card's seed (the data must be the very data trained on).
2. Predict validation and test images with the stored model exactly as the server loads it.
3. Fit the temperature and choose the abnormal threshold on validation; report both on test.
4. Write metrics JSON, plots, and the card's summary.
"""

import json
from pathlib import Path

import numpy as np

from app.errors import DatasetError
from app.ml import calibration as cal
from app.ml.artifact import read_card, write_card
from app.ml.classifier import Classifier
from app.ml.data import Dataset, fixed_split, load_arrays
from app.ml.evaluation import ABNORMAL_MASK, plot_history, write_report

# Missed abnormal cells are the costly error: the default cut-off keeps validation sensitivity here.
TARGET_SENSITIVITY = 0.95


def _raw_probabilities(classifier: Classifier, dataset: Dataset, indices: np.ndarray):
    x, y = load_arrays(dataset.subset(indices), classifier.spec)
    return classifier.predictor(x), y


def _calibration_summary(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray) -> dict:
    return {
        "n": int(len(labels)),
        "ece_before": cal.expected_calibration_error(raw, labels),
        "ece_after": cal.expected_calibration_error(calibrated, labels),
        "brier_before": cal.brier_score(raw, labels),
        "brier_after": cal.brier_score(calibrated, labels),
        "nll_before": cal.negative_log_likelihood(raw, labels),
        "nll_after": cal.negative_log_likelihood(calibrated, labels),
    }


def evaluate_model_dir(model_dir: Path, dataset: Dataset) -> dict:
    """Score the stored model on its held-out test split, calibrated on validation; update the card."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    if dataset.fingerprint() != card["data"]["fingerprint_sha256"]:
        raise DatasetError(
            f"{dataset.root} is not the data model {card['version']} was trained on "
            "(fingerprint differs); its test split would not be held out"
        )
    classifier = Classifier.load(model_dir)
    split_info = card["data"]["split"]
    split = fixed_split(dataset, split_info["seed"], val_folds=split_info["val_folds"])
    raw_test, y_test = _raw_probabilities(classifier, dataset, split.test)

    if len(split.val):
        raw_val, y_val = _raw_probabilities(classifier, dataset, split.val)
        temperature = cal.fit_temperature(raw_val, y_val)
        val_cal = cal.apply_temperature(raw_val, temperature)
        p_val, abnormal_val = val_cal[:, ABNORMAL_MASK].sum(axis=1), ABNORMAL_MASK[y_val]
        threshold = cal.choose_abnormal_threshold(p_val, abnormal_val, TARGET_SENSITIVITY)
        val_sens, val_spec = cal.sensitivity_specificity(p_val, abnormal_val, threshold)
        calibration = {
            "method": "temperature scaling fitted on the validation split (NLL)",
            "temperature": temperature,
            "validation": _calibration_summary(raw_val, val_cal, y_val),
        }
    else:  # the published 80/20 recipe has no validation split to fit on
        temperature, threshold, val_sens, val_spec = 1.0, 0.5, None, None
        calibration = {"method": "none (no validation split)", "temperature": 1.0}

    test_cal = cal.apply_temperature(raw_test, temperature)
    calibration["test"] = _calibration_summary(raw_test, test_cal, y_test)
    cal.reliability_diagram(raw_test, test_cal, y_test, model_dir / "test_reliability.png")
    p_test, abnormal_test = test_cal[:, ABNORMAL_MASK].sum(axis=1), ABNORMAL_MASK[y_test]
    test_sens, test_spec = cal.sensitivity_specificity(p_test, abnormal_test, threshold)

    result = write_report(model_dir, y_test, test_cal, prefix="test")
    history = model_dir / "history.json"
    if history.is_file():
        plot_history(json.loads(history.read_text()), model_dir / "training_curves.png")
    card["calibration"] = calibration
    card["abnormal_threshold"] = {
        "value": threshold,
        "chosen_on": "validation" if len(split.val) else "default",
        "target_sensitivity": TARGET_SENSITIVITY,
        "validation_sensitivity": val_sens,
        "validation_specificity": val_spec,
        "test_sensitivity": test_sens,
        "test_specificity": test_spec,
    }
    card["metrics"] = {
        "split": "test",
        "n": result["n"],
        "accuracy_7class": result["multiclass"]["accuracy"],
        "macro_f1": result["multiclass"]["macro_f1"],
        "binary_accuracy": result["binary"]["accuracy"],
        "binary_sensitivity": result["binary"]["sensitivity"],
        "binary_specificity": result["binary"]["specificity"],
        "binary_roc_auc": result["binary"]["roc_auc"],
        "tta": classifier.predictor.tta,
        "probabilities": "calibrated",
        "details": "test_metrics.json",
        "command": f"papcad evaluate --model {model_dir.as_posix()} --data <herlev folder>",
    }
    write_card(model_dir, card)
    return card
