"""Shadow mode: a candidate model scores the cells the active model classified, silently.

The calls are stored apart (`shadow_predictions`) and never shown with a cell; only the monitoring page
compares them, on cells reviewers have since labelled, with the active model's calls on the same cells.
Scoring runs on a thread of its own, off the request path, from a bounded queue: when the queue is full
a cell is skipped (counted), and any failure is logged and never reaches the request.
"""

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sklearn.metrics import cohen_kappa_score
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Prediction, Review, ShadowPrediction
from app.ml.classes import ABNORMAL_CLASSES, CLASS_NAMES

log = logging.getLogger("papcad.shadow")

BATCH = 16


class ShadowScorer:
    """A daemon thread that scores queued (prediction id, image) pairs with the current candidate."""

    def __init__(self, sessions: sessionmaker[Session], candidate: Callable[[], Any], maxsize: int = 256):
        self.sessions = sessions
        self.candidate = candidate
        self._queue: queue.Queue[tuple[int, Any] | None] = queue.Queue(maxsize=maxsize)
        self.skipped = 0  # cells not scored because the queue was full
        self.failed = 0
        self.stored = 0
        self._thread = threading.Thread(target=self._run, name="papcad-shadow", daemon=True)
        self._thread.start()

    def submit(self, prediction_id: int, image: Any) -> None:
        """Queue a cell (bytes or PIL image); never blocks."""
        try:
            self._queue.put_nowait((prediction_id, image))
        except queue.Full:
            self.skipped += 1

    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    def join(self) -> None:
        """Wait until every queued cell is scored (tests, shutdown)."""
        self._queue.join()

    def stop(self, timeout: float = 10) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            jobs = [first]
            while len(jobs) < BATCH:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.task_done()
                    self._score(jobs)
                    return
                jobs.append(job)
            self._score(jobs)

    def _score(self, jobs: list[tuple[int, Any]]) -> None:
        try:
            model = self.candidate()
            if model is not None:
                self._store(model, jobs, model.predict([image for _, image in jobs]))
        except Exception:  # noqa: BLE001 - shadow scoring must never disturb serving
            self.failed += len(jobs)
            log.exception("shadow scoring of %d cells failed", len(jobs))
        finally:
            for _ in jobs:
                self._queue.task_done()

    def _store(self, model: Any, jobs: list[tuple[int, Any]], results: list[Any]) -> None:
        with self.sessions() as session:
            for (prediction_id, _), result in zip(jobs, results, strict=True):
                session.add(
                    ShadowPrediction(
                        prediction_id=prediction_id,
                        model_version=model.version,  # the candidate's, whichever of its networks answered
                        weights_sha256=model.weights_sha256,
                        probabilities=result.probabilities,
                        predicted_class=result.predicted_class,
                        abnormal_probability=result.abnormal_probability,
                    )
                )
            try:
                session.commit()
                self.stored += len(jobs)
            except IntegrityError:  # already scored (a retried batch item): keep the first
                session.rollback()


# --- the comparison on the monitoring page ------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    agreement: float
    sensitivity: float | None
    specificity: float | None
    kappa: float | None


@dataclass(frozen=True)
class Comparison:
    """Candidate against the model whose calls reviewers saw, on the same reviewed cells."""

    candidate_version: str
    active_versions: list[str]
    cells: int
    abnormal: int
    candidate: Scores
    active: Scores


def _scores(calls: list[str], truth: list[str]) -> Scores:
    abnormal = set(ABNORMAL_CLASSES)
    pairs = [(c in abnormal, t in abnormal) for c, t in zip(calls, truth, strict=True)]
    positives = sum(1 for _, t in pairs if t)
    negatives = len(pairs) - positives
    hits = sum(1 for c, t in pairs if c and t)
    rejections = sum(1 for c, t in pairs if not c and not t)
    kappa = None
    if len(set(calls) | set(truth)) > 1:
        kappa = float(cohen_kappa_score(calls, truth, labels=list(CLASS_NAMES)))
    return Scores(
        agreement=sum(c == t for c, t in zip(calls, truth, strict=True)) / len(truth),
        sensitivity=hits / positives if positives else None,
        specificity=rejections / negatives if negatives else None,
        kappa=kappa,
    )


def comparisons(session: Session) -> list[Comparison]:
    """One comparison per shadow model version, on cells with a final label (the latest review)."""
    latest = select(func.max(Review.id).label("review_id")).group_by(Review.prediction_id).subquery()
    query = (
        select(ShadowPrediction.model_version, ShadowPrediction.predicted_class, Prediction.predicted_class,
               Prediction.model_version, Review.label)
        .join(Prediction, Prediction.id == ShadowPrediction.prediction_id)
        .join(Review, Review.prediction_id == Prediction.id)
        .join(latest, latest.c.review_id == Review.id)
        .order_by(ShadowPrediction.model_version, ShadowPrediction.id)
    )  # fmt: skip
    rows: dict[str, list[tuple[str, str, str, str]]] = {}
    for version, shadow_call, shown_call, shown_version, label in session.execute(query):
        rows.setdefault(version, []).append((shadow_call, shown_call, shown_version, label))
    out = []
    for version, cells in rows.items():
        truth = [c[3] for c in cells]
        out.append(
            Comparison(
                candidate_version=version,
                active_versions=sorted({c[2] for c in cells}),
                cells=len(cells),
                abnormal=sum(1 for t in truth if t in ABNORMAL_CLASSES),
                candidate=_scores([c[0] for c in cells], truth),
                active=_scores([c[1] for c in cells], truth),
            )
        )
    return out
