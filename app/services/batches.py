"""Batch intake, progress, the ranked review queue and CSV export.

Intake is all-or-nothing for the batch as a whole (a refused archive stores nothing), while a
bad file inside an accepted batch only fails its own item, with the reason.
"""

import csv
import io
import lzma
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from sqlalchemy import ColumnElement, Select, case, func, select, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.config import Settings
from app.db.models import Batch, BatchItem, Prediction
from app.domain import ActorKind, ItemStatus, QueueOrder
from app.errors import InputError, InvalidImageError, NotFoundError
from app.ml.classes import CLASS_NAMES
from app.services import audit
from app.services.actors import Actor
from app.services.calls import CallPolicy
from app.services.images import ImageStore, check_image, read_capped
from app.services.predictions import final_label, validate_accession_id
from app.services.text import has_control_characters, strip_control_characters

QUEUED, PROCESSING, CLASSIFIED, FAILED = ItemStatus  # an item's statuses, in order
ARCHIVE_SUFFIXES = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"}
ARCHIVE_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!", b"BZh", b"\xfd7zXZ")
# What a damaged, truncated, encrypted or oddly compressed member raises while it is read.
UNREADABLE = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, RuntimeError, OSError)


@dataclass(frozen=True)
class IncomingFile:
    filename: str
    data: bytes


def clean_filename(name: str | None, fallback: str) -> str:
    """A file name fit to store and show: no control characters, at most 255 characters."""
    return (strip_control_characters(name) or "").strip()[:255] or fallback


def _is_ignorable(name: str) -> bool:
    """Folders and the metadata files desktop zip tools add."""
    parts = PurePosixPath(name).parts
    return name.endswith("/") or any(p.startswith(".") or p == "__MACOSX" for p in parts)


def files_from_uploads(uploads: Iterable[tuple[str | None, BinaryIO]], settings: Settings) -> Iterator[IncomingFile]:
    """Uploaded files one at a time; an over-size one is read only up to the limit + 1 byte (enough to fail it)."""
    for index, (filename, stream) in enumerate(uploads):
        yield IncomingFile(clean_filename(filename, f"image-{index}"), read_capped(stream, settings.max_upload_bytes))


def _archive_members(archive: zipfile.ZipFile, settings: Settings) -> list[zipfile.ZipInfo]:
    """The members to read, after refusing (before decompressing anything) what the directory shows is wrong."""
    members = []
    for info in archive.infolist():
        name = info.filename
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or ":" in name:
            raise InputError(f"the archive is refused: unsafe path {name!r}")
        if _is_ignorable(name):
            continue
        if path.suffix.lower() in ARCHIVE_SUFFIXES:
            raise InputError(f"the archive is refused: it contains another archive ({name})")
        members.append(info)
    if not members:
        raise InputError("the archive holds no files")
    if len(members) > settings.max_batch_items:
        raise InputError(f"the archive is refused: more than {settings.max_batch_items} files")
    # Honest headers let a bomb be refused at once; lying ones are caught below on the real bytes.
    if sum(info.file_size for info in members) > settings.max_archive_expanded_bytes:
        raise _expands_too_much(settings)
    return members


def _expands_too_much(settings: Settings) -> InputError:
    return InputError(f"the archive is refused: it expands to more than {settings.max_archive_expanded_bytes:,} bytes")


def files_from_zip(source: BinaryIO, settings: Settings) -> Iterator[IncomingFile]:
    """The files of a zip archive, decompressed one at a time, or InputError for one refused as a whole.

    Sizes are counted on the bytes decompression actually produces, never on the headers: each
    member is read up to one image's byte limit (+1, so an over-size image fails its own item), and
    the archive as a whole up to PAPCAD_MAX_ARCHIVE_EXPANDED_BYTES. Only one member is in memory.
    """
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputError("the archive is not a valid zip file") from exc
    with archive:
        members = _archive_members(archive, settings)
        expanded = 0
        for index, info in enumerate(members):
            cap = min(settings.max_upload_bytes, settings.max_archive_expanded_bytes - expanded)
            try:
                with archive.open(info) as member:
                    content = read_capped(member, cap)
            except UNREADABLE as exc:
                raise InputError(f"the archive is refused: {info.filename} cannot be read ({exc})") from exc
            if len(content) <= cap and len(content) != info.file_size:
                raise InputError(
                    f"the archive is refused: {info.filename} holds {len(content):,} bytes, "
                    f"its header says {info.file_size:,}"
                )
            expanded += len(content)
            if expanded > settings.max_archive_expanded_bytes:
                raise _expands_too_much(settings)
            if content.startswith(ARCHIVE_MAGIC):
                raise InputError(f"the archive is refused: it contains another archive ({info.filename})")
            yield IncomingFile(clean_filename(PurePosixPath(info.filename).name, f"image-{index}"), content)


