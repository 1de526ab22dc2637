"""Routing of an adapted model: the lab's cells to the site network, every other cell to the general model.

One network cannot both learn a laboratory's stain and framing well and keep every call it made on the
general model's data: fine-tuning that moves the site's cells moves some of the others too (the forgetting
check counted about 15 of Herlev's 184 test calls changing, both ways). So an adapted model directory holds
two networks:

    <adapted>/            the site network (weights, typical-cell model, int8), fine-tuned on the site alone
    <adapted>/general/    a copy of the general model it was adapted from, unchanged
    <adapted>/gate.npz    a linear classifier on the site network's pooled features: site cell or not

A cell the gate places at the site gets the site network's call; any other cell gets the general model's
call, exactly as before the adaptation. The gate is fitted on the site's training cells against the general
model's training images (`adapt`), and the card records how well it tells the validation cells apart.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

GATE_FILE = "gate.npz"
GENERAL_DIR = "general"


@dataclass(frozen=True)
class DomainGate:
    """Logistic regression on standardised features: P(the cell is the site's)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, site: np.ndarray, general: np.ndarray, strength: float = 0.1) -> "DomainGate":
        """strength: the inverse L2 penalty (scikit-learn's C); small, because the features far outnumber the
        cells and a gate that memorises its training cells routes new ones badly."""
        from sklearn.linear_model import LogisticRegression

        x = np.concatenate([site, general]).astype(np.float64)
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        labels = np.r_[np.ones(len(site)), np.zeros(len(general))]
        model = LogisticRegression(C=strength, max_iter=5000, class_weight="balanced").fit((x - mean) / scale, labels)
        return cls(mean, scale, model.coef_[0].copy(), float(model.intercept_[0]))

    def site_probability(self, features: np.ndarray) -> np.ndarray:
        logits = ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept
        probability: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))
        return probability

    def general(self, features: np.ndarray) -> np.ndarray:
        """Which cells go to the general model (boolean per row)."""
        general: np.ndarray = self.site_probability(features) < 0.5
        return general

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, scale=self.scale, coef=self.coef, intercept=np.array(self.intercept))

    @classmethod
    def load(cls, path: Path) -> "DomainGate":
        with np.load(path) as data:
            return cls(data["mean"], data["scale"], data["coef"], float(data["intercept"]))
