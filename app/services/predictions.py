"""Predictions and reviews: classify an image, record it, read it back, review it.

A prediction row is the model's output and is never edited; a review is a separate row.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Prediction, Review
from app.errors import ConflictError, InputError, NotFoundError, PermissionDeniedError
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.classifier import Prediction as ModelPrediction
from app.services import audit
from app.services.actors import Actor
from app.services.images import CheckedImage, ImageStore

ACCESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")
REVIEW_ACTIONS = ("confirm", "override")


@dataclass(frozen=True)
class CallPolicy:
    """The lab's reading of P(abnormal): a threshold, and a band around it that needs a person."""

    abnormal_threshold: float
    uncertainty_band: float

    def is_abnormal(self, abnormal_probability: float) -> bool:
        return abnormal_probability >= self.abnormal_threshold

    def needs_review(self, abnormal_probability: float) -> bool:
        return abs(abnormal_probability - self.abnormal_threshold) <= self.uncertainty_band


@dataclass(frozen=True)
class Submission:
    image: CheckedImage
    source: str  # web | api | batch
    accession_id: str | None = None
    filename: str | None = None
    idempotency_key: str | None = None


def validate_accession_id(value: str | None) -> str | None:
    if value is None or value.strip() == "":
        return None
    value = value.strip()
    if not ACCESSION_RE.match(value):
        raise InputError("accession_id must be 1-64 characters: letters, digits and . _ : / -")
    return value


def _validate_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= 128 or not value.isprintable():
        raise InputError("Idempotency-Key must be 1-128 printable characters")
    return value


def prediction_row(
    result: ModelPrediction,
    weights_sha256: str,
    image_id: int,
    source: str,
    accession_id: str | None,
    filename: str | None,
    user_id: int | None,
    api_client_id: int | None,
    idempotency_key: str | None = None,
) -> Prediction:
    """The row recording one model output, for every path that classifies (web, API, batch)."""
    return Prediction(
        image_id=image_id,
        accession_id=accession_id,
        original_filename=(filename or "")[:255] or None,
        source=source,
        predicted_class=result.predicted_class,
        probabilities=result.probabilities,
        abnormal_probability=result.abnormal_probability,
        model_version=result.model_version,
        weights_sha256=weights_sha256,
        user_id=user_id,
        api_client_id=api_client_id,
        idempotency_key=idempotency_key,
    )


def _replayed(session: Session, actor: Actor, key: str) -> Prediction | None:
    column = Prediction.api_client_id if actor.kind == "apikey" else Prediction.user_id
    return session.scalar(select(Prediction).where(column == actor.id, Prediction.idempotency_key == key))


def create_prediction(
    factory: sessionmaker[Session],
    classifier: Classifier,
    store: ImageStore,
    actor: Actor,
    submission: Submission,
    _attempts: int = 2,
) -> tuple[Prediction, bool]:
    """Classify and record one image. Returns (prediction, created); created is False on an
    idempotent replay. Either everything is stored (image file, rows, audit event) or nothing.
    """
    accession_id = validate_accession_id(submission.accession_id)
    key = _validate_idempotency_key(submission.idempotency_key)
    if key is not None:
        with factory() as session:
            first = _replayed(session, actor, key)
            if first is not None:
                return _check_replay(first, submission), False

    result = classifier.predict([submission.image.image])[0]
    session = factory()
    written: Path | None = None
    try:
        image_row, written = store.put(session, submission.image)
        session.flush()
        prediction = prediction_row(
            result,
            classifier.weights_sha256,
            image_row.id,
            submission.source,
            accession_id,
            submission.filename,
            user_id=actor.id if actor.kind == "user" else None,
            api_client_id=actor.id if actor.kind == "apikey" else None,
            idempotency_key=key,
        )
        session.add(prediction)
        session.flush()
        audit.record(
            session,
            actor,
            "prediction.create",
            "prediction",
            prediction.id,
            source=submission.source,
            accession_id=accession_id,
            image_sha256=submission.image.sha256,
            model_version=result.model_version,
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        if written is not None:
            written.unlink(missing_ok=True)
        # A concurrent request won the race: same idempotency key, or the same new image.
        if key is not None:
            with factory() as retry:
                first = _replayed(retry, actor, key)
                if first is not None:
                    return _check_replay(first, submission), False
        if _attempts <= 1:
            raise
        return create_prediction(factory, classifier, store, actor, submission, _attempts - 1)
    except BaseException:
        session.rollback()
        if written is not None:
            written.unlink(missing_ok=True)
        raise
    finally:
        session.close()
    with factory() as session:
        return get_prediction(session, prediction.id), True


def _check_replay(first: Prediction, submission: Submission) -> Prediction:
    if first.image.sha256 != submission.image.sha256:
        raise ConflictError("this Idempotency-Key was already used for a different image")
    return first


def get_prediction(session: Session, prediction_id: int) -> Prediction:
    prediction = session.get(Prediction, prediction_id)
    if prediction is None:
        raise NotFoundError(f"prediction {prediction_id} does not exist")
    return prediction


def read_prediction(session: Session, actor: Actor, prediction_id: int) -> Prediction:
    """Fetch a prediction for display and record the read in the audit trail."""
    prediction = get_prediction(session, prediction_id)
    audit.record(session, actor, "prediction.read", "prediction", prediction.id)
    session.commit()
    return prediction


def list_predictions(
    session: Session, actor: Actor, accession_id: str | None, limit: int, offset: int
) -> tuple[list[Prediction], int]:
    """Newest first, optionally for one accession; returns (page, total)."""
    query = select(Prediction)
    if accession_id is not None:
        query = query.where(Prediction.accession_id == validate_accession_id(accession_id))
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = list(session.scalars(query.order_by(Prediction.id.desc()).limit(limit).offset(offset)))
    audit.record(
        session,
        actor,
        "prediction.list",
        "prediction",
        None,
        accession_id=accession_id,
        ids=[p.id for p in rows],
    )
    session.commit()
    return rows, total


def add_review(
    session: Session, actor: Actor, prediction_id: int, action: str, label: str | None, comment: str | None
) -> Review:
    """Confirm the model's call, or override it with another class. The prediction stays as it was."""
    if not actor.can_review:
        raise PermissionDeniedError("only pathologists and cytotechnologists may review predictions")
    prediction = get_prediction(session, prediction_id)
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
    comment = (comment or "").strip() or None
    if comment is not None and len(comment) > 2000:
        raise InputError("comment must be at most 2000 characters")
    review = Review(prediction_id=prediction.id, reviewer_id=actor.id, action=action, label=label, comment=comment)
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
    )
    session.commit()
    session.refresh(prediction)
    return review


def final_label(prediction: Prediction) -> str | None:
    """The latest reviewer's label, or None while unreviewed."""
    return prediction.reviews[-1].label if prediction.reviews else None
