"""Is this input like the cells the model was trained on? Distances in the network's own feature space.

For each of several ResNet50 stages, the Mahalanobis distance (Lee et al., 2018) of the image's
average-pooled stage output to the nearest class mean of the training split, with one covariance per stage
shared by all classes (Ledoit-Wolf shrinkage: up to 2048 features from a few hundred cells need it). Why
several stages: the last one holds what the classifier learnt to ignore. A network trained on noisy,
blurred and recoloured cells maps pixel noise close to a cell in its final features, while the early stages
still see texture no cell has. Each stage's distance is divided by its own validation quantile, the score is
the largest of these ratios divided by the cut-off chosen on the validation split: a score <= 1 means "as
typical as 95 % of validation cells", > 1 means "not a typical cell". The features come from the same
forward pass as the call (see `inference`).

Stored next to the weights as `ood.npz` (per stage: float32 means and precision matrix; the stage scales
and the cut-off), named in the card's "ood" section with its SHA-256 and checked on load like the weights.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OOD_FILE = "ood.npz"
# Share of in-distribution (validation) cells the cut-off keeps: 5 % of typical cells go to review.
KEEP_IN_DISTRIBUTION = 0.95
METHOD = (
    "class-conditional Mahalanobis distance per ResNet50 stage (average-pooled stage outputs, TTA-averaged), "
    "shared Ledoit-Wolf covariance per stage, fitted on the training split; score = largest distance / "
    "stage's validation quantile; cut-off = validation quantile of that score"
)


@dataclass(frozen=True)
class StageDistance:
    """Class means and a shared precision matrix of one stage's training features, and its validation scale."""

    means: np.ndarray  # (classes, d) float32
    precision: np.ndarray  # (d, d) float32
    scale: float = 1.0  # the stage's raw distance at the KEEP_IN_DISTRIBUTION quantile of validation cells

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> "StageDistance":
        """Means per class present and the shrunk covariance of the class-centred features."""
        from sklearn.covariance import LedoitWolf  # fitting only: a server never pays for importing scikit-learn

        features = np.asarray(features, dtype=np.float64)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
        return cls(means.astype(np.float32), precision.astype(np.float32))

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(n, d) features -> (n,) Mahalanobis distance to the nearest class mean."""
        f = np.asarray(features, dtype=np.float64)
        precision = self.precision.astype(np.float64)
        means = self.means.astype(np.float64)
        fp = f @ precision
        squared = (
            np.einsum("nd,nd->n", fp, f)[:, None]
            - 2.0 * fp @ means.T
            + np.einsum("kd,kd->k", means @ precision, means)[None, :]
        )
        distances: np.ndarray = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
        return distances


@dataclass(frozen=True)
class FeatureDistance:
    """One StageDistance per stage of the feature vector (`dims` long each, in order) and the combined cut-off."""

    stages: tuple[StageDistance, ...]
    cutoff: float  # the combined ratio at the KEEP_IN_DISTRIBUTION quantile of validation cells

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(stage.means.shape[1]) for stage in self.stages)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, dims: tuple[int, ...] | None = None) -> "FeatureDistance":
        """Fit every stage (dims: the stage widths the feature vector is made of; default one stage). No cut-off."""
        parts = _split(features, dims or (np.shape(features)[1],))
        return cls(tuple(StageDistance.fit(part, labels) for part in parts), float("nan"))

    def _ratios(self, features: np.ndarray) -> np.ndarray:
        """(n, stages) raw distance / stage scale."""
        parts = _split(features, self.dims)
        return np.stack([s.distances(p) / s.scale for s, p in zip(self.stages, parts, strict=True)], axis=1)

    def with_cutoff(self, validation_features: np.ndarray, keep: float = KEEP_IN_DISTRIBUTION) -> "FeatureDistance":
        """Stage scales at the `keep` quantile of the validation cells' distances, then the combined cut-off."""
        parts = _split(validation_features, self.dims)
        stages = tuple(
            StageDistance(s.means, s.precision, float(np.quantile(s.distances(p), keep)))
            for s, p in zip(self.stages, parts, strict=True)
        )
        scaled = FeatureDistance(stages, 1.0)
        return FeatureDistance(stages, float(np.quantile(scaled.scores(validation_features), keep)))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Largest stage ratio / cut-off: <= 1 in distribution, > 1 not a typical cell."""
        result: np.ndarray = self._ratios(features).max(axis=1) / self.cutoff
        return result

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {
            "scales": np.array([s.scale for s in self.stages], dtype=np.float32),
            "cutoff": np.array(self.cutoff, dtype=np.float32),
        }
        for i, stage in enumerate(self.stages):
            arrays[f"means_{i}"] = stage.means.astype(np.float32)
            arrays[f"precision_{i}"] = stage.precision.astype(np.float32)
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    @classmethod
    def load(cls, path: Path) -> "FeatureDistance":
        """Raises ValueError for a file that is not one `save` wrote."""
        name = Path(path).name
        with np.load(path) as stored:
            files = set(stored.files)
            if not {"scales", "cutoff"} <= files:
                raise ValueError(f"{name} holds {sorted(files)}, not an OOD model of this version (run fit-ood)")
            scales, cutoff = stored["scales"], float(stored["cutoff"])
            expected = {"scales", "cutoff"} | {f"{k}_{i}" for i in range(len(scales)) for k in ("means", "precision")}
            if files != expected:
                raise ValueError(f"{name} holds {sorted(files)}, not an OOD model")
            stages = tuple(
                StageDistance(stored[f"means_{i}"], stored[f"precision_{i}"], float(scale))
                for i, scale in enumerate(scales)
            )
        for stage in stages:
            d = stage.means.shape[1]
            if stage.precision.shape != (d, d) or not np.isfinite(stage.scale) or stage.scale <= 0:
                shapes = f"means {stage.means.shape}, precision {stage.precision.shape}"
                raise ValueError(f"{name} is inconsistent ({shapes})")
        if not stages or not np.isfinite(cutoff) or cutoff <= 0:
            raise ValueError(f"{name} is inconsistent (no stages or no cut-off)")
        return cls(stages, cutoff)


def _split(features: np.ndarray, dims: tuple[int, ...]) -> list[np.ndarray]:
    features = np.asarray(features)
    if features.shape[1] != sum(dims):
        raise ValueError(f"features have {features.shape[1]} columns, the stages {sum(dims)}")
    return np.split(features, np.cumsum(dims)[:-1], axis=1)
