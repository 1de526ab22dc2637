"""Claiming and completing batch items, safely across any number of workers.

A worker leases up to N queued (or lease-expired) items with `SELECT ... FOR UPDATE SKIP LOCKED`
(on PostgreSQL; SQLite serialises writers anyway), classifies them together, then stores each
prediction in a transaction that only commits if the worker still holds that item's lease. A
worker that dies loses nothing: its lease expires and another worker takes the items over; one
that comes back late finds its lease gone and stores nothing, so no item gets two predictions.

These functions take a sessionmaker, not a Session, on purpose: a worker round is several short
transactions (claim; read the images; store each result under its own lease) with the model run in
between, and each must commit or fail on its own, without holding a connection while the model runs.
Each opened session does its work, its audit event included, and commits.
"""

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, cast

from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.models import Batch, BatchItem, utcnow
from app.domain import PredictionSource
from app.errors import InvalidImageError
from app.ml.classifier import Prediction
from app.services import audit
from app.services.actors import worker_actor
from app.services.batches import CLASSIFIED, FAILED, PROCESSING, QUEUED
from app.services.images import ImageStore
from app.services.predictions import prediction_row
from app.services.registry import after_stored, weights_sha256_for


class BatchClassifier(Protocol):
    """What a worker needs of a model: a Classifier, or the LiveModels that follow the registry."""

    def predict(self, images: Sequence[bytes]) -> list[Prediction]: ...


@dataclass(frozen=True)
class Lease:
    item_id: int
    token: str
    image_id: int | None


def claim(
    factory: sessionmaker[Session], worker: str, limit: int, lease_seconds: int, max_attempts: int
) -> list[Lease]:
    """Lease up to `limit` items to this worker; items that used up their attempts fail instead."""
    now = utcnow()
    with factory() as session:
        query = (
            select(BatchItem)
            .where(
                or_(
                    BatchItem.status == QUEUED,
                    (BatchItem.status == PROCESSING) & (BatchItem.lease_expires_at < now),
                )
            )
            .order_by(BatchItem.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=BatchItem)
        )
        leases = []
        for item in session.scalars(query).unique():
            if item.attempts >= max_attempts:
                item.status, item.error, item.lease_token = (
                    FAILED,
                    f"not classified after {item.attempts} attempts",
                    None,
                )
                item.updated_at = now
                continue
            token = str(uuid.uuid4())
            item.status, item.worker, item.lease_token = PROCESSING, worker, token
            item.lease_expires_at = now + timedelta(seconds=lease_seconds)
            item.attempts += 1
            item.updated_at = now
            leases.append(Lease(item.id, token, item.image_id))
        session.commit()
        return leases


def _in_qc_sample(item_id: int, abnormal_probability: float, settings: Settings) -> bool:
    """A fixed, reproducible share of confident 'normal' calls goes to a reviewer as well."""
    if abnormal_probability > settings.qc_max_abnormal_probability:
        return False
    draw = int.from_bytes(hashlib.sha256(f"qc:{item_id}".encode()).digest()[:4], "big") / 2**32
    return draw < settings.qc_share


def process(
    factory: sessionmaker[Session],
    classifier: BatchClassifier,
    store: ImageStore,
    settings: Settings,
    worker: str,
    leases: list[Lease],
) -> int:
    """Classify leased items in one forward pass and store each result if the lease still holds.

    The images are read from the database (no shared filesystem), in one short session that is
    closed before the model runs. Returns how many items this worker completed (classified or failed).
    """
    completed = 0
    with factory() as session:
        stored = store.read_many(session, [lease.image_id for lease in leases if lease.image_id is not None])
    images: list[bytes] = []
    readable: list[tuple[Lease, int]] = []
    for lease in leases:
        image_id = lease.image_id
        data = stored.get(image_id) if image_id is not None else None
        if image_id is None or data is None:
            completed += _fail(factory, lease, "the stored image is missing")
            continue
        images.append(data)
        readable.append((lease, image_id))
    del stored
    results: list[Prediction | InvalidImageError] = []
    if readable:
        try:
            results.extend(classifier.predict(images))
        except InvalidImageError:  # classify one by one to find the bad one
            for data in images:
                try:
                    results.append(classifier.predict([data])[0])
                except InvalidImageError as exc:
                    results.append(exc)
    actor = worker_actor(worker)
    for (lease, image_id), result, data in zip(readable, results, images, strict=True):
        if isinstance(result, InvalidImageError):
            completed += _fail(factory, lease, str(result))
            continue
        with factory() as session:
            item = session.get_one(BatchItem, lease.item_id)  # a leased item and its batch are never deleted
            batch = session.get_one(Batch, item.batch_id)
            prediction = prediction_row(
                result,
                weights_sha256_for(classifier, result),
                image_id,
                PredictionSource.BATCH,
                batch.accession_id,
                item.filename,
                user_id=batch.user_id,
                api_client_id=batch.api_client_id,
            )
            session.add(prediction)
            session.flush()
            done = session.execute(
                update(BatchItem)
                .where(
                    BatchItem.id == lease.item_id,
                    BatchItem.lease_token == lease.token,
                    BatchItem.status == PROCESSING,
                )
                .values(
                    status=CLASSIFIED,
                    prediction_id=prediction.id,
                    lease_token=None,
                    qc_sample=_in_qc_sample(lease.item_id, result.abnormal_probability, settings),
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            if cast(CursorResult[Any], done).rowcount != 1:  # an UPDATE answers with a CursorResult
                session.rollback()  # the lease expired and another worker owns the item now
                continue
            audit.record(
                session, actor, "prediction.create", "prediction", prediction.id,
                source=PredictionSource.BATCH, batch_id=batch.id, item_id=lease.item_id,
                model_version=result.model_version,
            )  # fmt: skip
            session.commit()
            completed += 1
            after_stored(classifier, prediction.id, data)  # shadow scoring, off this worker's path
    return completed


def _fail(factory: sessionmaker[Session], lease: Lease, reason: str) -> int:
    with factory() as session:
        done = session.execute(
            update(BatchItem)
            .where(BatchItem.id == lease.item_id, BatchItem.lease_token == lease.token)
            .values(status=FAILED, error=reason, lease_token=None, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        changed: int = cast(CursorResult[Any], done).rowcount  # an UPDATE answers with a CursorResult
        return changed
