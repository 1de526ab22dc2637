"""Metrics (scikit-learn) and plots (matplotlib) for a set of predictions with known labels."""

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics  # noqa: E402

from app.ml.classes import ABNORMAL_CLASSES, CLASS_NAMES  # noqa: E402

ABNORMAL_MASK = np.array([name in ABNORMAL_CLASSES for name in CLASS_NAMES])


def compute_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """7-class and binary (normal/abnormal) metrics from true labels and class probabilities."""
    predicted = probs.argmax(axis=1)
    indices = list(range(len(CLASS_NAMES)))
    report = metrics.classification_report(
        labels, predicted, labels=indices, target_names=list(CLASS_NAMES), output_dict=True, zero_division=0
    )
    binary_true = ABNORMAL_MASK[labels].astype(int)
    p_abnormal = probs[:, ABNORMAL_MASK].sum(axis=1)
    binary_pred = ABNORMAL_MASK[predicted].astype(int)
    tn, fp, fn, tp = metrics.confusion_matrix(binary_true, binary_pred, labels=[0, 1]).ravel()
    has_both = len(set(binary_true)) == 2
    return {
        "n": int(len(labels)),
        "multiclass": {
            "accuracy": float(metrics.accuracy_score(labels, predicted)),
            "macro_f1": float(metrics.f1_score(labels, predicted, labels=indices, average="macro", zero_division=0)),
            "per_class": {
                name: {k: float(report[name][k]) for k in ("precision", "recall", "f1-score", "support")}
                for name in CLASS_NAMES
            },
            "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=indices).tolist(),
        },
        "binary": {
            "accuracy": float(metrics.accuracy_score(binary_true, binary_pred)),
            "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
            "specificity": float(tn / (tn + fp)) if tn + fp else None,
            "roc_auc": float(metrics.roc_auc_score(binary_true, p_abnormal)) if has_both else None,
            "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
            "note": "abnormal = predicted class is one of the four dysplasia/carcinoma classes",
        },
    }


def plot_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 6) if len(names) > 2 else (4, 3.5))
    metrics.ConfusionMatrixDisplay(np.array(matrix), display_labels=names).plot(
        ax=ax, colorbar=False, xticks_rotation=45 if len(names) > 2 else 0
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: Path) -> None:
    binary_true = ABNORMAL_MASK[labels].astype(int)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    metrics.RocCurveDisplay.from_predictions(
        binary_true, probs[:, ABNORMAL_MASK].sum(axis=1), ax=ax, name="P(abnormal)"
    )
    ax.set_title("Normal vs abnormal ROC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: dict[str, list[float]], path: Path) -> None:
    """Training and validation accuracy/loss per epoch."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("accuracy", acc_ax), ("loss", loss_ax)):
        epochs = range(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], label=f"training {key}")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        if key == "loss":
            ax.set_yscale("log")  # early validation spikes (BatchNorm statistics settling) would flatten the rest
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, labels: np.ndarray, probs: np.ndarray, prefix: str = "test") -> dict[str, Any]:
    """Compute metrics, write `<prefix>_metrics.json` and the PNG plots, return the metrics."""
    out_dir = Path(out_dir)
    result = compute_metrics(labels, probs)
    (out_dir / f"{prefix}_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_confusion(
        result["multiclass"]["confusion_matrix"],
        list(CLASS_NAMES),
        out_dir / f"{prefix}_confusion_7class.png",
        "7-class confusion",
    )
    plot_confusion(
        result["binary"]["confusion_matrix"],
        ["normal", "abnormal"],
        out_dir / f"{prefix}_confusion_binary.png",
        "Binary confusion",
    )
    if result["binary"]["roc_auc"] is not None:
        plot_roc(labels, probs, out_dir / f"{prefix}_roc.png")
    return result
