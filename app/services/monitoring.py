"""Model monitoring from recorded reviews: how often people agree with the model's call.

The maths (`summarize`) works on plain lists so it can be checked against hand-computed numbers;
`load_report` only fetches those lists from the database. A prediction counts once, with the label
of its latest review (highest review id, the same rule as `predictions.final_label`).
"""

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime

from sklearn.metrics import cohen_kappa_score, confusion_matrix
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import BatchItem, Prediction, Review
from app.domain import ActorKind
from app.errors import InputError, PermissionDeniedError
from app.ml.classes import ABNORMAL_CLASSES, CLASS_LABELS, CLASS_NAMES
from app.roles import Role
from app.services import audit
from app.services.actors import Actor
from app.services.calls import CallPolicy

VIEWER_ROLES = frozenset({Role.ADMIN, Role.PATHOLOGIST})


@dataclass(frozen=True)
class ClassAgreement:
    """Of the reviewed cells the model called `class_name`, how many the reviewer kept."""

    class_name: str
    label: str
    called: int
    confirmed: int
    rate: float | None  # None when the model never made this call


@dataclass(frozen=True)
class DayRate:
    day: date  # UTC date of the latest review
    reviewed: int
    overridden: int
    rate: float


@dataclass(frozen=True)
class Metrics:
    """Agreement numbers for one model version, or for all of them (model_version None)."""

    model_version: str | None
    reviewed: int
    agreed: int
    agreement_rate: float | None
    override_rate: float | None
    kappa: float | None  # None when undefined: no reviews, or both sides used one and the same class
    confusion: list[list[int]]  # rows: model call, columns: final human label, both in CLASS_NAMES order
    per_class: list[ClassAgreement]
    over_time: list[DayRate]


@dataclass(frozen=True)
class MissedCell:
    """A cell the model called normal at the cut-off that a reviewer labelled abnormal."""

    prediction_id: int
    accession_id: str | None
    batch_item_id: int | None
    abnormal_probability: float
    model_class: str
    final_label: str
    reviewer: str
    reviewed_at: datetime


@dataclass(frozen=True)
class QcOutcome:
    """The QC sample (confident normal calls shown to a person): what the reviewers found."""

    sampled: int
    reviewed: int
    confirmed_normal: int
    found_abnormal: int
    found_abnormal_ids: list[int]  # prediction ids


@dataclass(frozen=True)
class ReviewerAgreement:
    """Every review a person made (amended ones too) against the model's top class."""

    reviewer: str
    role: str
    reviews: int
    agreed: int
    agreement_rate: float | None
    amended_later: int  # their review was amended by a later one


@dataclass(frozen=True)
class Safety:
    """The binary call at the lab's cut-off against the final labels: a missed abnormal cell is the costly error."""

    abnormal_threshold: float
    reviewed: int
    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int
    sensitivity: float | None  # of the cells reviewed abnormal, the share called abnormal
    specificity: float | None  # of the cells reviewed normal, the share called normal
    missed: list[MissedCell]
    qc: QcOutcome
    reviewers: list[ReviewerAgreement]


@dataclass(frozen=True)
class Report:
    date_from: date | None
    date_to: date | None
    overall: Metrics
    by_version: list[Metrics]
    safety: Safety | None = None


def check_can_view(actor: Actor) -> None:
    """Agreement statistics are for admins and pathologists, not for API clients or other roles."""
    if actor.kind != ActorKind.USER or actor.role not in VIEWER_ROLES:
        raise PermissionDeniedError("monitoring is for administrators and pathologists")


def kappa(model_calls: list[str], final_labels: list[str]) -> float | None:
    """Cohen's kappa over the 7 classes; None where it is undefined (0/0) instead of NaN."""
    if not model_calls or len(set(model_calls) | set(final_labels)) == 1:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(cohen_kappa_score(model_calls, final_labels, labels=list(CLASS_NAMES)))
    return None if math.isnan(value) else value


def metrics(
    model_calls: list[str], final_labels: list[str], dates: list[date], model_version: str | None = None
) -> Metrics:
    """All the numbers for one group of reviewed predictions (parallel lists)."""
    n = len(model_calls)
    agreed = sum(call == final for call, final in zip(model_calls, final_labels, strict=True))
    matrix = (
        confusion_matrix(model_calls, final_labels, labels=list(CLASS_NAMES)).tolist()
        if n
        else [[0] * len(CLASS_NAMES) for _ in CLASS_NAMES]
    )
    per_class = []
    for i, name in enumerate(CLASS_NAMES):
        called, confirmed = sum(matrix[i]), matrix[i][i]
        per_class.append(
            ClassAgreement(name, CLASS_LABELS[name], called, confirmed, confirmed / called if called else None)
        )
    days: dict[date, list[int]] = defaultdict(lambda: [0, 0])
    for call, final, day in zip(model_calls, final_labels, dates, strict=True):
        days[day][0] += 1
        days[day][1] += call != final
    return Metrics(
        model_version=model_version,
        reviewed=n,
        agreed=agreed,
        agreement_rate=agreed / n if n else None,
        override_rate=(n - agreed) / n if n else None,
        kappa=kappa(model_calls, final_labels),
        confusion=[[int(c) for c in row] for row in matrix],
        per_class=per_class,
        over_time=[DayRate(d, total, over, over / total) for d, (total, over) in sorted(days.items())],
    )


