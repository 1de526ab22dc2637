"""`papcad export`: the LiteRT network of a model directory, checked against the Keras network.

1. `model.lite_network` (uint8 pixels in; probabilities, guard features and class maps out) is converted with
   LiteRT's dynamic-range quantisation: weights stored as int8, activations computed in float.
2. Both networks score the same cells (the card's test split, or the caller's held-out cells) with the card's
   test-time views, calibration and cut-off: 7-class accuracy, ROC AUC, sensitivity and specificity at the
   cut-off, calls that change, typical-cell verdicts that change, and the time per cell of each.
3. Where int8 loses more than MAX_POINTS_LOST of 7-class accuracy or of sensitivity at the cut-off, the network
   is converted again with float16 weights (float32 arithmetic on CPUs without float16) and checked the same
   way: about as fast as the Keras network, but served without TensorFlow, in a third of its memory.
4. The card's "serving" section names each file, its SHA-256 and the weights it was made from, and records
   the checks; "auto" is "int8" when int8 passed, else "float16" when float16 passed, else "float32".
   Servers on `PAPCAD_INFERENCE_PRECISION=auto` follow it.
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
from app.ml.runtime import Precision

LITE_FILES: dict[Precision, str] = {"int8": "serving_int8.tflite", "float16": "serving_float16.tflite"}
INT8_FILE = LITE_FILES["int8"]
MAX_POINTS_LOST = 0.5
METHODS: dict[Precision, str] = {
    "int8": "LiteRT dynamic-range quantisation (int8 weights, float activations) of model.lite_network",
    "float16": "LiteRT float16 weights (float32 arithmetic where the CPU has no float16) of model.lite_network",
}


def convert_lite(classifier: Classifier, path: Path, precision: Precision = "int8") -> None:
    """Write the classifier's Keras network as a LiteRT file with int8 or float16 weights."""
    converter = tf.lite.TFLiteConverter.from_keras_model(lite_network(classifier.network))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "float16":
        converter.target_spec.supported_types = [tf.float16]
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


@dataclass(frozen=True)
class CheckCells:
    """The cells a LiteRT network is checked on, and the float32 network's answers on them."""

    pixels: np.ndarray
    labels: np.ndarray
    described: str
    reference: dict[str, Any]
    reference_calls: np.ndarray


def _convert_and_check(
    keras_model: Classifier, card: dict[str, Any], precision: Precision, cells: CheckCells
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the LiteRT file of that precision and check it against the float32 network: (file entry, check)."""
    path = keras_model.model_dir / LITE_FILES[precision]
    convert_lite(keras_model, path, precision)
    dims = keras_model.predictor.feature_dims
    lite = Classifier(
        keras_model.model_dir,
        card,
        LitePredictor(path, keras_model.predictor.tta, dims, precision=precision),
        keras_model.ood,
    )
    ours, calls = _summary(lite, score(lite, cells.pixels), cells.labels)
    reference = cells.reference
    lost = 100 * (reference["accuracy_7class"] - ours["accuracy_7class"])
    lost_sensitivity = 100 * ((reference["cutoff_sensitivity"] or 0.0) - (ours["cutoff_sensitivity"] or 0.0))
    entry = {
        "file": path.name,
        "sha256": sha256_file(path),
        "weights_sha256": card["weights_sha256"],
        "feature_dims": list(dims),
        "method": METHODS[precision],
        "runtime": "LiteRT (ai-edge-litert)",
    }
    check = {
        "cells": cells.described,
        "n": int(len(cells.labels)),
        "float32": reference,
        precision: ours,
        "points_lost_7class": lost,
        "points_lost_sensitivity": lost_sensitivity,
        "calls_changed": int(np.sum(cells.reference_calls[:, 0] != calls[:, 0])),
        "typical_verdicts_changed": int(np.sum(cells.reference_calls[:, 1] != calls[:, 1])),
        f"speed_{precision}_over_float32": reference["seconds_per_cell"] / ours["seconds_per_cell"],
        "bar": f"at most {MAX_POINTS_LOST} points of 7-class accuracy and of sensitivity at the cut-off lost",
        "passed": lost <= MAX_POINTS_LOST and lost_sensitivity <= MAX_POINTS_LOST,
    }
    return entry, check


def export_lite(
    model_dir: Path, pixels: np.ndarray, labels: np.ndarray, checked_on: str, float32: Scored | None = None
) -> dict[str, Any]:
    """Convert, check on (pixels, labels) and record; returns the card's new "serving" section.

    float32: the float32 network's `score` of these pixels, when the caller has it (not scored twice).
    """
    model_dir = Path(model_dir)
    keras_model = Classifier.load(model_dir, precision="float32")
    card = read_card(model_dir)
    scored = float32 if float32 is not None else score(keras_model, pixels)
    reference, reference_calls = _summary(keras_model, scored, labels)
    cells = CheckCells(pixels, labels, checked_on, reference, reference_calls)
    int8, check = _convert_and_check(keras_model, card, "int8", cells)
    section: dict[str, Any] = {"int8": int8, "check": check, "auto": "int8" if check["passed"] else "float32"}
    float16_path = model_dir / LITE_FILES["float16"]
    if check["passed"]:
        float16_path.unlink(missing_ok=True)  # from an earlier export of other weights
    else:
        float16, float16_check = _convert_and_check(keras_model, card, "float16", cells)
        section |= {"float16": float16, "float16_check": float16_check}
        if float16_check["passed"]:
            section["auto"] = "float16"
    card["serving"] = section
    write_card(model_dir, card)
    return section


def export_model_dir(model_dir: Path, dataset: Dataset) -> dict[str, Any]:
    """`papcad export`: the LiteRT network(s), checked on the card's own grouped test split."""
    card = read_card(model_dir)
    check_dataset(card, dataset)
    split_info = card["data"]["split"]
    split = fixed_split(dataset, split_info["seed"], val_folds=split_info["val_folds"])
    pixels, labels = load_arrays(dataset.subset(split.test), InputSpec.from_dict(card["input"]), progress=False)
    return export_lite(model_dir, pixels, labels, "the card's grouped test split")
