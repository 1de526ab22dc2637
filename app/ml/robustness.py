"""`papcad robustness`: a model's metrics on its grouped split under each named shift (`app.ml.shifts`).

Per shift: 7-class accuracy, binary ROC AUC of P(abnormal), sensitivity and specificity at the card's
cut-off, and (when the model has an OOD model) the share of cells it still calls typical, each with its
change from the unshifted row. The images go through the same preprocessing and compiled, batched forward
pass (with test-time augmentation) as serving.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn import metrics  # noqa: E402
from tqdm import tqdm  # noqa: E402

from app.ml.artifact import read_card, write_card  # noqa: E402
from app.ml.classifier import Classifier  # noqa: E402
from app.ml.data import Dataset, fixed_split  # noqa: E402
from app.ml.evaluation import ABNORMAL_MASK  # noqa: E402
from app.ml.ood_fit import check_dataset  # noqa: E402
from app.ml.preprocessing import InputSpec, decode_image, prepare_image  # noqa: E402
from app.ml.shifts import Shift, standard_shifts  # noqa: E402

SPLITS = ("test", "validation")
METRICS = ("accuracy_7class", "roc_auc", "sensitivity", "specificity", "in_distribution")


def shift_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float, ood_scores: np.ndarray | None
) -> dict[str, Any]:
    """7-class accuracy, binary ROC AUC, and sensitivity/specificity of P(abnormal) >= threshold."""
    truth = ABNORMAL_MASK[labels].astype(int)
    p_abnormal = probs[:, ABNORMAL_MASK].sum(axis=1)
    called = (p_abnormal >= threshold).astype(int)
    tn, fp, fn, tp = metrics.confusion_matrix(truth, called, labels=[0, 1]).ravel()
    return {
        "accuracy_7class": float(metrics.accuracy_score(labels, probs.argmax(axis=1))),
        "roc_auc": float(metrics.roc_auc_score(truth, p_abnormal)) if len(set(truth)) == 2 else None,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "in_distribution": None if ood_scores is None else float(np.mean(ood_scores <= 1.0)),
    }


def crops(subset: Dataset) -> list[Image.Image]:
    """The cells' images as an upload would bring them: decoded, not yet shifted or resized."""
    return [decode_image(sample.path.read_bytes()) for sample in subset.samples]


def shifted_pixels(
    images: list[Image.Image], shifts: list[Shift], spec: InputSpec
) -> Iterator[tuple[Shift, np.ndarray]]:
    """Each shift with the images under it, prepared for the network exactly as serving prepares an upload."""
    for shift in tqdm(shifts, desc="shifts", unit="shift"):
        yield shift, np.stack([prepare_image(shift(image), spec) for image in images])


def run_shifts(
    classifier: Classifier, images: list[Image.Image], labels: np.ndarray, shifts: list[Shift], threshold: float
) -> list[dict[str, Any]]:
    """One row per shift (the first must be "none"), with deltas against it."""
    rows = []
    for shift, pixels in shifted_pixels(images, shifts, classifier.spec):
        probs, features = classifier.predict_pixels_with_features(pixels)
        probs = classifier.routed(pixels, probs, features)  # as served (an adapted model's general cells routed)
        scores = classifier.ood.scores(features) if classifier.ood is not None else None
        rows.append(
            {"shift": shift.name, "params": shift.params, "description": shift.description}
            | shift_metrics(labels, probs, threshold, scores)
        )
    base = rows[0]
    for row in rows:
        row["delta"] = {k: None if row[k] is None or base[k] is None else round(row[k] - base[k], 6) for k in METRICS}
    return rows


def plot_robustness(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars per shift: ROC AUC and sensitivity at the cut-off (and 7-class accuracy)."""
    names = [r["shift"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 4.8))
    series = (
        ("roc_auc", "ROC AUC"),
        ("sensitivity", "sensitivity at cut-off"),
        ("accuracy_7class", "7-class accuracy"),
    )
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        ax.bar(x + (i - 1) * width, [r[key] or 0 for r in rows], width, label=label)
    ax.axhline(rows[0]["roc_auc"] or 0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v * 100:.1f} %"

    def delta(v: float | None, scale: float = 100.0, fmt: str = "{:+.1f}") -> str:
        return "" if v is None else " (" + fmt.format(v * scale) + ")"

    head = (
        "| shift | 7-class acc | ROC AUC | sensitivity | specificity | in distribution |\n|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        d = r["delta"] if r["shift"] != "none" else {}
        auc = "–" if r["roc_auc"] is None else f"{r['roc_auc']:.3f}"
        lines.append(
            f"| {r['shift']} | {pct(r['accuracy_7class'])}{delta(d.get('accuracy_7class'))} "
            f"| {auc}{delta(d.get('roc_auc'), 1, '{:+.3f}')} "
            f"| {pct(r['sensitivity'])}{delta(d.get('sensitivity'))} "
            f"| {pct(r['specificity'])}{delta(d.get('specificity'))} "
            f"| {pct(r['in_distribution'])}{delta(d.get('in_distribution'))} |"
        )
    return head + "\n".join(lines) + "\n"


def robustness_model_dir(
    model_dir: Path, dataset: Dataset, split: str = "test", out: Path | None = None, limit: int | None = None
) -> dict[str, Any]:
    """Run the suite on the card's grouped split; write JSON, the plot, and (test split) the card's summary."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    check_dataset(card, dataset)
    classifier = Classifier.load(model_dir, batch_size=64, precision="float32")
    info = card["data"]["split"]
    parts = fixed_split(dataset, info["seed"], val_folds=info["val_folds"])
    indices = parts.test if split == "test" else parts.val
    indices = indices[:limit] if limit else indices
    subset = dataset.subset(indices)
    images = crops(subset)
    threshold = classifier.abnormal_threshold
    rows = run_shifts(classifier, images, subset.labels, standard_shifts(images), threshold)

    suffix = "" if split == "test" else f"_{split}"
    out = Path(out) if out else model_dir / f"robustness{suffix}.json"
    plot = model_dir / f"robustness{suffix}.png"
    plot_robustness(rows, plot, f"{card['version']}: {split} split under shifts (n={len(indices)})")
    result = {
        "model_version": card["version"],
        "split": split,
        "n": int(len(indices)),
        "abnormal_threshold": threshold,
        "tta": classifier.predictor.tta,
        "probabilities": "calibrated",
        "limit": limit,
        "shifts": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    if split == "test" and not limit:
        card["robustness"] = {
            "split": split,
            "n": result["n"],
            "abnormal_threshold": threshold,
            "details": out.name if out.parent.resolve() == model_dir.resolve() else str(out),
            "plot": plot.name,
            "shifts": {r["shift"]: {k: (None if r[k] is None else round(r[k], 4)) for k in METRICS} for r in rows},
            "command": f"papcad robustness --model {model_dir.as_posix()} --data <herlev folder>",
        }
        write_card(model_dir, card)
    return result