def summarize(
    model_calls: list[str],
    final_labels: list[str],
    versions: list[str],
    dates: list[date],
    date_from: date | None = None,
    date_to: date | None = None,
) -> Report:
    """Overall and per-model-version metrics, limited to reviews dated within [date_from, date_to]."""
    if date_from and date_to and date_from > date_to:
        raise InputError("date_from must not be after date_to")
    rows = [
        row
        for row in zip(model_calls, final_labels, versions, dates, strict=True)
        if (date_from is None or row[3] >= date_from) and (date_to is None or row[3] <= date_to)
    ]
    for call, final, _, _ in rows:
        if call not in CLASS_NAMES or final not in CLASS_NAMES:
            raise InputError(f"unknown class in {call!r} / {final!r}")

    def group(selected: list[tuple[str, str, str, date]], version: str | None) -> Metrics:
        return metrics([r[0] for r in selected], [r[1] for r in selected], [r[3] for r in selected], version)

    by_version = [group([r for r in rows if r[2] == v], v) for v in sorted({r[2] for r in rows})]
    return Report(date_from, date_to, group(rows, None), by_version)


def load_report(
    session: Session, date_from: date | None = None, date_to: date | None = None, policy: CallPolicy | None = None
) -> Report:
    """The report over every prediction with at least one review, by its latest review; with the lab's
    call policy, the safety numbers too."""
    latest = (
        select(Review.prediction_id, func.max(Review.id).label("review_id")).group_by(Review.prediction_id).subquery()
    )
    query = (
        select(Prediction.predicted_class, Review.label, Prediction.model_version, Review.created_at)
        .join(latest, latest.c.prediction_id == Prediction.id)
        .join(Review, Review.id == latest.c.review_id)
        .order_by(Prediction.id)
    )
    rows = session.execute(query).all()
    report = summarize(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [utc_day(r[3]) for r in rows],
        date_from,
        date_to,
    )
    if policy is None:
        return report
    return replace(report, safety=load_safety(session, policy, date_from, date_to))


def read_report(
    session: Session,
    actor: Actor,
    date_from: date | None,
    date_to: date | None,
    policy: CallPolicy | None,
    **detail: object,
) -> Report:
    """The report for someone allowed to see it (see check_can_view), with the read on the audit trail."""
    check_can_view(actor)
    report = load_report(session, date_from, date_to, policy)
    dates = {"date_from": date_from and date_from.isoformat(), "date_to": date_to and date_to.isoformat()}
    audit.record_read(session, actor, "monitoring.read", None, None, **detail, **dates)
    return report


def _in_period(moment: datetime, date_from: date | None, date_to: date | None) -> bool:
    day = utc_day(moment)
    return (date_from is None or day >= date_from) and (date_to is None or day <= date_to)


def binary_rates(called_abnormal: list[bool], reviewed_abnormal: list[bool]) -> tuple[int, int, int, int]:
    """(true positive, false negative, true negative, false positive) of the cut-off call against the labels."""
    pairs = list(zip(called_abnormal, reviewed_abnormal, strict=True))
    return (
        sum(c and r for c, r in pairs),
        sum(not c and r for c, r in pairs),
        sum(not c and not r for c, r in pairs),
        sum(c and not r for c, r in pairs),
    )


def load_safety(session: Session, policy: CallPolicy, date_from: date | None, date_to: date | None) -> Safety:
    """Sensitivity and specificity of the cut-off call, missed abnormal cells, QC outcomes and agreement per
    reviewer, over cells whose latest review falls in the period."""
    reviewed = [
        p
        for p in session.scalars(select(Prediction).where(Prediction.reviews.any()).order_by(Prediction.id))
        if _in_period(p.reviews[-1].created_at, date_from, date_to)
    ]
    called = [policy.calls_abnormal(p) for p in reviewed]
    truth = [p.reviews[-1].label in ABNORMAL_CLASSES for p in reviewed]
    tp, fn, tn, fp = binary_rates(called, truth)
    items = {
        i.prediction_id: i
        for i in session.scalars(select(BatchItem).where(BatchItem.prediction_id.in_([p.id for p in reviewed])))
    }
    missed = [
        MissedCell(
            p.id,
            p.accession_id,
            items[p.id].id if p.id in items else None,
            p.abnormal_probability,
            p.predicted_class,
            p.reviews[-1].label,
            p.reviews[-1].reviewer.username,
            p.reviews[-1].created_at,
        )  # fmt: skip
        for p, c, t in zip(reviewed, called, truth, strict=True)
        if t and not c
    ]
    missed.sort(key=lambda m: m.abnormal_probability)
    qc_items = list(session.scalars(select(BatchItem).where(BatchItem.qc_sample.is_(True))))
    qc_reviewed = [p for p in reviewed if p.id in {i.prediction_id for i in qc_items}]
    found = [p.id for p in qc_reviewed if p.reviews[-1].label in ABNORMAL_CLASSES]
    qc = QcOutcome(len(qc_items), len(qc_reviewed), len(qc_reviewed) - len(found), len(found), found)
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    roles: dict[str, str] = {}
    for p in session.scalars(select(Prediction).where(Prediction.reviews.any())):
        for position, review in enumerate(p.reviews):
            if not _in_period(review.created_at, date_from, date_to):
                continue
            name = review.reviewer.username
            roles[name] = review.reviewer.role
            per[name][0] += 1
            per[name][1] += review.label == p.predicted_class
            per[name][2] += position + 1 < len(p.reviews)
    reviewers = [
        ReviewerAgreement(name, roles[name], n, agreed, agreed / n if n else None, later)
        for name, (n, agreed, later) in sorted(per.items())
    ]
    return Safety(
        abnormal_threshold=policy.abnormal_threshold,
        reviewed=len(reviewed),
        true_positive=tp,
        false_negative=fn,
        true_negative=tn,
        false_positive=fp,
        sensitivity=tp / (tp + fn) if tp + fn else None,
        specificity=tn / (tn + fp) if tn + fp else None,
        missed=missed,
        qc=qc,
        reviewers=reviewers,
    )


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()
