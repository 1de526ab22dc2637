"""The lab's reading of a prediction: the normal/abnormal call at its cut-off, and why a person must look.

A cell needs review when any of these holds (each gives a short reason):
  * P(abnormal) lies within the uncertainty band of the cut-off;
  * the top class and the cut-off call disagree (a dysplasia/carcinoma top class under the cut-off, or a
    normal top class at or over it);
  * the image is not a typical cell (OOD score over its cut-off);
  * the input checks found something odd in the file (size, flatness, exposure, bit depth, ...).
The same rule exists as a SQL expression for the review queue's filter.

How unsure a call is (`uncertainty`, the queue's "most uncertain first") is measured from the same cut-off:
1 at the cut-off, falling linearly to 0 at P(abnormal) 0 or 1 on its side, so with a cut-off of 0.74 a cell
at 0.72 is far less sure than one at 0.5. The queue sorts by the same arithmetic in SQL.

Every prediction is read at the cut-off of the model version that made it (each version's card chose its own
on its own validation cells), so a promotion or a rollback changes the calls of new cells only; a cut-off the
lab sets itself (PAPCAD_ABNORMAL_THRESHOLD) holds for every version.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import ColumnElement, and_, case, literal, or_

from app.db.models import Prediction
from app.ml.classes import ABNORMAL_CLASSES, CLASS_LABELS, NORMAL_CLASSES


class Scored(Protocol):
    """What the rule reads: a stored prediction row (or anything with the same attributes)."""

    abnormal_probability: float
    predicted_class: str
    model_version: str
    in_distribution: bool | None
    ood_score: float | None
    input_flags: list[str] | None


@dataclass(frozen=True)
class CallPolicy:
    """P(abnormal) cut-offs, one per model version, and a band around the cut-off that needs a person.

    abnormal_threshold: the cut-off of the model serving now (what pages state as "the cut-off"), and of any
    version not in `cutoffs`. cutoffs: model version -> its own cut-off.
    """

    abnormal_threshold: float
    uncertainty_band: float
    cutoffs: Mapping[str, float] = field(default_factory=dict)

    def cutoff(self, model_version: str | None = None) -> float:
        """The cut-off that reads the calls of `model_version` (the serving model's when None or unknown)."""
        if model_version is None:
            return self.abnormal_threshold
        return self.cutoffs.get(model_version, self.abnormal_threshold)

    def cutoff_of(self, p: Scored) -> float:
        return self.cutoff(self._version(p))

    @staticmethod
    def _version(p: Scored) -> str | None:
        return getattr(p, "model_version", None)  # None: a bare score without its model reads at the current cut-off

    def is_abnormal(self, abnormal_probability: float, model_version: str | None = None) -> bool:
        return abnormal_probability >= self.cutoff(model_version)

    def calls_abnormal(self, p: Scored) -> bool:
        """The prediction's normal/abnormal call, at the cut-off of the model that made it."""
        return self.is_abnormal(p.abnormal_probability, self._version(p))

    def near_cutoff(self, abnormal_probability: float, model_version: str | None = None) -> bool:
        return abs(abnormal_probability - self.cutoff(model_version)) <= self.uncertainty_band

    def disagrees(self, predicted_class: str, abnormal_probability: float, model_version: str | None = None) -> bool:
        """The top class says one thing and the cut-off call the other."""
        return (predicted_class in ABNORMAL_CLASSES) != self.is_abnormal(abnormal_probability, model_version)

    def review_reasons(self, p: Scored) -> list[str]:
        """Why this prediction needs a person; empty when none applies."""
        prob, version, cut = p.abnormal_probability, self._version(p), self.cutoff_of(p)
        reasons = []
        if self.near_cutoff(prob, version):
            reasons.append(
                f"near the cut-off (P(abnormal) {prob:.2f}, cut-off {cut:.2f} ± {self.uncertainty_band:.2f})"
            )
        if self.disagrees(p.predicted_class, prob, version):
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

    def uncertainty(self, p: Scored) -> float:
        """How unsure the prediction's normal/abnormal call is: 1 at its model's cut-off, 0 at P(abnormal) 0 or 1."""
        return uncertainty_at(p.abnormal_probability, self.cutoff_of(p))

    def cutoff_clause(self) -> ColumnElement[float]:
        """`cutoff_of` as a SQL expression on the predictions table: each row at its own model's cut-off."""
        if self.cutoffs:
            return case(dict(self.cutoffs), value=Prediction.model_version, else_=self.abnormal_threshold)
        return literal(self.abnormal_threshold)

    def uncertainty_clause(self) -> ColumnElement[float]:
        """`uncertainty` as a SQL expression on the predictions table, with the very same float operations in the
        same order (so the database ranks and ties cells as the scores shown beside them do)."""
        prob, cut = Prediction.abnormal_probability, self.cutoff_clause()
        return case(
            (prob == cut, 1.0),
            (prob < cut, 1.0 - (cut - prob) / cut),
            else_=1.0 - (prob - cut) / (1.0 - cut),
        )

    def needs_review_clause(self) -> ColumnElement[bool]:
        """`needs_review` as a SQL condition on the predictions table (for filtering in the database)."""
        band, cut = self.uncertainty_band, self.cutoff_clause()
        prob = Prediction.abnormal_probability
        return or_(
            prob.between(cut - band, cut + band),
            and_(Prediction.predicted_class.in_(sorted(ABNORMAL_CLASSES)), prob < cut),
            and_(Prediction.predicted_class.in_(sorted(NORMAL_CLASSES)), prob >= cut),
            Prediction.in_distribution.is_(False),
            Prediction.input_flags.is_not(None),
        )


def uncertainty_at(abnormal_probability: float, cutoff: float) -> float:
    """1 at the cut-off, falling linearly to 0 at P(abnormal) 0 (below it) or 1 (above it).

    Each side is scaled by its own width, so a cut-off of 0 or 1 never divides by zero for a probability:
    P under the cut-off implies cut-off > 0, P over it implies cut-off < 1. `CallPolicy.uncertainty_clause`
    must stay the same arithmetic.
    """
    p, cut = abnormal_probability, cutoff
    if p == cut:
        return 1.0
    if p < cut:
        return 1.0 - (cut - p) / cut
    return 1.0 - (p - cut) / (1.0 - cut)
