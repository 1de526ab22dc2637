"""Is this input like the cells the model was trained on? A distance in the network's own feature space.

The score is the Mahalanobis distance (Lee et al., 2018) of an image's pooled ResNet50 features to the
nearest class mean of the training split, with one covariance shared by all classes (estimated with
Ledoit-Wolf shrinkage: 2048 features from a few hundred cells need it). It is divided by the cut-off
chosen on the validation split, so a score <= 1 means "as typical as 95 % of validation cells" and > 1
means "not a typical cell". The features come from the same forward pass as the call (see `inference`).

Stored next to the weights as `ood.npz` (float32 means and precision matrix, the raw cut-off), named in
the card's "ood" section with its SHA-256 and checked on load like the weights.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf

OOD_FILE = "ood.npz"
# Share of in-distribution (validation) cells the cut-off keeps: 5 % of typical cells go to review.
KEEP_IN_DISTRIBUTION = 0.95
METHOD = (
    "class-conditional Mahalanobis distance on the pooled ResNet50 features (TTA-averaged), "
    "shared Ledoit-Wolf covariance, fitted on the training split; cut-off = validation quantile"
)


@dataclass(frozen=True)
class FeatureDistance:
    """Class means and a shared precision matrix of the training features, and the validation cut-off."""

    means: np.ndarray  # (classes, d) float32
    precision: np.ndarray  # (d, d) float32
    cutoff: float  # raw distance at the KEEP_IN_DISTRIBUTION quantile of validation cells

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> "FeatureDistance":
        """Means per class present and the shrunk covariance of the class-centred features (no cut-off yet)."""
        features = np.asarray(features, dtype=np.float64)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
        return cls(means.astype(np.float32), precision.astype(np.float32), float("nan"))

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

    def with_cutoff(self, validation_features: np.ndarray, keep: float = KEEP_IN_DISTRIBUTION) -> "FeatureDistance":
        """The same model with its cut-off at the `keep` quantile of the validation cells' distances."""
        cutoff = float(np.quantile(self.distances(validation_features), keep))
        return FeatureDistance(self.means, self.precision, cutoff)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Distance / cut-off: <= 1 in distribution, > 1 not a typical cell."""
        return self.distances(features) / self.cutoff

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez_compressed(
                handle,
                means=self.means.astype(np.float32),
                precision=self.precision.astype(np.float32),
                cutoff=np.float32(self.cutoff),
            )

    @classmethod
    def load(cls, path: Path) -> "FeatureDistance":
        """Raises ValueError for a file that is not one `save` wrote."""
        with np.load(path) as stored:
            if set(stored.files) != {"means", "precision", "cutoff"}:
                raise ValueError(f"{Path(path).name} holds {sorted(stored.files)}, not an OOD model")
            means, precision, cutoff = stored["means"], stored["precision"], float(stored["cutoff"])
        d = means.shape[1]
        if precision.shape != (d, d) or not np.isfinite(cutoff) or cutoff <= 0:
            raise ValueError(f"{Path(path).name} is inconsistent (means {means.shape}, precision {precision.shape})")
        return cls(means, precision, cutoff)