def create_batch(
    session: Session,
    store: ImageStore,
    settings: Settings,
    actor: Actor,
    files: Iterable[IncomingFile],
    name: str | None = None,
    accession_id: str | None = None,
) -> Batch:
    """Store the batch and its items in one transaction; each item is queued or failed.

    `files` is consumed one file at a time (a zip is decompressed as it goes), so memory holds one
    image whatever the batch size; an error from it (a refused archive) rolls everything back.
    Nothing holds the session's connection before it is called: it is checked out at the first
    write, once the request's files are all received.
    """
    accession_id = validate_accession_id(accession_id)
    if has_control_characters(name):
        raise InputError("the batch name must not contain control characters")
    name = (name or "").strip()[:128] or None
    try:
        batch = Batch(
            name=name,
            accession_id=accession_id,
            user_id=actor.id if actor.kind == ActorKind.USER else None,
            api_client_id=actor.id if actor.kind == ActorKind.APIKEY else None,
        )
        session.add(batch)
        session.flush()
        failed = count = 0
        for position, incoming in enumerate(files):
            if position >= settings.max_batch_items:
                raise InputError(f"a batch may hold at most {settings.max_batch_items} images")
            count += 1
            item = BatchItem(batch_id=batch.id, position=position, filename=incoming.filename[:255], attempts=0)
            try:
                checked = check_image(incoming.data, settings.max_upload_bytes, settings.max_image_pixels)
            except InvalidImageError as exc:
                item.status, item.error = FAILED, str(exc)
                failed += 1
            else:
                image = store.put(session, checked)
                session.flush()
                item.image_id, item.status = image.id, QUEUED
                del checked
            session.add(item)
            session.flush()
        if not count:
            raise InputError("a batch needs at least one image")
        audit.record(
            session,
            actor,
            "batch.create",
            "batch",
            batch.id,
            items=count,
            failed=failed,
            accession_id=accession_id,
        )
        session.commit()
        return batch
    except BaseException:
        session.rollback()
        raise


def get_batch(session: Session, batch_id: int) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"batch {batch_id} does not exist")
    return batch


def read_batch(session: Session, actor: Actor, batch_id: int) -> Batch:
    """A batch, with the read on the audit trail."""
    batch = get_batch(session, batch_id)
    audit.record_read(session, actor, "batch.read", "batch", batch.id)
    return batch


def recent_batches(session: Session, actor: Actor, limit: int = 50) -> list[Batch]:
    """The newest batches, for the intake page; the read is audited."""
    rows = list(session.scalars(select(Batch).order_by(Batch.id.desc()).limit(limit)))
    audit.record_read(session, actor, "batch.list", "batch", None, page="batches", ids=[b.id for b in rows])
    return rows


@dataclass(frozen=True)
class Progress:
    total: int
    queued: int
    processing: int
    classified: int
    failed: int
    reviewed: int

    @property
    def done(self) -> bool:
        return self.queued + self.processing == 0

    @property
    def fraction(self) -> float:
        return (self.classified + self.failed) / self.total if self.total else 1.0


def progress(session: Session, batch_id: int) -> Progress:
    counts = dict(
        session.execute(
            select(BatchItem.status, func.count()).where(BatchItem.batch_id == batch_id).group_by(BatchItem.status)
        ).all()
    )
    reviewed = session.scalar(
        select(func.count(func.distinct(BatchItem.id)))
        .join(Prediction, Prediction.id == BatchItem.prediction_id)
        .where(BatchItem.batch_id == batch_id, Prediction.reviews.any())
    )
    return Progress(
        total=sum(counts.values()),
        queued=counts.get(QUEUED, 0),
        processing=counts.get(PROCESSING, 0),
        classified=counts.get(CLASSIFIED, 0),
        failed=counts.get(FAILED, 0),
        reviewed=reviewed or 0,
    )


def qc_sample_size(session: Session, batch_id: int | None) -> int:
    """How many cells (of one batch, or of all) were put in the QC sample."""
    query = select(func.count()).select_from(BatchItem).where(BatchItem.qc_sample.is_(True))
    if batch_id is not None:
        query = query.where(BatchItem.batch_id == batch_id)
    return session.scalar(query) or 0


def uncertainty(item: BatchItem, policy: CallPolicy) -> float:
    """How unsure a classified item's normal/abnormal call is: 1 at its model's cut-off, 0 at P(abnormal) 0 or 1
    (see CallPolicy.uncertainty); the queue's "most uncertain first" ranks by it."""
    if item.prediction is None:
        raise ValueError(f"batch item {item.id} has no prediction yet")
    return policy.uncertainty(item.prediction)


