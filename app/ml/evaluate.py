"""Evaluate a model directory on its own held-out split, calibrate it, and write the numbers into its card.

1. Rebuild the grouped split from the card's seed (the data must be the very data trained on).
2. Predict validation and test images with the stored model exactly as the server loads it.
3. Fit the temperature and choose the abnormal threshold on validation; report both on test. The threshold
   is chosen either on the validation cells as they are, or on them pooled with the same cells under every
   shift of the robustness suite (`cutoff_under_shifts`): a lab whose stain or framing differs from Herlev's
   then keeps the sensitivity the cut-off promises, at the cost of flagging more normal cells.
4. Measure what each number of test-time views buys ("tta_choice": accuracy, ROC AUC and cost of
   none / flips4 / dihedral8), from one pass over all eight views.
5. Write metrics JSON, plots, and the card's summary.

The network runs in float32 here whatever the CPU offers, so a card's numbers do not depend on the
machine that evaluated it.
"""

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import DatasetError
from app.ml import calibration as cal
from app.ml.artifact import read_card, write_card
from app.ml.calibration_plots import reliability_diagram
from app.ml.classifier import Classifier
from app.ml.data import Dataset, fixed_split, load_arrays
from app.ml.evaluation import ABNORMAL_MASK, compute_metrics, plot_history, write_report
from app.ml.inference import Predictor
from app.ml.runtime import TTA, VIEW_INDICES

# Missed abnormal cells are the costly error: the default cut-off keeps validation sensitivity here.
TARGET_SENSITIVITY = 0.95
PLAIN_BASIS = "validation"
SHIFTED_BASIS = "validation, unshifted and under each shift of the robustness suite, pooled"


# A setting is recommended when it is the cheapest within these margins of the best on validation.
TTA_ACCURACY_MARGIN = 0.01
TTA_AUC_MARGIN = 0.005
TIMED_IMAGES = 32


