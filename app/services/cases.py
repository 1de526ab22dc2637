"""Cases: an accession (one specimen) and all its cells, from single uploads and batches.

Status: open (nothing reviewed) -> in review (a cell reviewed) -> [referred to a pathologist by a
cytotechnologist] -> signed out (by a pathologist, with the final interpretation). A signed-out case is
locked: its cells take no more reviews, and a change is an amendment, with a reason, kept beside the
original report.

The suggested slide-level interpretation (`suggest`) follows a written rule; see its docstring.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Batch, BatchItem, Case, CaseReport, Prediction, Review
from app.domain import PENDING_ITEM_STATUSES, CaseStatus, ItemStatus
from app.errors import ConflictError, InputError, NotFoundError, PermissionDeniedError
from app.ml.classes import BETHESDA_HINT, CLASS_NAMES, NORMAL_CLASSES
from app.roles import Role
from app.services import audit
from app.services.actors import Actor
from app.services.calls import CallPolicy
from app.services.text import has_control_characters

OPEN, IN_REVIEW, REFERRED, SIGNED_OUT = CaseStatus  # the statuses in order
STATUS_LABELS = {OPEN: "open", IN_REVIEW: "in review", REFERRED: "referred to a pathologist", SIGNED_OUT: "signed out"}

# What the rule may suggest, and what a pathologist may sign out (The Bethesda System categories).
NILM, LSIL, HSIL, UNSATISFACTORY = "NILM", "LSIL", "HSIL", "UNSATISFACTORY"
SUGGESTIONS = (NILM, LSIL, HSIL, UNSATISFACTORY)
INTERPRETATIONS: dict[str, str] = {
    "NILM": "Negative for intraepithelial lesion or malignancy (NILM)",
    "ASC-US": "Atypical squamous cells of undetermined significance (ASC-US)",
    "ASC-H": "Atypical squamous cells, cannot exclude HSIL (ASC-H)",
    "LSIL": "Low-grade squamous intraepithelial lesion (LSIL)",
    "HSIL": "High-grade squamous intraepithelial lesion (HSIL)",
    "SCC": "Squamous cell carcinoma (SCC)",
    "AGC": "Atypical glandular cells (AGC)",
    "UNSATISFACTORY": "Unsatisfactory for evaluation",
}
SUGGESTION_LABELS = {**INTERPRETATIONS, UNSATISFACTORY: "Unsatisfactory / needs pathologist"}
PENDING_STATUSES = PENDING_ITEM_STATUSES
MAX_TEXT = 2000


@dataclass(frozen=True)
class Evidence:
    """What the rule reads from one cell."""

    predicted_class: str
    final_label: str | None  # the latest review's label; None while unreviewed
    needs_review: bool  # CallPolicy's reasons are not empty


@dataclass(frozen=True)
class Suggestion:
    interpretation: str  # one of SUGGESTIONS
    reasons: list[str]

    @property
    def label(self) -> str:
        return SUGGESTION_LABELS[self.interpretation]


def suggest(cells: Sequence[Evidence], pending: int = 0) -> Suggestion:
    """The slide-level interpretation the cells suggest, for a pathologist to accept or change.

    Each cell counts with its reviewed label (the latest review), or, while unreviewed, with the
    model's top class, unless the cell needs review (near the cut-off, top class and cut-off call
    disagree, not a typical cell, odd input): such a cell is *unresolved* and counts for nothing.
    Cells still being classified are unresolved too. Then, in this order:

    1. HSIL when any counted cell is moderate or severe dysplasia or carcinoma in situ (the worst
       finding decides, whatever else is unresolved);
    2. "unsatisfactory / needs pathologist" when no cell counts, or any cell is unresolved (it could
       be worse than what the others show);
    3. LSIL when any counted cell is mild dysplasia;
    4. NILM otherwise (every cell counted, all normal).
    """
    counted: list[str] = []
    unresolved = pending
    for cell in cells:
        if cell.final_label is not None:
            counted.append(cell.final_label)
        elif cell.needs_review:
            unresolved += 1
        else:
            counted.append(cell.predicted_class)
    grades = Counter(BETHESDA_HINT[label] for label in counted)
    if grades[HSIL]:
        return Suggestion(HSIL, [f"{grades[HSIL]} cell(s) with moderate or severe dysplasia or carcinoma in situ"])
    if not counted and not unresolved:
        return Suggestion(UNSATISFACTORY, ["no classified cells"])
    if unresolved:
        return Suggestion(
            UNSATISFACTORY, [f"{unresolved} cell(s) unresolved: unreviewed and needing review, or not yet classified"]
        )
    if grades[LSIL]:
        return Suggestion(LSIL, [f"{grades[LSIL]} cell(s) with mild dysplasia"])
    return Suggestion(NILM, [f"all {len(counted)} cells normal"])


@dataclass(frozen=True)
class CaseCell:
    prediction: Prediction
    item: BatchItem | None
    final_label: str | None
    reasons: list[str]
    abnormal_call: bool

    @property
    def must_review(self) -> bool:
        """A person must see this cell before sign-out: abnormal at the cut-off, flagged, or QC-sampled."""
        return self.final_label is None and (
            self.abnormal_call or bool(self.reasons) or bool(self.item and self.item.qc_sample)
        )

    @property
    def overridden(self) -> bool:
        return self.final_label is not None and self.final_label != self.prediction.predicted_class


@dataclass
class CaseSummary:
    accession_id: str
    status: CaseStatus
    case: Case | None
    cells: list[CaseCell]  # most suspicious first
    pending: int
    failed: int
    batches: list[Batch]
    suggestion: Suggestion
    by_call: dict[str, int] = field(default_factory=dict)
    by_cutoff: dict[str, int] = field(default_factory=dict)
    by_final: dict[str, int] = field(default_factory=dict)
    qc: dict[str, int] = field(default_factory=dict)

    @property
    def reviewed(self) -> int:
        return sum(c.final_label is not None for c in self.cells)

    @property
    def must_review(self) -> int:
        return sum(c.must_review for c in self.cells)

    @property
    def reports(self) -> list[CaseReport]:
        return list(self.case.reports) if self.case else []

    @property
    def current(self) -> CaseReport | None:
        return self.reports[-1] if self.reports else None

    @property
    def amended(self) -> bool:
        return len(self.reports) > 1


def validate_accession(accession_id: str) -> str:
    # Imported here: predictions imports this module's users (reviews) at import time.
    from app.services.predictions import validate_accession_id

    value = validate_accession_id(accession_id)
    if value is None:
        raise InputError("accession_id must not be empty")
    return value


def _case_row(session: Session, accession_id: str) -> Case | None:
    return session.scalar(select(Case).where(Case.accession_id == accession_id))


def is_signed_out(session: Session, accession_id: str) -> bool:
    query = select(func.count()).select_from(CaseReport).join(Case).where(Case.accession_id == accession_id)
    return bool(session.scalar(query))


def status_of(case: Case | None, reviewed: int) -> CaseStatus:
    if case is not None and case.reports:
        return SIGNED_OUT
    if case is not None and case.referred_at is not None:
        return REFERRED
    return IN_REVIEW if reviewed else OPEN


def load(session: Session, accession_id: str, policy: CallPolicy) -> CaseSummary:
    """Everything the case page, the API and the report show; NotFoundError for an unknown accession."""
    accession_id = validate_accession(accession_id)
    predictions = list(session.scalars(select(Prediction).where(Prediction.accession_id == accession_id)))
    batches = list(session.scalars(select(Batch).where(Batch.accession_id == accession_id).order_by(Batch.id)))
    items = (
        list(session.scalars(select(BatchItem).where(BatchItem.batch_id.in_([b.id for b in batches]))))
        if batches
        else []
    )
    if not predictions and not items:
        raise NotFoundError(f"no cells for accession {accession_id}")
    item_of = {i.prediction_id: i for i in items if i.prediction_id is not None}
    cells = []
    for p in predictions:
        final = p.reviews[-1].label if p.reviews else None
        cells.append(CaseCell(p, item_of.get(p.id), final, policy.review_reasons(p), policy.calls_abnormal(p)))
    cells.sort(key=lambda c: (-c.prediction.abnormal_probability, c.prediction.id))
    pending = sum(i.status in PENDING_STATUSES for i in items)
    failed = sum(i.status == ItemStatus.FAILED for i in items)
    evidence = [Evidence(c.prediction.predicted_class, c.final_label, bool(c.reasons)) for c in cells]
    case = _case_row(session, accession_id)
    by_final = Counter(c.final_label or "unreviewed" for c in cells)
    qc_cells = [c for c in cells if c.item and c.item.qc_sample]
    summary = CaseSummary(
        accession_id=accession_id,
        status=status_of(case, sum(c.final_label is not None for c in cells)),
        case=case,
        cells=cells,
        pending=pending,
        failed=failed,
        batches=batches,
        suggestion=suggest(evidence, pending),
        by_call={name: sum(c.prediction.predicted_class == name for c in cells) for name in CLASS_NAMES},
        by_cutoff={
            "abnormal": sum(c.abnormal_call for c in cells),
            "normal": sum(not c.abnormal_call for c in cells),
        },
        by_final={name: by_final.get(name, 0) for name in (*CLASS_NAMES, "unreviewed")},
        qc={
            "sampled": len(qc_cells),
            "reviewed": sum(c.final_label is not None for c in qc_cells),
            "confirmed_normal": sum(c.final_label is not None and c.final_label in NORMAL_CLASSES for c in qc_cells),
            "found_abnormal": sum(c.final_label is not None and c.final_label not in NORMAL_CLASSES for c in qc_cells),
        },
    )
    return summary


def read(session: Session, actor: Actor, accession_id: str, policy: CallPolicy) -> CaseSummary:
    """The case, with the read recorded in the audit trail."""
    summary = load(session, accession_id, policy)
    audit.record_read(
        session,
        actor,
        "case.read",
        "case",
        summary.accession_id,
        prediction_ids=[c.prediction.id for c in summary.cells],
    )
    return summary


def _text(value: str | None, name: str, required: bool = False) -> str | None:
    value = (value or "").strip() or None
    if value is None and required:
        raise InputError(f"{name} is required")
    if value is not None and len(value) > MAX_TEXT:
        raise InputError(f"{name} must be at most {MAX_TEXT} characters")
    if has_control_characters(value, allow_newlines=True):
        raise InputError(f"{name} must not contain control characters")
    return value


def _interpretation(value: str | None) -> str:
    if value not in INTERPRETATIONS:
        raise InputError(f"interpretation must be one of: {', '.join(INTERPRETATIONS)}")
    return value


def _require_role(actor: Actor, role: Role, doing: str) -> None:
    if actor.kind != "user" or actor.role != role:
        raise PermissionDeniedError(f"only a {role.value} may {doing}")


def _ensure_case(session: Session, accession_id: str) -> Case:
    """The case row, created on first use; a simultaneous creation by another request is reused."""
    case = _case_row(session, accession_id)
    if case is not None:
        return case
    try:
        with session.begin_nested():
            case = Case(accession_id=accession_id)
            session.add(case)
    except IntegrityError:
        case = _case_row(session, accession_id)
        if case is None:
            raise
    return case


def refer(session: Session, actor: Actor, accession_id: str, note: str | None, policy: CallPolicy) -> CaseSummary:
    """A cytotechnologist sends the case to a pathologist (with an optional note)."""
    _require_role(actor, Role.CYTOTECHNOLOGIST, "refer a case to a pathologist")
    note = _text(note, "note")
    summary = load(session, accession_id, policy)
    if summary.status == SIGNED_OUT:
        raise ConflictError(f"case {summary.accession_id} is already signed out")
    if summary.status == REFERRED:
        raise ConflictError(f"case {summary.accession_id} is already referred to a pathologist")
    case = _ensure_case(session, summary.accession_id)
    case.referred_at, case.referred_by_id, case.referral_note = datetime.now(UTC), actor.id, note
    audit.record(session, actor, "case.refer", "case", summary.accession_id, note=note)
    session.commit()
    return load(session, summary.accession_id, policy)


def _write_report(
    session: Session,
    actor: Actor,
    summary: CaseSummary,
    kind: str,
    interpretation: str,
    comment: str | None,
    reason: str | None,
) -> None:
    case = _ensure_case(session, summary.accession_id)
    session.flush()
    sequence = len(summary.reports) + 1
    session.add(
        CaseReport(
            case_id=case.id,
            sequence=sequence,
            kind=kind,
            interpretation=interpretation,
            suggested=summary.suggestion.interpretation,
            comment=comment,
            reason=reason,
            author_id=actor.id,
        )
    )
    audit.record(
        session,
        actor,
        f"case.{'sign_out' if kind == 'sign_out' else 'amend'}",
        "case",
        summary.accession_id,
        sequence=sequence,
        interpretation=interpretation,
        suggested=summary.suggestion.interpretation,
        comment=comment,
        reason=reason,
        prediction_ids=[c.prediction.id for c in summary.cells],
    )
    try:
        session.commit()
    except IntegrityError as exc:  # another pathologist signed out or amended at the same moment
        session.rollback()
        raise ConflictError(f"case {summary.accession_id} was changed at the same time; reload it") from exc
    session.expire_all()


def sign_out(
    session: Session, actor: Actor, accession_id: str, interpretation: str, comment: str | None, policy: CallPolicy
) -> CaseSummary:
    """A pathologist signs the case out with the final interpretation; the case is locked from then on.

    Refused while cells are still being classified, or while a cell that needs a person (called
    abnormal at the cut-off, flagged needs review, or in the QC sample) is unreviewed.
    """
    _require_role(actor, Role.PATHOLOGIST, "sign out a case")
    interpretation = _interpretation(interpretation)
    comment = _text(comment, "comment")
    summary = load(session, accession_id, policy)
    if summary.status == SIGNED_OUT:
        raise ConflictError(f"case {summary.accession_id} is already signed out; amend it with a reason instead")
    if summary.pending:
        raise ConflictError(f"{summary.pending} cell(s) of case {summary.accession_id} are still being classified")
    if summary.must_review:
        raise ConflictError(
            f"{summary.must_review} cell(s) called abnormal, flagged for review or in the QC sample are unreviewed"
        )
    _write_report(session, actor, summary, "sign_out", interpretation, comment, None)
    return load(session, summary.accession_id, policy)


def amend(
    session: Session,
    actor: Actor,
    accession_id: str,
    interpretation: str,
    comment: str | None,
    reason: str | None,
    policy: CallPolicy,
) -> CaseSummary:
    """A pathologist amends a signed-out case: a new report with a reason, kept beside the original."""
    _require_role(actor, Role.PATHOLOGIST, "amend a case")
    interpretation = _interpretation(interpretation)
    comment = _text(comment, "comment")
    reason = _text(reason, "reason", required=True)
    summary = load(session, accession_id, policy)
    if summary.status != SIGNED_OUT:
        raise ConflictError(f"case {summary.accession_id} is not signed out: there is nothing to amend")
    _write_report(session, actor, summary, "amendment", interpretation, comment, reason)
    return load(session, summary.accession_id, policy)


@dataclass(frozen=True)
class CaseRow:
    accession_id: str
    cells: int
    reviewed: int
    last_at: datetime
    status: CaseStatus


def recent(session: Session, actor: Actor, limit: int = 100) -> list[CaseRow]:
    """The most recently active accessions, for the case list."""
    reviewed = select(Review.prediction_id).distinct().subquery()
    query = (
        select(
            Prediction.accession_id,
            func.count(Prediction.id),
            func.count(reviewed.c.prediction_id),
            func.max(Prediction.created_at),
        )
        .outerjoin(reviewed, reviewed.c.prediction_id == Prediction.id)
        .where(Prediction.accession_id.is_not(None))
        .group_by(Prediction.accession_id)
        .order_by(func.max(Prediction.created_at).desc())
        .limit(limit)
    )
    rows = session.execute(query).all()
    found = {
        c.accession_id: c for c in session.scalars(select(Case).where(Case.accession_id.in_([r[0] for r in rows])))
    }
    listed = [
        CaseRow(acc, cells, done, _aware(last), status_of(found.get(acc), done))
        for acc, cells, done, last in rows
        if acc is not None  # the query leaves out cells without an accession already
    ]
    audit.record_read(session, actor, "case.list", "case", None, accession_ids=[r.accession_id for r in listed])
    return listed


def _aware(moment: datetime) -> datetime:
    """func.max() bypasses the column type: SQLite gives a naive UTC datetime back (or a string)."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def review_progress(session: Session, accession_id: str) -> tuple[int, int]:
    """(reviewed, classified) cells of an accession: for the review screen's "x of y reviewed"."""
    total = session.scalar(select(func.count()).select_from(Prediction).where(Prediction.accession_id == accession_id))
    reviewed = session.scalar(
        select(func.count())
        .select_from(Prediction)
        .where(Prediction.accession_id == accession_id, Prediction.reviews.any())
    )
    return reviewed or 0, total or 0
