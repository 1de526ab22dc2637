"""Would an ensemble of the cross-validation folds' networks serve better than the single shipped network?

    .venv/bin/python bench/bench_ensemble.py --cv runs/cv-v3 [--model DIR] [--data DIR] [--out FILE]

`papcad train --cv K` keeps each fold's network (trained on K-1 folds of the development cells; the test split
stays out of every fold). In one run, on one machine, for each test-time augmentation (none, flips4, dihedral8):
  (a) the grouped test split (cells none of the networks saw): 7-class accuracy, macro F1, top-class binary
      accuracy and ROC AUC of P(abnormal) for the single model (default: the bundled one), each fold's network
      and the ensemble (mean of the fold networks' probabilities);
  (b) time per cell of the single network and of the ensemble on the same cells, as a ratio to the single
      network with the card's TTA (what the server pays today).
Every network runs in Keras float32, the same code path for all. Writes bench/results/ensemble.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import HERLEV_DIR, REPO_ROOT, machine_info, repo_relative, write_json

from app.ml.artifact import WEIGHTS_FILE, read_card, sha256_file
from app.ml.classifier import keras_network
from app.ml.cross_validation import headline
from app.ml.data import discover, fixed_split, load_arrays
from app.ml.evaluation import compute_metrics
from app.ml.inference import Predictor
from app.ml.preprocessing import InputSpec

TTAS = ("none", "flips4", "dihedral8")
TIMING_CELLS = 64


def fold_networks(cv_dir: Path) -> list[tuple[Path, np.ndarray]]:
    """Each fold network `papcad train --cv` kept (checked against its record's hash) and the test-split
    probabilities the cross-validation recorded for it."""
    folds = []
    for record_file in sorted(cv_dir.glob("fold_*_of_*.json")):
        record = json.loads(record_file.read_text())
        path = cv_dir / record["weights"]
        if sha256_file(path) != record["weights_sha256"]:
            sys.exit(f"error: {path} does not match the hash in {record_file.name}")
        folds.append((path, np.asarray(record["test_probabilities"])))
    if not folds:
        sys.exit(f"error: no scored folds in {cv_dir} (run papcad train --cv first)")
    return folds


def seconds_per_cell(predictors: list[Predictor], pixels: np.ndarray) -> float:
    """Best of two timed runs of the averaged prediction, after an untimed one (which compiles)."""
    best = float("inf")
    for attempt in range(3):
        start = time.perf_counter()
        np.mean([predict(pixels) for predict in predictors], axis=0)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best / len(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cv", type=Path, required=True, help="output folder of papcad train --cv")
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "model_store" / "resnet50-herlev-r128-v3")
    parser.add_argument("--data", type=Path, default=HERLEV_DIR)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "ensemble.json")
    args = parser.parse_args()

    card = read_card(args.model)
    dataset = discover(args.data)
    if dataset.fingerprint() != card["data"]["fingerprint_sha256"]:
        sys.exit("error: the data differs from the data the model card names")
    split = fixed_split(dataset, card["data"]["split"]["seed"], val_folds=card["data"]["split"]["val_folds"])
    x, y = load_arrays(dataset.subset(split.test), InputSpec.from_dict(card["input"]), progress=False)
    folds = fold_networks(args.cv)
    single = keras_network(card, args.model / WEIGHTS_FILE)
    members = [keras_network(card, path) for path, _ in folds]
    result = {
        "machine": machine_info(),
        "single_model": repo_relative(args.model),
        "card_tta": card["tta"],
        "folds": len(folds),
        "test_cells": len(y),
        "by_tta": {},
    }
    for tta in TTAS:
        one = Predictor(single, tta)
        ensemble = [Predictor(model, tta) for model in members]
        fold_probs = [predict(x) for predict in ensemble]
        recorded = [probs for _, probs in folds]
        if tta == card["tta"] and not all(
            p.shape == r.shape and np.allclose(p, r, atol=1e-3) for p, r in zip(fold_probs, recorded, strict=True)
        ):
            sys.exit("error: the fold networks answer otherwise than when the cross-validation scored them: another "
                     "test split, data or model card")  # fmt: skip
        result["by_tta"][tta] = {
            "single": headline(compute_metrics(y, one(x))),
            "each_fold": [headline(compute_metrics(y, probs)) for probs in fold_probs],
            "ensemble": headline(compute_metrics(y, np.mean(fold_probs, axis=0))),
            "seconds_per_cell": {
                "single": seconds_per_cell([one], x[:TIMING_CELLS]),
                "ensemble": seconds_per_cell(ensemble, x[:TIMING_CELLS]),
            },
        }
    reference = result["by_tta"][card["tta"]]["seconds_per_cell"]["single"]
    print(
        f"{len(folds)} fold networks vs {args.model.name}, {len(y)} test cells; cost relative to one network "
        f"with {card['tta']} views"
    )
    print("tta        model      7-class  binary  ROC AUC  cost")
    for tta, row in result["by_tta"].items():
        for name in ("single", "ensemble"):
            row["seconds_per_cell"][f"{name}_vs_single_{card['tta']}"] = row["seconds_per_cell"][name] / reference
            m = row[name]
            print(
                f"{tta:10} {name:10} {m['accuracy_7class']:7.1%} {m['binary_accuracy']:7.1%} "
                f"{m['binary_roc_auc']:8.3f}  x{row['seconds_per_cell'][name] / reference:.2f}"
            )
    write_json(result, args.out)


if __name__ == "__main__":
    main()