def _per_view(classifier: Classifier, dataset: Dataset, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw probabilities of all eight dihedral views, (8, n, classes), and the labels."""
    x, y = load_arrays(dataset.subset(indices), classifier.spec)
    return Predictor(classifier.network, "dihedral8").per_view(x)[0], y


def average_views(per_view: np.ndarray, tta: TTA) -> np.ndarray:
    """The probabilities a setting yields: the mean over its views, renormalised (as `Predictor` does)."""
    probs = per_view[list(VIEW_INDICES[tta])].mean(axis=0, dtype=np.float64)
    result: np.ndarray = probs / probs.sum(axis=1, keepdims=True)
    return result


def _scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    result = compute_metrics(labels, probs)
    return {"accuracy_7class": result["multiclass"]["accuracy"], "roc_auc": result["binary"]["roc_auc"]}


def seconds_per_image(predictor: Predictor, pixels: np.ndarray, repeats: int = 2) -> float:
    """The best of `repeats` timed runs over pixels, after one untimed run (which compiles)."""
    predictor(pixels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predictor(pixels)
        best = min(best, time.perf_counter() - start)
    return best / len(pixels)


def tta_choice(
    classifier: Classifier,
    validation: tuple[np.ndarray, np.ndarray] | None,
    test: tuple[np.ndarray, np.ndarray],
    timing_pixels: np.ndarray,
) -> dict[str, Any]:
    """What each test-time augmentation setting buys and costs, for the card's "tta_choice" section.

    validation, test: (per-view raw probabilities (8, n, classes), labels). Accuracy and ROC AUC are of the
    uncalibrated probabilities (a temperature leaves the accuracy unchanged). The cost is measured on
    timing_pixels with this machine's network, relative to a single view.
    """
    settings: dict[str, dict[str, Any]] = {}
    for tta in VIEW_INDICES:
        seconds = seconds_per_image(Predictor(classifier.network, tta), timing_pixels)
        settings[tta] = {
            "views": len(VIEW_INDICES[tta]),
            "validation": _scores(validation[1], average_views(validation[0], tta)) if validation else None,
            "test": _scores(test[1], average_views(test[0], tta)),
            "ms_per_image": 1000 * seconds,
        }
    for row in settings.values():
        row["relative_cost"] = row["ms_per_image"] / settings["none"]["ms_per_image"]
    chosen_on = "validation" if validation else "test"
    # Measured against the setting with the most views, which qualifies by definition.
    most_views = max(settings, key=lambda tta: settings[tta]["views"])
    reference = settings[most_views][chosen_on]
    good = [most_views] + [
        tta
        for tta, row in settings.items()
        if row[chosen_on]["accuracy_7class"] >= reference["accuracy_7class"] - TTA_ACCURACY_MARGIN
        and (row[chosen_on]["roc_auc"] or 0.0) >= (reference["roc_auc"] or 0.0) - TTA_AUC_MARGIN
    ]
    return {
        "settings": settings,
        "in_use": classifier.predictor.tta,
        "recommended": min(good, key=lambda tta: settings[tta]["views"]),
        "rule": (
            f"the fewest views whose {chosen_on} 7-class accuracy is within {TTA_ACCURACY_MARGIN:.0%} and ROC AUC "
            f"within {TTA_AUC_MARGIN} of dihedral8's (all eight views)"
        ),
        "probabilities": "uncalibrated (raw network output averaged over the views)",
        "cost": f"ms per image on {len(timing_pixels)} test images in one batch, float32, on the evaluating machine",
        "how_to_change": 'set the card\'s "tta", then rerun papcad evaluate and papcad fit-ood (the OOD model is '
        "fitted on view-averaged features)",
    }


def shifted_p_abnormal(classifier: Classifier, subset: Dataset, temperature: float) -> np.ndarray:
    """Calibrated P(abnormal) of the cells under each shift of the suite but "none" (shifts x cells). Same
    preprocessing and view average as serving; the temperature is the one just fitted."""
    from app.ml.robustness import crops, shifted_pixels
    from app.ml.shifts import standard_shifts

    images = crops(subset)
    shifts = [shift for shift in standard_shifts(images) if shift.name != "none"]
    rows = []
    for _, pixels in shifted_pixels(images, shifts, classifier.spec):
        raw = classifier.predictor.with_features(pixels)[0]
        rows.append(cal.apply_temperature(raw, temperature)[:, ABNORMAL_MASK].sum(axis=1))
    return np.stack(rows)


def pooled_cutoff(p_plain: np.ndarray, p_shifted: np.ndarray, abnormal: np.ndarray) -> tuple[float, dict[str, float]]:
    """The threshold keeping TARGET_SENSITIVITY over the plain and shifted cells together, and what it does on
    the shifted ones (their pooled sensitivity and specificity, and the lowest sensitivity of any one shift)."""
    pooled = np.concatenate([p_plain[None], p_shifted])
    flags = np.broadcast_to(abnormal, pooled.shape)
    threshold = cal.choose_abnormal_threshold(pooled.ravel(), flags.ravel(), TARGET_SENSITIVITY)
    sensitivity, specificity = cal.sensitivity_specificity(p_shifted.ravel(), flags[1:].ravel(), threshold)
    per_shift = [cal.sensitivity_specificity(p, abnormal, threshold)[0] for p in p_shifted]
    return threshold, {
        "shifts": len(p_shifted),
        "shifted_sensitivity": sensitivity,
        "shifted_specificity": specificity,
        "lowest_shift_sensitivity": min(per_shift),
    }


def _calibration_summary(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    return {
        "n": int(len(labels)),
        "ece_before": cal.expected_calibration_error(raw, labels),
        "ece_after": cal.expected_calibration_error(calibrated, labels),
        "brier_before": cal.brier_score(raw, labels),
        "brier_after": cal.brier_score(calibrated, labels),
        "nll_before": cal.negative_log_likelihood(raw, labels),
        "nll_after": cal.negative_log_likelihood(calibrated, labels),
    }


def evaluate_model_dir(model_dir: Path, dataset: Dataset, cutoff_under_shifts: bool | None = None) -> dict[str, Any]:
    """Score the stored model on its held-out test split, calibrated on validation; update the card.

    cutoff_under_shifts: choose the abnormal threshold on the validation cells pooled with their shifted
    versions; None keeps the basis the card already records (unshifted for a new model).
    """
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    if cutoff_under_shifts is None:
        cutoff_under_shifts = card.get("abnormal_threshold", {}).get("chosen_on") == SHIFTED_BASIS
    if dataset.fingerprint() != card["data"]["fingerprint_sha256"]:
        raise DatasetError(
            f"{dataset.root} is not the data model {card['version']} was trained on "
            "(fingerprint differs); its test split would not be held out"
        )
    classifier = Classifier.load(model_dir, precision="float32")
    tta = classifier.predictor.tta
    split_info = card["data"]["split"]
    split = fixed_split(dataset, split_info["seed"], val_folds=split_info["val_folds"])
    views_test, y_test = _per_view(classifier, dataset, split.test)
    raw_test = average_views(views_test, tta)
    validation: tuple[np.ndarray, np.ndarray] | None = None

    if len(split.val):
        views_val, y_val = _per_view(classifier, dataset, split.val)
        validation = (views_val, y_val)
        raw_val = average_views(views_val, tta)
        temperature = cal.fit_temperature(raw_val, y_val)
        val_cal = cal.apply_temperature(raw_val, temperature)
        p_val, abnormal_val = val_cal[:, ABNORMAL_MASK].sum(axis=1), ABNORMAL_MASK[y_val]
        threshold = cal.choose_abnormal_threshold(p_val, abnormal_val, TARGET_SENSITIVITY)
        under_shifts: dict[str, float] | None = None
        if cutoff_under_shifts:
            p_shifted = shifted_p_abnormal(classifier, dataset.subset(split.val), temperature)
            threshold, under_shifts = pooled_cutoff(p_val, p_shifted, abnormal_val)
        val_sens, val_spec = cal.sensitivity_specificity(p_val, abnormal_val, threshold)
        calibration = {
            "method": "temperature scaling fitted on the validation split (NLL)",
            "temperature": temperature,
            "validation": _calibration_summary(raw_val, val_cal, y_val),
        }
    else:  # the published 80/20 recipe has no validation split to fit on
        temperature, threshold, val_sens, val_spec, under_shifts = 1.0, 0.5, None, None, None
        calibration = {"method": "none (no validation split)", "temperature": 1.0}

    test_cal = cal.apply_temperature(raw_test, temperature)
    calibration["test"] = _calibration_summary(raw_test, test_cal, y_test)
    reliability_diagram(raw_test, test_cal, y_test, model_dir / "test_reliability.png")
    p_test, abnormal_test = test_cal[:, ABNORMAL_MASK].sum(axis=1), ABNORMAL_MASK[y_test]
    test_sens, test_spec = cal.sensitivity_specificity(p_test, abnormal_test, threshold)

    result = write_report(model_dir, y_test, test_cal, prefix="test")
    history = model_dir / "history.json"
    if history.is_file():
        plot_history(json.loads(history.read_text()), model_dir / "training_curves.png")
    timing_pixels, _ = load_arrays(dataset.subset(split.test[:TIMED_IMAGES]), classifier.spec, progress=False)
    card["tta_choice"] = tta_choice(classifier, validation, (views_test, y_test), timing_pixels)
    card["calibration"] = calibration
    card["abnormal_threshold"] = {
        "value": threshold,
        "chosen_on": (SHIFTED_BASIS if under_shifts else PLAIN_BASIS) if len(split.val) else "default",
        "target_sensitivity": TARGET_SENSITIVITY,
        "validation_sensitivity": val_sens,
        "validation_specificity": val_spec,
        "validation_under_shifts": under_shifts,
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