@dataclass(frozen=True)
class QueueFilter:
    order: QueueOrder = QueueOrder.SUSPICION
    unreviewed: bool = False
    predicted_class: str | None = None
    min_abnormal: float | None = None
    max_abnormal: float | None = None
    status: ItemStatus | None = None
    qc_only: bool = False
    needs_review: bool = False

    def validate(self) -> "QueueFilter":
        if self.order not in tuple(QueueOrder):
            raise InputError("order must be 'suspicion', 'uncertainty' or 'position'")
        if self.predicted_class is not None and self.predicted_class not in CLASS_NAMES:
            raise InputError(f"class must be one of: {', '.join(CLASS_NAMES)}")
        for bound in (self.min_abnormal, self.max_abnormal):
            if bound is not None and not 0 <= bound <= 1:
                raise InputError("probability bounds must be between 0 and 1")
        if self.status is not None and self.status not in tuple(ItemStatus):
            raise InputError("status must be queued, processing, classified or failed")
        return self


UNRANKED = 2.0  # the sort key of a cell without a prediction: after every classified one


SortKey = ColumnElement[Any] | InstrumentedAttribute[int]
SUBMISSION_ORDER: tuple[SortKey, ...] = (BatchItem.batch_id, BatchItem.position, BatchItem.id)


def _sort_keys(order: str, policy: CallPolicy) -> list[SortKey]:
    """The queue's ORDER BY, every key ascending, ties broken by batch, position and id.

    suspicion: highest P(abnormal) first; uncertainty: P(abnormal) nearest its model's cut-off first (the
    policy's `uncertainty_clause`, the same arithmetic as `uncertainty`, so equal floats tie the same way);
    unclassified cells last.
    """
    unranked = Prediction.id.is_(None)
    keys: list[SortKey] = []
    if order == QueueOrder.SUSPICION:
        keys.append(case((unranked, UNRANKED), else_=-Prediction.abnormal_probability))
    elif order == QueueOrder.UNCERTAINTY:
        keys.append(case((unranked, UNRANKED), else_=-policy.uncertainty_clause()))
    return [*keys, *SUBMISSION_ORDER]


def _queue_query(batch_id: int | None, flt: QueueFilter, policy: CallPolicy | None) -> Select[BatchItem]:
    """Items of one batch (or of all batches) that pass the filter, unordered."""
    query = select(BatchItem).outerjoin(Prediction, Prediction.id == BatchItem.prediction_id)
    if batch_id is not None:
        query = query.where(BatchItem.batch_id == batch_id)
    if flt.status:
        query = query.where(BatchItem.status == flt.status)
    if flt.predicted_class:
        query = query.where(Prediction.predicted_class == flt.predicted_class)
    if flt.min_abnormal is not None:
        query = query.where(Prediction.abnormal_probability >= flt.min_abnormal)
    if flt.max_abnormal is not None:
        query = query.where(Prediction.abnormal_probability <= flt.max_abnormal)
    if flt.unreviewed:
        query = query.where(BatchItem.status == CLASSIFIED, ~Prediction.reviews.any())
    if flt.qc_only:
        query = query.where(BatchItem.qc_sample.is_(True))
    if flt.needs_review:
        if policy is None:
            raise ValueError("the needs-review filter needs the lab's call policy")
        query = query.where(policy.needs_review_clause())
    return query


def _count(session: Session, query: Select[BatchItem]) -> int:
    return session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0


def queue_page(
    session: Session,
    batch_id: int | None,
    flt: QueueFilter,
    policy: CallPolicy,
    limit: int | None = None,
    offset: int = 0,
) -> tuple[list[BatchItem], int]:
    """One page of the queue, filtered, ranked and paged in the database; returns (page, total)."""
    flt = flt.validate()
    query = _queue_query(batch_id, flt, policy)
    page = query.order_by(*_sort_keys(flt.order, policy)).offset(offset).limit(limit)
    return list(session.scalars(page).unique()), _count(session, query)


def queue_items(session: Session, batch_id: int | None, flt: QueueFilter, policy: CallPolicy) -> list[BatchItem]:
    """Items of one batch (or of all batches), filtered and ranked for review (see _sort_keys)."""
    flt = flt.validate()
    query = _queue_query(batch_id, flt, policy).order_by(*_sort_keys(flt.order, policy))
    return list(session.scalars(query).unique())


