"""`papcad fit-ood`: fit the OOD model of a model directory and measure how well it tells cells from non-cells.

1. Rebuild the card's grouped split (the data must be the data trained on).
2. Pooled features of the training split -> class means and shared covariance; the cut-off keeps 95 % of
   the validation split.
3. AUROC of the score between the Herlev test split and each deterministic non-cell set (`ood_sets`), and
   overall; also with the input checks (a flagged image counts as out of distribution whatever its score).
4. Write `ood.npz` and the card's "ood" section (file, SHA-256, cut-off, numbers).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from app.errors import DatasetError
from app.ml.artifact import read_card, sha256_file, write_card
from app.ml.classifier import Classifier
from app.ml.data import Dataset, fixed_split, load_arrays
from app.ml.model import FEATURE_STAGES
from app.ml.ood import KEEP_IN_DISTRIBUTION, METHOD, OOD_FILE, FeatureDistance
from app.ml.ood_sets import OOD_SET_SIZE, ood_sets

CHUNK = 64
FEATURES = "average-pooled outputs of ResNet50 stages " + ", ".join(FEATURE_STAGES) + ", mean over the test-time views"
FLAGGED_SCORE = 1e9


def check_dataset(card: dict[str, Any], dataset: Dataset) -> None:
    if dataset.fingerprint() != card["data"]["fingerprint_sha256"]:
        raise DatasetError(
            f"{dataset.root} is not the data model {card['version']} was trained on "
            "(fingerprint differs); its splits would not be the ones it was trained and tested on"
        )


def pixel_features(classifier: Classifier, pixels: np.ndarray, desc: str) -> np.ndarray:
    """The pooled features of prepared pixel arrays (the network's, with its views), in chunks."""
    chunks = [classifier.predict_pixels_with_features(pixels[i : i + CHUNK])[1] for i in
              tqdm(range(0, len(pixels), CHUNK), desc=desc, unit="chunk")]  # fmt: skip
    return np.concatenate(chunks)


def split_features(classifier: Classifier, dataset: Dataset, indices: np.ndarray, desc: str) -> np.ndarray:
    x, _ = load_arrays(dataset.subset(indices), classifier.spec, progress=False)
    return pixel_features(classifier, x, desc)


def analyse_images(
    classifier: Classifier, images: Sequence[bytes | Image.Image], desc: str
) -> tuple[np.ndarray, list[list[str]]]:
    """Features and input flags, through the same path as serving (`Classifier.analyse`)."""
    features, flags = [], []
    for i in tqdm(range(0, len(images), CHUNK), desc=desc, unit="chunk"):
        _, f, fl = classifier.analyse(images[i : i + CHUNK])
        features.append(f)
        flags += fl
    return np.concatenate(features), flags


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(truth, np.r_[inside, outside]))


def ood_report(
    distance: FeatureDistance,
    test_features: np.ndarray,
    test_flags: list[list[str]],
    outside: dict[str, tuple[np.ndarray, list[list[str]]]],
) -> dict[str, Any]:
    """Per-set and overall AUROC (score alone, and with the input checks) and detection rates at the cut-off."""

    def combined(scores: np.ndarray, flags: list[list[str]]) -> np.ndarray:
        # A flagged image ranks above every score (roc_auc_score refuses infinities).
        return np.where([bool(f) for f in flags], FLAGGED_SCORE, scores)

    test_scores = distance.scores(test_features)
    test_combined = combined(test_scores, test_flags)
    per_set, all_scores, all_combined = {}, [], []
    for name, (features, flags) in outside.items():
        scores = distance.scores(features)
        both = combined(scores, flags)
        all_scores.append(scores)
        all_combined.append(both)
        per_set[name] = {
            "n": len(scores),
            "auroc": _auroc(test_scores, scores),
            "auroc_with_input_checks": _auroc(test_combined, both),
            "detected_by_score": float(np.mean(scores > 1.0)),
            "flagged_by_input_checks": float(np.mean([bool(f) for f in flags])),
            "detected_or_flagged": float(np.mean(both > 1.0)),
            "median_score": float(np.median(scores)),
        }
    scores, both = np.concatenate(all_scores), np.concatenate(all_combined)
    return {
        "test_in_distribution": float(np.mean(test_scores <= 1.0)),
        "test_flagged_by_input_checks": float(np.mean([bool(f) for f in test_flags])),
        "test_median_score": float(np.median(test_scores)),
        "auroc_overall": _auroc(test_scores, scores),
        "auroc_overall_with_input_checks": _auroc(test_combined, both),
        "detected_or_flagged_overall": float(np.mean(both > 1.0)),
        "sets": per_set,
    }


