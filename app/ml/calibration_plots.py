"""Calibration plots for the evaluation command (matplotlib), kept apart from the maths the server uses."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from app.ml.calibration import expected_calibration_error  # noqa: E402


def reliability_diagram(before: np.ndarray, after: np.ndarray, labels: np.ndarray, path: Path, bins: int = 10) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for probs, name in ((before, "before"), (after, "after")):
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            if (which == b).any():
                xs.append(confidence[which == b].mean())
                ys.append(correct[which == b].mean())
        ece = expected_calibration_error(probs, labels, bins)
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