def read_queue_page(
    session: Session,
    actor: Actor,
    batch_id: int,
    flt: QueueFilter,
    policy: CallPolicy,
    limit: int,
    offset: int,
) -> tuple[list[BatchItem], int]:
    """A page of a batch's queue for the API (see queue_page); the items shown are audited."""
    get_batch(session, batch_id)
    items, total = queue_page(session, batch_id, flt, policy, limit, offset)
    audit.record_read(session, actor, "batch.items.read", "batch", batch_id, item_ids=[i.id for i in items])
    return items, total


AUDITED_IDS = 1000  # a gallery's audit event names at most this many predictions (and counts all)


def read_gallery(
    session: Session, actor: Actor, batch_id: int | None, flt: QueueFilter, policy: CallPolicy, query: str
) -> list[BatchItem]:
    """The whole ranked queue for the gallery page; the cells shown are audited (query: the filter as shown)."""
    items = queue_items(session, batch_id, flt, policy)
    shown = [i.prediction_id for i in items if i.prediction_id is not None]
    detail = {"filter": query, "count": len(shown), "prediction_ids": shown[:AUDITED_IDS]}
    audit.record_read(session, actor, "queue.read", "batch", batch_id, **detail)
    return items


@dataclass(frozen=True)
class Neighbours:
    """Where a cell stands among the classified cells of a queue: the cells before and after it, its
    1-based position (None when the filter leaves it out) and how many there are."""

    previous: int | None
    following: int | None
    position: int | None
    count: int


def neighbours(
    session: Session, item_id: int, batch_id: int | None, flt: QueueFilter, policy: CallPolicy
) -> Neighbours:
    """The classified cells before and after one cell in the ranked queue, by keyset queries on the
    sort keys (no list of the queue is loaded). A cell the filter leaves out has no previous one and
    the queue's first cell as the next."""
    flt = flt.validate()
    keys = _sort_keys(flt.order, policy)
    classified = _queue_query(batch_id, flt, policy).where(BatchItem.prediction_id.is_not(None))
    count = _count(session, classified)
    ids = classified.with_only_columns(BatchItem.id)
    here = session.execute(classified.with_only_columns(*keys).where(BatchItem.id == item_id)).first()
    if here is None:
        return Neighbours(None, session.scalar(ids.order_by(*keys).limit(1)), None, count)
    row, mark = tuple_(*keys), tuple_(*here)
    previous = session.scalar(ids.where(row < mark).order_by(*(k.desc() for k in keys)).limit(1))
    following = session.scalar(ids.where(row > mark).order_by(*keys).limit(1))
    before = _count(session, classified.where(row < mark))
    return Neighbours(previous, following, before + 1, count)


CSV_COLUMNS = [
    "batch_id", "item_id", "position", "file_name", "accession_id", "status", "error", "prediction_id",
    *[f"p_{name}" for name in CLASS_NAMES], "predicted_class", "abnormal_probability", "qc_sample",
    "model_version", "classified_at", "review_action", "final_label", "reviewer", "reviewed_at",
]  # fmt: skip


FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A text cell a spreadsheet will not run as a formula (OWASP CSV injection): a leading ' when it
    starts with = + - @ tab or CR. Numbers are written by us and stay as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def export_csv(session: Session, actor: Actor, batch_id: int) -> str:
    """One row per cell, in submission order, with the model's call and the latest review."""
    batch = get_batch(session, batch_id)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    in_order = _queue_query(batch_id, QueueFilter(), None).order_by(*SUBMISSION_ORDER)
    for item in session.scalars(in_order).unique():
        p = item.prediction
        review = p.reviews[-1] if p and p.reviews else None
        row = {
            "batch_id": batch.id,
            "item_id": item.id,
            "position": item.position,
            "file_name": item.filename,
            "accession_id": batch.accession_id or "",
            "status": item.status,
            "error": item.error or "",
            "prediction_id": p.id if p else "",
            "qc_sample": "yes" if item.qc_sample else "no",
        }
        if p:
            row |= {f"p_{name}": f"{p.probabilities[name]:.6f}" for name in CLASS_NAMES}
            row |= {
                "predicted_class": p.predicted_class,
                "abnormal_probability": f"{p.abnormal_probability:.6f}",
                "model_version": p.model_version,
                "classified_at": p.created_at.isoformat(),
                "review_action": review.action if review else "",
                "final_label": final_label(p) or "",
                "reviewer": review.reviewer.username if review else "",
                "reviewed_at": review.created_at.isoformat() if review else "",
            }
        writer.writerow({key: spreadsheet_safe(value) for key, value in row.items()})
    audit.record(session, actor, "batch.export", "batch", batch.id)
    session.commit()
    return buffer.getvalue()