def fit_ood_model_dir(model_dir: Path, dataset: Dataset, limit: int | None = None) -> dict[str, Any]:
    """Fit, measure and store the OOD model; returns the card's new "ood" section.

    limit: use at most this many images of each split and set (for quick checks; the stored numbers say so).
    """
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    check_dataset(card, dataset)
    classifier = Classifier.load(model_dir, with_ood=False, precision="float32")
    split_info = card["data"]["split"]
    split = fixed_split(dataset, split_info["seed"], val_folds=split_info["val_folds"])
    # A limited run takes every k-th image: the indices run class by class, so every class stays in.
    train, val, test = (
        idx[:: max(1, len(idx) // limit)][:limit] if limit else idx for idx in (split.train, split.val, split.test)
    )

    distance = FeatureDistance.fit(
        split_features(classifier, dataset, train, "train features"),
        dataset.labels[train],
        classifier.predictor.feature_dims,
    ).with_cutoff(split_features(classifier, dataset, val, "validation features"))

    test_samples = dataset.subset(test).samples
    test_features, test_flags = analyse_images(classifier, [s.path.read_bytes() for s in test_samples], "test")
    crops = [Image.open(s.path) for s in test_samples]
    outside = {
        name: analyse_images(classifier, images, name)
        for name, images in ood_sets(crops, n=min(limit or OOD_SET_SIZE, OOD_SET_SIZE)).items()
    }
    report = ood_report(distance, test_features, test_flags, outside)

    path = model_dir / OOD_FILE
    distance.save(path)
    section: dict[str, Any] = {
        "file": OOD_FILE,
        "sha256": sha256_file(path),
        "method": METHOD,
        "features": FEATURES,
        "fitted_on": {"split": "train", "n": int(len(train))},
        "cutoff": {
            "score": distance.cutoff,
            "stage_distances": [stage.scale for stage in distance.stages],
            "chosen_on": "validation",
            "keep_in_distribution": KEEP_IN_DISTRIBUTION,
            "n": int(len(val)),
        },
        "score": "distance / cut-off distance: <= 1 in distribution, > 1 not a typical cell",
        "input_checks": (
            "app.ml.input_checks (size, flatness, exposure, bit depth, palette, transparency, aspect ratio)"
        ),
        "evaluation": {"split": "test", "n": int(len(test)), **report},
        "command": f"papcad fit-ood --model {model_dir.as_posix()} --data <herlev folder>",
    }
    if limit:
        section["limit"] = limit
    card["ood"] = section
    write_card(model_dir, card)
    return section


def every_kth(n: int, limit: int) -> np.ndarray:
    """At most `limit` of n indices, evenly spaced (data held class by class keeps every class)."""
    return np.arange(n)[:: max(1, -(-n // limit))][:limit]


def fit_from_features(
    classifier: Classifier,
    model_dir: Path,
    train: tuple[np.ndarray, np.ndarray],
    val_features: np.ndarray,
    test: tuple[np.ndarray, list[list[str]]],
    crops: Sequence[Image.Image],
    described: dict[str, str],
    set_size: int = OOD_SET_SIZE,
) -> dict[str, Any]:
    """The OOD model of a network fitted on training features and labels, its cut-off on validation features,
    measured on test features against the non-cell sets; writes ood.npz and returns the card's "ood" section (the
    caller writes the card). For a model whose data is not a dataset folder: an adapted one.

    The features are the caller's, from the network's own forward passes with its views (`pixel_features`);
    test also carries the test cells' input flags.
    described: "fitted_on", "chosen_on", "test_split" and "command" texts for the section.
    """
    (train_features, train_labels), (test_features, test_flags) = train, test
    distance = FeatureDistance.fit(train_features, train_labels, classifier.predictor.feature_dims)
    distance = distance.with_cutoff(val_features)
    outside = {name: analyse_images(classifier, images, name) for name, images in ood_sets(crops, n=set_size).items()}
    report = ood_report(distance, test_features, test_flags, outside)
    path = Path(model_dir) / OOD_FILE
    distance.save(path)
    return {
        "file": OOD_FILE,
        "sha256": sha256_file(path),
        "method": METHOD,
        "features": FEATURES,
        "fitted_on": {"split": described["fitted_on"], "n": int(len(train_labels))},
        "cutoff": {
            "score": distance.cutoff,
            "stage_distances": [stage.scale for stage in distance.stages],
            "chosen_on": described["chosen_on"],
            "keep_in_distribution": KEEP_IN_DISTRIBUTION,
            "n": int(len(val_features)),
        },
        "score": "distance / cut-off distance: <= 1 in distribution, > 1 not a typical cell",
        "input_checks": (
            "app.ml.input_checks (size, flatness, exposure, bit depth, palette, transparency, aspect ratio)"
        ),
        "evaluation": {"split": described["test_split"], "n": int(len(test_features)), "set_size": set_size, **report},
        "command": described["command"],
    }
