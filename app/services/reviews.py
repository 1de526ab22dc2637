"""Reviews of single cells: confirm or override, amend with a reason, undo within a minute.

A review is a row of its own; the prediction is never changed. The latest review is the cell's final
label. A second review of a reviewed cell is an amendment: it names the review it amends and must say
why. The reviewer may undo their own latest review of a cell for a minute (a slip of the keyboard);
the undone review is removed and the audit trail keeps what it said. Cells of a signed-out case are
locked.
"""

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Prediction, Review
from app.domain import ActorKind
from app.errors import ConflictError, InputError, NotFoundError, PermissionDeniedError
from app.ml.classes import CLASS_NAMES
from app.services import audit, cases
from app.services.actors import Actor
from app.services.text import has_control_characters

REVIEW_ACTIONS = ("confirm", "override")
UNDO_SECONDS = 60
MAX_TEXT = 2000


def _text(value: str | None, name: str) -> str | None:
    value = (value or "").strip() or None
    if value is not None and len(value) > MAX_TEXT:
        raise InputError(f"{name} must be at most {MAX_TEXT} characters")
    if has_control_characters(value, allow_newlines=True):
        raise InputError(f"{name} must not contain control characters")
    return value


def _prediction(session: Session, prediction_id: int) -> Prediction:
    prediction = session.get(Prediction, prediction_id)
    if prediction is None:
        raise NotFoundError(f"prediction {prediction_id} does not exist")
    return prediction


def _check_unlocked(session: Session, prediction: Prediction) -> None:
    if prediction.accession_id and cases.is_signed_out(session, prediction.accession_id):
        raise ConflictError(
            f"case {prediction.accession_id} is signed out: its cells are locked; a pathologist may amend the case"
        )


def add_review(
    session: Session,
    actor: Actor,
    prediction_id: int,
    action: str,
    label: str | None,
    comment: str | None,
    reason: str | None = None,
) -> Review:
    """Confirm the model's call, or override it with another class; amend an earlier review with a reason."""
    if not actor.can_review:
        raise PermissionDeniedError("only pathologists and cytotechnologists may review predictions")
    prediction = _prediction(session, prediction_id)
    if action not in REVIEW_ACTIONS:
        raise InputError("action must be 'confirm' or 'override'")
    if action == "confirm":
        if label not in (None, "", prediction.predicted_class):
            raise InputError("a confirmation keeps the model's class; use 'override' to change it")
        label = prediction.predicted_class
    else:
        if label not in CLASS_NAMES:
            raise InputError(f"label must be one of: {', '.join(CLASS_NAMES)}")
        if label == prediction.predicted_class:
            raise InputError("the override label equals the model's call; use 'confirm'")
    comment = _text(comment, "comment")
    reason = _text(reason, "reason")
    _check_unlocked(session, prediction)
    previous = prediction.reviews[-1] if prediction.reviews else None
    if previous is not None and reason is None:
        raise InputError(
            f"this cell was already reviewed ({previous.label} by {previous.reviewer.username}): "
            "give a reason to amend that review"
        )
    if previous is None and reason is not None:
        raise InputError("a reason is only for amending an earlier review; this cell has none")
    review = Review(
        prediction_id=prediction.id,
        reviewer_id=actor.id,
        action=action,
        label=label,
        comment=comment,
        amends_review_id=previous.id if previous else None,
        amend_reason=reason,
    )
    session.add(review)
    session.flush()
    audit.record(
        session,
        actor,
        f"review.{action}",
        "prediction",
        prediction.id,
        review_id=review.id,
        label=label,
        model_class=prediction.predicted_class,
        **({"amends_review_id": previous.id, "reason": reason} if previous else {}),
    )
    session.commit()
    session.refresh(prediction)
    return review


def undoable(session: Session, actor: Actor, now: datetime | None = None) -> Review | None:
    """The actor's own most recent review, if it is under a minute old and still its cell's latest."""
    if actor.kind != ActorKind.USER:
        return None
    since = (now or datetime.now(UTC)) - timedelta(seconds=UNDO_SECONDS)
    review = session.scalar(
        select(Review)
        .where(Review.reviewer_id == actor.id, Review.created_at >= since)
        .order_by(Review.id.desc())
        .limit(1)
    )
    if review is None:
        return None
    latest = session.scalar(
        select(Review.id).where(Review.prediction_id == review.prediction_id).order_by(Review.id.desc())
    )
    prediction = session.get_one(Prediction, review.prediction_id)  # a review's prediction is never deleted
    if latest != review.id or (prediction.accession_id and cases.is_signed_out(session, prediction.accession_id)):
        return None
    return review


def undo_review(session: Session, actor: Actor, prediction_id: int, review_id: int) -> Prediction:
    """Take back one's own latest review of a cell within a minute of making it."""
    if not actor.can_review:
        raise PermissionDeniedError("only pathologists and cytotechnologists may review predictions")
    prediction = _prediction(session, prediction_id)
    review = session.get(Review, review_id)
    if review is None or review.prediction_id != prediction.id:
        raise NotFoundError(f"review {review_id} of prediction {prediction_id} does not exist")
    if review.reviewer_id != actor.id:
        raise PermissionDeniedError("only the reviewer may undo a review")
    if prediction.reviews[-1].id != review.id:
        raise ConflictError("only the latest review of a cell can be undone")
    if datetime.now(UTC) - review.created_at > timedelta(seconds=UNDO_SECONDS):
        raise ConflictError(f"a review can be undone for {UNDO_SECONDS} seconds; amend it with a reason instead")
    _check_unlocked(session, prediction)
    audit.record(
        session,
        actor,
        "review.undo",
        "prediction",
        prediction.id,
        review_id=review.id,
        review_action=review.action,
        label=review.label,
        comment=review.comment,
        amends_review_id=review.amends_review_id,
        reason=review.amend_reason,
        reviewed_at=review.created_at.isoformat(),
    )
    session.delete(review)
    session.commit()
    session.refresh(prediction)
    return prediction
