"""Predictions: classify an uploaded image, record it, read it back.

A prediction row is the model's output and is never edited; reviews are separate rows
(app.services.reviews).
"""

import re
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import Prediction
from app.domain import ActorKind, PredictionSource
from app.errors import ConflictError, InputError, NotFoundError
from app.ml.batching import DynamicBatcher
from app.ml.classifier import Prediction as ModelPrediction
from app.services import audit
from app.services.actors import Actor
from app.services.images import CheckedImage, ImageStore, check_image, read_capped
from app.services.registry import after_stored, weights_sha256_for

if TYPE_CHECKING:
    from app.services.explanations import Heatmaps

ACCESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")


@dataclass(frozen=True)
class Submission:
    """One uploaded cell as received: the file (bytes, or a stream read here up to the size limit + 1
    byte) is checked by create_prediction, not before."""

    data: bytes | IO[bytes]
    source: PredictionSource
    accession_id: str | None = None
    filename: str | None = None
    idempotency_key: str | None = None

    def read(self, max_bytes: int) -> bytes:
        return self.data if isinstance(self.data, bytes) else read_capped(self.data, max_bytes)


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
    source: PredictionSource,
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
        in_distribution=result.in_distribution,
        ood_score=result.ood_score,
        input_flags=list(result.input_flags) or None,
    )


def _replayed(session: Session, actor: Actor, key: str) -> Prediction | None:
    column = Prediction.api_client_id if actor.kind == ActorKind.APIKEY else Prediction.user_id
    return session.scalar(select(Prediction).where(column == actor.id, Prediction.idempotency_key == key))


def create_prediction(
    session: Session,
    batcher: DynamicBatcher,
    store: ImageStore,
    settings: Settings,
    actor: Actor,
    submission: Submission,
) -> tuple[Prediction, bool]:
    """Read, check, classify and record one uploaded image: the one entry point for uploads (API and
    page), run on one worker thread with one session. Returns (prediction, created); created is False
    on an idempotent replay.

    The file is read and decoded once. No database connection is held while the model runs: the
    session's transaction ends after the replay check and a new one stores image, prediction and
    audit event together, so either all of it is stored or nothing.
    """
    accession_id = validate_accession_id(submission.accession_id)
    key = _validate_idempotency_key(submission.idempotency_key)
    checked = check_image(submission.read(settings.max_upload_bytes), settings.max_upload_bytes,
                          settings.max_image_pixels)  # fmt: skip
    if key is not None:
        first = _replayed(session, actor, key)
        if first is not None:
            return _check_replay(first, checked), False
    session.commit()  # the connection goes back to the pool while the model runs

    result = batcher.predict(checked.image)
    try:
        image_row = store.put(session, checked)
        prediction = prediction_row(
            result,
            weights_sha256_for(batcher.classifier, result),
            image_row.id,
            submission.source,
            accession_id,
            submission.filename,
            user_id=actor.id if actor.kind == ActorKind.USER else None,
            api_client_id=actor.id if actor.kind == ActorKind.APIKEY else None,
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
            image_sha256=checked.sha256,
            model_version=result.model_version,
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        # A simultaneous request with the same Idempotency-Key won: answer with its result.
        first = _replayed(session, actor, key) if key is not None else None
        if first is None:
            raise
        return _check_replay(first, checked), False
    session.refresh(prediction)  # image, submitter and reviews, for the response
    session.commit()  # and the connection back
    after_stored(batcher.classifier, prediction.id, checked.image)  # shadow scoring, off this request
    return prediction, True


def _check_replay(first: Prediction, checked: CheckedImage) -> Prediction:
    if first.image.sha256 != checked.sha256:
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
    audit.record_read(session, actor, "prediction.read", "prediction", prediction.id)
    return prediction


MEDIA_TYPES = {"BMP": "image/bmp", "PNG": "image/png", "JPEG": "image/jpeg", "TIFF": "image/tiff"}


def read_image(session: Session, store: ImageStore, actor: Actor, prediction_id: int) -> tuple[bytes, str]:
    """The submitted file as uploaded, and its media type; the read is audited."""
    prediction = get_prediction(session, prediction_id)
    data = store.read(session, prediction.image)
    audit.record_read(session, actor, "prediction.image.read", "prediction", prediction.id)
    return data, MEDIA_TYPES[prediction.image.format]


def read_heatmap(
    session: Session, store: ImageStore, heatmaps: "Heatmaps", actor: Actor, prediction_id: int, class_name: str | None
) -> bytes:
    """The Grad-CAM PNG of a prediction (see Heatmaps.png); the read is audited once the map is made.
    The connection goes back to the pool while the map is computed."""
    prediction = get_prediction(session, prediction_id)
    image = store.read(session, prediction.image)
    session.commit()
    png = heatmaps.png(prediction, image, class_name)
    audit.record_read(session, actor, "prediction.heatmap.read", "prediction", prediction.id)
    return png


def recent(session: Session, actor: Actor, limit: int = 20) -> list[Prediction]:
    """The newest predictions, for the upload page; the read is audited."""
    rows = list(session.scalars(select(Prediction).order_by(Prediction.id.desc()).limit(limit)))
    audit.record_read(session, actor, "prediction.list", "prediction", None, page="home", ids=[p.id for p in rows])
    return rows


def list_predictions(
    session: Session, actor: Actor, accession_id: str | None, limit: int, offset: int
) -> tuple[list[Prediction], int]:
    """Newest first, optionally for one accession; returns (page, total)."""
    query = select(Prediction)
    if accession_id is not None:
        query = query.where(Prediction.accession_id == validate_accession_id(accession_id))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0  # COUNT answers a row always
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


def final_label(prediction: Prediction) -> str | None:
    """The latest reviewer's label, or None while unreviewed."""
    return prediction.reviews[-1].label if prediction.reviews else None
