"""/api/v1/batches: many cells in, classified in the background, a ranked queue out."""

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.api.deps import ActorDep, ContextDep, SessionDep
from app.api.predictions import ERRORS, read_upload
from app.api.schemas import BatchCounts, BatchItemOut, BatchItemPage, BatchOut, PredictionOut
from app.db.models import BatchItem
from app.errors import InputError
from app.services import audit
from app.services import batches as service
from app.services.predictions import CallPolicy

router = APIRouter(prefix="/api/v1/batches", tags=["batches"])


def batch_out(session, batch) -> BatchOut:
    progress = service.progress(session, batch.id)
    return BatchOut(
        id=batch.id,
        name=batch.name,
        accession_id=batch.accession_id,
        status="done" if progress.done else "processing",
        progress=round(progress.fraction, 4),
        counts=BatchCounts(**asdict(progress)),
        created_at=batch.created_at,
    )


def item_out(item: BatchItem, policy: CallPolicy) -> BatchItemOut:
    return BatchItemOut(
        id=item.id,
        position=item.position,
        file_name=item.filename,
        status=item.status,
        error=item.error,
        qc_sample=item.qc_sample,
        uncertainty=service.uncertainty(item) if item.prediction else None,
        prediction=PredictionOut.of(item.prediction, policy) if item.prediction else None,
    )


async def incoming_files(
    context, images: list[UploadFile] | None, archive: UploadFile | None
) -> list[service.IncomingFile]:
    """The submitted files: several `image` fields, or one zip `archive` (not both)."""
    settings = context.settings
    if bool(images) == bool(archive):
        raise InputError("send either one or more 'image' files or one 'archive' zip file")
    if archive is not None:
        data = await read_upload(archive, settings.max_archive_expanded_bytes)
        if len(data) > settings.max_archive_expanded_bytes:
            raise InputError(f"the archive is over {settings.max_archive_expanded_bytes:,} bytes")
        return await run_in_threadpool(service.files_from_zip, data, settings)
    if len(images) > settings.max_batch_items:
        raise InputError(f"a batch may hold at most {settings.max_batch_items} images")
    # An over-size file is read only up to the limit + 1 byte: enough to fail its item.
    return [
        service.IncomingFile(upload.filename or f"image-{i}", await read_upload(upload, settings.max_upload_bytes))
        for i, upload in enumerate(images)
    ]


@router.post("", status_code=202, response_model=BatchOut, responses=ERRORS)
async def submit_batch(
    context: ContextDep,
    actor: ActorDep,
    response: Response,
    image: Annotated[list[UploadFile] | None, File(description="Cell images (repeat the field).")] = None,
    archive: Annotated[UploadFile | None, File(description="Or one zip file of cell images.")] = None,
    accession_id: Annotated[str | None, Form()] = None,
    name: Annotated[str | None, Form(max_length=128)] = None,
) -> BatchOut:
    """Queue a batch for background classification; poll `GET /api/v1/batches/{id}` for progress."""
    files = await incoming_files(context, image, archive)
    batch = await run_in_threadpool(
        service.create_batch, context.sessions, context.images, context.settings, actor, files, name, accession_id
    )
    context.work_arrived()
    response.headers["Location"] = f"/api/v1/batches/{batch.id}"
    with context.sessions() as session:
        return batch_out(session, service.get_batch(session, batch.id))


@router.get("/{batch_id}", response_model=BatchOut, responses=ERRORS)
def get_batch(batch_id: int, session: SessionDep, actor: ActorDep) -> BatchOut:
    batch = service.get_batch(session, batch_id)
    audit.record(session, actor, "batch.read", "batch", batch.id)
    session.commit()
    return batch_out(session, batch)


@router.get("/{batch_id}/items", response_model=BatchItemPage, responses=ERRORS)
def list_items(
    batch_id: int,
    context: ContextDep,
    session: SessionDep,
    actor: ActorDep,
    order: Annotated[str, Query(description="suspicion (P(abnormal) first), uncertainty, or position")] = "suspicion",
    unreviewed: bool = False,
    predicted_class: Annotated[str | None, Query(alias="class")] = None,
    min_abnormal: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_abnormal: Annotated[float | None, Query(ge=0, le=1)] = None,
    status: str | None = None,
    qc_only: Annotated[bool, Query(description="Only the QC sample of confident normal calls.")] = False,
    needs_review: Annotated[bool, Query(description="Only cells inside the uncertainty band.")] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> BatchItemPage:
    """The batch's cells ranked for review, with their predictions."""
    service.get_batch(session, batch_id)
    flt = service.QueueFilter(
        order, unreviewed, predicted_class, min_abnormal, max_abnormal, status, qc_only, needs_review
    )
    items = service.queue_items(session, batch_id, flt, context.policy)
    page = items[offset : offset + limit]
    audit.record(session, actor, "batch.items.read", "batch", batch_id, item_ids=[i.id for i in page])
    session.commit()
    return BatchItemPage(
        items=[item_out(i, context.policy) for i in page], total=len(items), limit=limit, offset=offset
    )


@router.get("/{batch_id}/export.csv", response_class=Response, responses=ERRORS)
def export(batch_id: int, session: SessionDep, actor: ActorDep) -> Response:
    """One row per cell: file name, accession, probabilities, call, review, final label, reviewer, times."""
    body = service.export_csv(session, actor, batch_id)
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="papcad-batch-{batch_id}.csv"'},
    )
