"""Evaluate a model directory on its own held-out test split and write the numbers into its card."""

from pathlib import Path

from app.errors import DatasetError
from app.ml.artifact import read_card, write_card
from app.ml.classifier import Classifier
from app.ml.data import Dataset, fixed_split, load_arrays
from app.ml.evaluation import write_report


def evaluate_model_dir(model_dir: Path, dataset: Dataset) -> dict:
    """Reload the stored model exactly as the server does, score the test split, update the card.

    The split is rebuilt from the card's seed, and the data must be the very data the model was
    trained on (same fingerprint): otherwise the 'held-out' images might not be held out.
    """
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
    test = dataset.subset(split.test)
    x, y = load_arrays(test, classifier.spec)
    probs = classifier.predict_pixels(x)
    result = write_report(model_dir, y, probs, prefix="test")
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
        "details": "test_metrics.json",
        "command": f"papcad evaluate --model {model_dir.as_posix()} --data <herlev folder>",
    }
    write_card(model_dir, card)
    return card
