"""`papcad export`: the int8 LiteRT network of a model directory, checked against the Keras network.

1. `model.lite_network` (uint8 pixels in; probabilities, guard features and class maps out) is converted with
   LiteRT's dynamic-range quantisation: weights stored as int8, activations computed in float.
2. Both networks score the same cells (the card's test split, or the caller's held-out cells) with the card's
   test-time views, calibration and cut-off: 7-class accuracy, ROC AUC, sensitivity and specificity at the
   cut-off, calls that change, typical-cell verdicts that change, and the time per cell of each.
3. The card's "serving" section names the file, its SHA-256 and the weights it was made from, and records the
   check; "auto" is "int8" only when int8 loses at most MAX_POINTS_LOST of 7-class accuracy and of sensitivity
   at the cut-off. Servers on `PAPCAD_INFERENCE_PRECISION=auto` follow it.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from app.ml.artifact import read_card, sha256_file, write_card
from app.ml.classifier import Classifier
from app.ml.data import Dataset, fixed_split, load_arrays
from app.ml.evaluation import compute_metrics
from app.ml.lite import LitePredictor
from app.ml.model import lite_network
from app.ml.ood_fit import check_dataset
from app.ml.preprocessing import InputSpec

INT8_FILE = "serving_int8.tflite"
MAX_POINTS_LOST = 0.5
METHOD = "LiteRT dynamic-range quantisation (int8 weights, float activations) of model.lite_network"


def convert_int8(classifier: Classifier, path: Path) -> None:
    """Write the classifier's Keras network as an int8 LiteRT file."""
    converter = tf.lite.TFLiteConverter.from_keras_model(lite_network(classifier.network))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    path.write_bytes(converter.convert())


@dataclass(frozen=True)
class Scored:
    """One network's calibrated probabilities and pooled features for some cells, and its seconds per cell."""

    probs: np.ndarray
    features: np.ndarray
    seconds_per_cell: float


def score(classifier: Classifier, pixels: np.ndarray) -> Scored:
    """The cells through the classifier's serving path (its views and calibration), timed."""
    started = time.perf_counter()
    probs, features = classifier.predict_pixels_with_features(pixels)
    return Scored(probs, features, (time.perf_counter() - started) / len(pixels))


def _summary(classifier: Classifier, scored: Scored, labels: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    probs, features = scored.probs, scored.features
    metrics = compute_metrics(labels, probs)
    p_abnormal = probs[:, classifier.abnormal_mask].sum(axis=1)
    abnormal = classifier.abnormal_mask[labels]
    cut = classifier.abnormal_threshold
    typical = classifier.ood.scores(features) <= 1.0 if classifier.ood is not None else np.ones(len(labels), bool)
    summary = {
        "accuracy_7class": metrics["multiclass"]["accuracy"],
        "roc_auc": metrics["binary"]["roc_auc"],
        "cutoff_sensitivity": float(np.mean(p_abnormal[abnormal] >= cut)) if abnormal.any() else None,
        "cutoff_specificity": float(np.mean(p_abnormal[~abnormal] < cut)) if (~abnormal).any() else None,
        "typical_cells": float(np.mean(typical)),
        "seconds_per_cell": scored.seconds_per_cell,
    }
    return summary, np.c_[probs.argmax(axis=1), typical]


def export_int8(
    model_dir: Path, pixels: np.ndarray, labels: np.ndarray, checked_on: str, float32: Scored | None = None
) -> dict[str, Any]:
    """Convert, check on (pixels, labels) and record; returns the card's new "serving" section.

    float32: the float32 network's `score` of these pixels, when the caller has it (not scored twice).
    """
    model_dir = Path(model_dir)
    keras_model = Classifier.load(model_dir, precision="float32")
    path = model_dir / INT8_FILE
    convert_int8(keras_model, path)
    card = read_card(model_dir)
    lite = Classifier(
        model_dir,
        card,
        LitePredictor(path, keras_model.predictor.tta, keras_model.predictor.feature_dims),
        keras_model.ood,
    )
    reference, ref_calls = _summary(keras_model, float32 if float32 is not None else score(keras_model, pixels), labels)
    int8, int8_calls = _summary(lite, score(lite, pixels), labels)
    lost = 100 * (reference["accuracy_7class"] - int8["accuracy_7class"])
    lost_sensitivity = 100 * ((reference["cutoff_sensitivity"] or 0.0) - (int8["cutoff_sensitivity"] or 0.0))
    passed = lost <= MAX_POINTS_LOST and lost_sensitivity <= MAX_POINTS_LOST
    section = {
        "int8": {
            "file": INT8_FILE,
            "sha256": sha256_file(path),
            "weights_sha256": card["weights_sha256"],
            "feature_dims": list(keras_model.predictor.feature_dims),
            "method": METHOD,
            "runtime": "LiteRT (ai-edge-litert)",
        },
        "check": {
            "cells": checked_on,
            "n": int(len(labels)),
            "float32": reference,
            "int8": int8,
            "points_lost_7class": lost,
            "points_lost_sensitivity": lost_sensitivity,
            "calls_changed": int(np.sum(ref_calls[:, 0] != int8_calls[:, 0])),
            "typical_verdicts_changed": int(np.sum(ref_calls[:, 1] != int8_calls[:, 1])),
            "speed_int8_over_float32": reference["seconds_per_cell"] / int8["seconds_per_cell"],
            "bar": f"at most {MAX_POINTS_LOST} points of 7-class accuracy and of sensitivity at the cut-off lost",
            "passed": passed,
        },
        "auto": "int8" if passed else "float32",
    }
    card["serving"] = section
    write_card(model_dir, card)
    return section


def export_model_dir(model_dir: Path, dataset: Dataset) -> dict[str, Any]:
    """`papcad export`: the int8 network, checked on the card's own grouped test split."""
    card = read_card(model_dir)
    check_dataset(card, dataset)
    split_info = card["data"]["split"]
    split = fixed_split(dataset, split_info["seed"], val_folds=split_info["val_folds"])
    pixels, labels = load_arrays(dataset.subset(split.test), InputSpec.from_dict(card["input"]), progress=False)
    return export_int8(model_dir, pixels, labels, "the card's grouped test split")
