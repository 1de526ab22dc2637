"""The lab's reading of a prediction: the normal/abnormal call at its cut-off, and why a person must look.

A cell needs review when any of these holds (each gives a short reason):
  * P(abnormal) lies within the uncertainty band of the cut-off;
  * the top class and the cut-off call disagree (a dysplasia/carcinoma top class under the cut-off, or a
    normal top class at or over it);
  * the image is not a typical cell (OOD score over its cut-off);
  * the input checks found something odd in the file (size, flatness, exposure, bit depth, ...).
The same rule exists as a SQL expression for the review queue's filter.
"""

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import ColumnElement, and_, or_

from app.db.models import Prediction
from app.ml.classes import ABNORMAL_CLASSES, CLASS_LABELS, NORMAL_CLASSES


class Scored(Protocol):
    """What the rule reads: a stored prediction row (or anything with the same attributes)."""

    abnormal_probability: float
    predicted_class: str
    in_distribution: bool | None
    ood_score: float | None
    input_flags: list[str] | None


@dataclass(frozen=True)
class CallPolicy:
    """A P(abnormal) cut-off, and a band around it that needs a person."""

    abnormal_threshold: float
    uncertainty_band: float

    def is_abnormal(self, abnormal_probability: float) -> bool:
        return abnormal_probability >= self.abnormal_threshold

    def near_cutoff(self, abnormal_probability: float) -> bool:
        return abs(abnormal_probability - self.abnormal_threshold) <= self.uncertainty_band

    def disagrees(self, predicted_class: str, abnormal_probability: float) -> bool:
        """The top class says one thing and the cut-off call the other."""
        return (predicted_class in ABNORMAL_CLASSES) != self.is_abnormal(abnormal_probability)

    def review_reasons(self, p: Scored) -> list[str]:
        """Why this prediction needs a person; empty when none applies."""
        prob, cut = p.abnormal_probability, self.abnormal_threshold
        reasons = []
        if self.near_cutoff(prob):
            reasons.append(
                f"near the cut-off (P(abnormal) {prob:.2f}, cut-off {cut:.2f} ± {self.uncertainty_band:.2f})"
            )
        if self.disagrees(p.predicted_class, prob):
            side = "under" if p.predicted_class in ABNORMAL_CLASSES else "at or over"
            reasons.append(
                f"top class {CLASS_LABELS[p.predicted_class]} but P(abnormal) {prob:.2f} {side} the cut-off {cut:.2f}"
            )
        if p.in_distribution is False:
            score = f" (OOD score {p.ood_score:.1f}; typical cells score at most 1)" if p.ood_score is not None else ""
            reasons.append(f"not a typical cell{score}")
        reasons.extend(p.input_flags or [])
        return reasons

    def needs_review(self, p: Scored) -> bool:
        return bool(self.review_reasons(p))

    def needs_review_clause(self) -> ColumnElement[bool]:
        """`needs_review` as a SQL condition on the predictions table (for filtering in the database)."""
        cut, band = self.abnormal_threshold, self.uncertainty_band
        prob = Prediction.abnormal_probability
        return or_(
            prob.between(cut - band, cut + band),
            and_(Prediction.predicted_class.in_(sorted(ABNORMAL_CLASSES)), prob < cut),
            and_(Prediction.predicted_class.in_(sorted(NORMAL_CLASSES)), prob >= cut),
            Prediction.in_distribution.is_(False),
            Prediction.input_flags.is_not(None),
        )
