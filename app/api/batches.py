"""/api/v1/batches: many cells in, classified in the background, a ranked queue out."""

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.api.predictions import ERRORS
from app.api.schemas import BatchCounts, BatchItemOut, BatchItemPage, BatchOut, PredictionOut
from app.db.models import Batch, BatchItem
from app.domain import BatchStatus, ItemStatus, QueueOrder
from app.errors import InputError
from app.http.deps import ActorDep, ContextDep, SessionDep
from app.http.params import Offset, RecordId
from app.http.uploads import batch_form, incoming_files
from app.services import batches as service
from app.services.calls import CallPolicy

router = APIRouter(prefix="/api/v1/batches", tags=["batches"])


def batch_out(session: Session, batch: Batch) -> BatchOut:
    progress = service.progress(session, batch.id)
    return BatchOut(
        id=batch.id,
        name=batch.name,
        accession_id=batch.accession_id,
        status=BatchStatus.DONE if progress.done else BatchStatus.PROCESSING,
        progress=round(progress.fraction, 4),
        counts=BatchCounts(**asdict(progress)),
        created_at=batch.created_at,
    )


def item_out(item: BatchItem, policy: CallPolicy) -> BatchItemOut:
    prediction = PredictionOut.of(item.prediction, policy) if item.prediction else None
    return BatchItemOut(
        id=item.id,
        position=item.position,
        file_name=item.filename,
        status=item.status,
        error=item.error,
        qc_sample=item.qc_sample,
        uncertainty=service.uncertainty(item, policy) if item.prediction else None,
        needs_review=prediction.needs_review if prediction else None,
        review_reasons=prediction.review_reasons if prediction else [],
        in_distribution=prediction.in_distribution if prediction else None,
        ood_score=prediction.ood_score if prediction else None,
        prediction=prediction,
    )


BATCH_FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "Cell images (repeat the field, up to PAPCAD_MAX_BATCH_ITEMS).",
                        },
                        "archive": {"type": "string", "format": "binary", "description": "Or one zip of images."},
                        "accession_id": {"type": "string"},
                        "name": {"type": "string", "maxLength": 128},
                    },
                }
            }
        },
    }
}


@router.post("", status_code=202, response_model=BatchOut, responses=ERRORS, openapi_extra=BATCH_FORM_SCHEMA)
async def submit_batch(
    request: Request, context: ContextDep, session: SessionDep, actor: ActorDep, response: Response
) -> BatchOut:
    """Queue a batch for background classification; poll `GET /api/v1/batches/{id}` for progress.

    Multipart fields: `image` (repeat, one per cell) or `archive` (one zip), `accession_id`, `name`."""
    async with batch_form(request, context.settings, "image") as form:
        name = form.text("name")
        if name is not None and len(name) > 128:
            raise InputError("name must be at most 128 characters")
        files = incoming_files(context.settings, form.images, form.archive)
        batch = await run_in_threadpool(
            service.create_batch, session, context.images, context.settings, actor, files, name,
            form.text("accession_id"),
        )  # fmt: skip
    context.work_arrived()
    response.headers["Location"] = f"/api/v1/batches/{batch.id}"
    return batch_out(session, batch)


@router.get("/{batch_id}", response_model=BatchOut, responses=ERRORS)
def get_batch(batch_id: RecordId, session: SessionDep, actor: ActorDep) -> BatchOut:
    return batch_out(session, service.read_batch(session, actor, batch_id))


@router.get("/{batch_id}/items", response_model=BatchItemPage, responses=ERRORS)
def list_items(
    batch_id: RecordId,
    context: ContextDep,
    session: SessionDep,
    actor: ActorDep,
    order: Annotated[
        QueueOrder,
        Query(
            description="suspicion (highest P(abnormal) first), uncertainty (nearest the cut-off first), or position"
        ),
    ] = QueueOrder.SUSPICION,
    unreviewed: bool = False,
    predicted_class: Annotated[str | None, Query(alias="class")] = None,
    min_abnormal: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_abnormal: Annotated[float | None, Query(ge=0, le=1)] = None,
    status: ItemStatus | None = None,
    qc_only: Annotated[bool, Query(description="Only the QC sample of confident normal calls.")] = False,
    needs_review: Annotated[
        bool, Query(description="Only cells that need review (near the cut-off, disagreeing, not typical, flagged).")
    ] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> BatchItemPage:
    """The batch's cells ranked for review, with their predictions."""
    flt = service.QueueFilter(
        order, unreviewed, predicted_class, min_abnormal, max_abnormal, status, qc_only, needs_review
    )
    page, total = service.read_queue_page(session, actor, batch_id, flt, context.policy, limit, offset)
    return BatchItemPage(items=[item_out(i, context.policy) for i in page], total=total, limit=limit, offset=offset)


@router.get("/{batch_id}/export.csv", response_class=Response, responses=ERRORS)
def export(batch_id: RecordId, session: SessionDep, actor: ActorDep) -> Response:
    """One row per cell: file name, accession, probabilities, call, review, final label, reviewer, times."""
    body = service.export_csv(session, actor, batch_id)
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="papcad-batch-{batch_id}.csv"'},
    )
