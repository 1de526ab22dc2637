"""The laboratory's own labelled cells: every reviewed prediction with its final label and stored image.

The final label is the latest review of the prediction (an amendment replaces the earlier label; an
undone review is gone). One image uploaded twice counts once, with its latest review. Cells without an
accession form a group of their own, so a grouped split can still keep one slide's cells together.
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Prediction, Review
from app.ml.site_cells import SiteCell
from app.services import audit
from app.services.actors import Actor
from app.services.images import ImageStore

READ_CHUNK = 200  # images per query: bounded memory per round trip


@dataclass(frozen=True)
class ReviewedCell:
    prediction_id: int
    image_id: int
    accession_id: str | None
    label: str
    reviewed_at: datetime

    @property
    def group(self) -> str:
        return f"accession:{self.accession_id}" if self.accession_id else f"image:{self.image_id}"


def reviewed_cells(session: Session, since: datetime | None = None) -> list[ReviewedCell]:
    """Reviewed predictions, one per image, with the latest review's label; final reviews since `since` only."""
    latest = select(func.max(Review.id).label("review_id")).group_by(Review.prediction_id).subquery()
    query = (
        select(Prediction.id, Prediction.image_id, Prediction.accession_id, Review.label, Review.created_at, Review.id)
        .join(Review, Review.prediction_id == Prediction.id)
        .join(latest, latest.c.review_id == Review.id)
        .order_by(Review.id)
    )
    if since is not None:
        query = query.where(Review.created_at >= since)
    by_image: dict[int, ReviewedCell] = {}
    for prediction_id, image_id, accession_id, label, reviewed_at, _ in session.execute(query):
        by_image[image_id] = ReviewedCell(prediction_id, image_id, accession_id, label, reviewed_at)  # latest wins
    return sorted(by_image.values(), key=lambda c: c.prediction_id)


def load_site_cells(session: Session, store: ImageStore, actor: Actor, since: datetime | None = None) -> list[SiteCell]:
    """The reviewed cells with their image bytes, for `papcad adapt`; the read is audited."""
    cells = reviewed_cells(session, since)
    out: list[SiteCell] = []
    for start in range(0, len(cells), READ_CHUNK):
        chunk = cells[start : start + READ_CHUNK]
        data = store.read_many(session, [c.image_id for c in chunk])
        out.extend(SiteCell(data[c.image_id], c.label, c.group) for c in chunk if c.image_id in data)
    audit.record_read(
        session,
        actor,
        "site_data.read",
        "prediction",
        None,
        purpose="model adaptation",
        cells=len(out),
        since=since.isoformat() if since else None,
    )
    return out
