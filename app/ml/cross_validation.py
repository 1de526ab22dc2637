"""Grouped k-fold cross-validation of a training recipe, and its summary in a model card.

development cells -> k grouped folds -> every stage of the recipe per fold (resumable) -> held-out fold and
test split scored -> mean and spread (cv_metrics.json) -> the card's "cross_validation" section
"""

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from app.errors import DatasetError
from app.ml.artifact import WEIGHTS_FILE, read_card, sha256_file, write_card
from app.ml.data import Dataset, fixed_split, grouped_folds, load_arrays
from app.ml.evaluation import compute_metrics
from app.ml.inference import Predictor
from app.ml.model import save_weights
from app.ml.recipes import Recipe
from app.ml.train import fit, network, training_pixels

CV_FILE = "cv_metrics.json"


def recipe_stages(recipe: Recipe) -> list[Recipe]:
    """The recipes that make a model, first to last: the recipe itself and, before it, the recipe of the model it
    starts from (`init_from`, read from that model's card), and so on. Cross-validation retrains every stage on
    each fold: a starting model trained on the fixed split has seen other folds' held-out cells."""
    if recipe.init_from is None:
        return [recipe]
    try:
        parent = Recipe.from_dict(read_card(Path(recipe.init_from))["recipe"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"cannot retrain the starting model {recipe.init_from} from its card: {exc}") from exc
    return [*recipe_stages(parent), recipe]


def fit_stages(x: np.ndarray, y: np.ndarray, stages: list[Recipe], work: Path, key: str) -> tuple[Path, float]:
    """Train each stage from the previous stage's weights; returns the last stage's weights file and the minutes
    all its epochs took (in every run that worked on them).

    Every finished stage, and within a stage every epoch, is kept in work/ under the fold's key, so a killed run
    continues where it stopped instead of at the start of the fold (hours of CPU for the shipped recipe).
    """
    if (work / "key").is_file() and (work / "key").read_text() != key:
        shutil.rmtree(work)  # left by another recipe, data or fold
    work.mkdir(parents=True, exist_ok=True)
    (work / "key").write_text(key)
    previous: Path | None = None
    for number, stage in enumerate(stages, 1):
        if previous is not None:  # float16 on disk, as a starting model's weights always are
            stage = stage.with_overrides(init_from=str(previous))
        done = work / f"stage_{number}"
        if (done / WEIGHTS_FILE).is_file():
            print(f"  stage {number}/{len(stages)}: trained by an earlier run, kept", flush=True)
        else:
            print(f"  stage {number}/{len(stages)}: recipe {stage.name}, {stage.epochs} epochs", flush=True)
            model, _ = fit(x, y, stage, backup_dir=work / f"stage_{number}.backup")
            partial = work / f"stage_{number}.partial"
            partial.mkdir(exist_ok=True)
            save_weights(model, partial / WEIGHTS_FILE)
            partial.replace(done)  # a stage is either kept whole or not at all
            del model
            keras.backend.clear_session()
        previous = done
    assert previous is not None
    seconds = sum(float(line) for log in work.glob("*.seconds") for line in log.read_text().split())
    return previous / WEIGHTS_FILE, seconds / 60


_PICKS: dict[str, Callable[[dict[str, Any]], float]] = {
    "accuracy_7class": lambda m: m["multiclass"]["accuracy"],
    "macro_f1": lambda m: m["multiclass"]["macro_f1"],
    "binary_accuracy": lambda m: m["binary"]["accuracy"],
    "binary_roc_auc": lambda m: m["binary"]["roc_auc"],
}


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The four numbers a cross-validation reports, from `compute_metrics`' output."""
    return {name: pick(metrics) for name, pick in _PICKS.items()}


def _spread(folds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean, standard deviation and per-fold values of the headline metrics."""
    summary = {}
    for name, pick in _PICKS.items():
        values = np.array([pick(m) for m in folds], dtype=np.float64)
        summary[name] = {"mean": float(values.mean()), "std": float(values.std()), "folds": values.tolist()}
    return summary


def cross_validate(dataset: Dataset, recipe: Recipe, k: int, out_dir: Path) -> dict[str, Any]:
    """Grouped, stratified k-fold CV on the development cells (the fixed split's training and validation cells).

    Each fold trains every stage of the recipe on k-1 folds and is scored on the held-out fold. The test split
    stays out of every fold, so each fold's network is also scored on it, alone and as an ensemble of the k
    networks: whether an ensemble beats one network is measured on cells none of them saw. Each scored fold
    (metrics, test probabilities and float16 weights) is written to out_dir at once and a rerun with the same
    recipe and data skips it; within a fold, finished stages and epochs are kept too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = recipe_stages(recipe)
    split = fixed_split(dataset, recipe.seed, val_folds=recipe.val_folds)
    development = np.sort(np.concatenate([split.train, split.val]))
    x, y = load_arrays(dataset, recipe.input)
    recipes_key = json.dumps([stage.to_dict() for stage in stages], sort_keys=True) + dataset.fingerprint()
    records = []
    for index, (train_local, held_local) in enumerate(grouped_folds(dataset.subset(development), k, recipe.seed)):
        train_idx, held_idx = development[train_local], development[held_local]
        name = f"fold_{index + 1}_of_{k}"
        key = hashlib.sha256((recipes_key + ",".join(map(str, held_idx))).encode()).hexdigest()
        record_file = out_dir / f"{name}.json"
        earlier = json.loads(record_file.read_text()) if record_file.is_file() else {}
        if earlier.get("key") == key and (out_dir / earlier.get("weights", "")).is_file():
            print(f"fold {index + 1}/{k}: scored by an earlier run ({record_file.name}), skipped", flush=True)
            records.append(earlier)
            continue
        print(f"fold {index + 1}/{k}: {len(train_idx)} train, {len(held_idx)} held out", flush=True)
        work = out_dir / f".{name}-stages"
        weights, minutes = fit_stages(training_pixels(dataset, train_idx, x, stages), y[train_idx], stages, work, key)
        scored = stages[-1].with_overrides(init_from=str(weights.parent), mixed_precision=False)  # float32, as served
        predict = Predictor(network(scored), tta=recipe.tta)
        test_probs = predict(x[split.test])
        record = {
            "key": key,
            "minutes": round(minutes, 1),  # training epochs, summed over every run that worked on this fold
            "metrics": compute_metrics(y[held_idx], predict(x[held_idx])),
            "test_metrics": compute_metrics(y[split.test], test_probs),
            "test_probabilities": np.round(test_probs, 6).tolist(),
            "weights": f"{name}.weights.npz",
            "weights_sha256": sha256_file(weights),
        }
        weights.replace(out_dir / record["weights"])
        print(f"fold {index + 1}/{k}: scored; its epochs took {record['minutes']} minutes", flush=True)
        partial = record_file.with_suffix(".partial")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        partial.replace(record_file)  # a fold is either recorded whole or not at all
        shutil.rmtree(work)
        records.append(record)
        del predict
        keras.backend.clear_session()
    ensemble = np.mean([np.asarray(r["test_probabilities"], dtype=np.float64) for r in records], axis=0)
    result = {
        "k": k,
        "data": {"images": len(dataset.samples), "fingerprint_sha256": dataset.fingerprint()},
        "cells": {"development": len(development), "test": len(split.test)},
        "recipe": recipe.to_dict(),
        "stages": [stage.to_dict() for stage in stages],
        "summary": _spread([r["metrics"] for r in records]),
        "minutes_by_fold": [r.get("minutes") for r in records],
        "folds": [r["metrics"] for r in records],
        "test": {
            "single_networks": _spread([r["test_metrics"] for r in records]),
            "ensemble": compute_metrics(y[split.test], ensemble),
            "ensemble_weights": [r["weights"] for r in records],
        },
    }
    (out_dir / CV_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def record_in_card(model_dir: Path, cv_dir: Path) -> dict[str, Any]:
    """Write a finished cross-validation of the model's own recipe, on its own data, into the model's card
    (section "cross_validation"): the spread a lab should expect, next to the one split's test numbers."""
    card = read_card(model_dir)
    try:
        report = json.loads((cv_dir / CV_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"no finished cross-validation in {cv_dir} ({exc}); run papcad train --cv") from exc
    stages = [stage.to_dict() for stage in recipe_stages(Recipe.from_dict(card["recipe"]))]
    if report.get("stages") != stages:
        raise DatasetError(f"{cv_dir} cross-validated another recipe than the one {model_dir.name} was trained with")
    if report.get("data", {}).get("fingerprint_sha256") != card["data"]["fingerprint_sha256"]:
        raise DatasetError(f"{cv_dir} cross-validated other data than {model_dir.name} was trained on")
    test = report["test"]
    section: dict[str, Any] = {
        "method": f"grouped, class-stratified {report['k']}-fold split of the development cells (the fixed "
        "split's training and validation cells); every stage of the recipe retrained per fold; the test split "
        "in no fold",
        "k": report["k"],
        "cells": report["cells"],
        "held_out_folds": report["summary"],
        "test_split": {
            "single_networks": test["single_networks"],
            "ensemble_of_folds": headline(test["ensemble"]),
        },
        "minutes_by_fold": report["minutes_by_fold"],
    }
    card["cross_validation"] = section
    write_card(model_dir, card)
    return section
