"""/api/v1/batches: many cells in, classified in the background, a ranked queue out."""

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as ParsedFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import ActorDep, ContextDep, SessionDep
from app.api.predictions import ERRORS
from app.api.schemas import BatchCounts, BatchItemOut, BatchItemPage, BatchOut, PredictionOut
from app.config import Settings
from app.db.models import BatchItem
from app.errors import InputError
from app.http.params import Offset, RecordId
from app.services import audit
from app.services import batches as service
from app.services.calls import CallPolicy

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
    prediction = PredictionOut.of(item.prediction, policy) if item.prediction else None
    return BatchItemOut(
        id=item.id,
        position=item.position,
        file_name=item.filename,
        status=item.status,
        error=item.error,
        qc_sample=item.qc_sample,
        uncertainty=service.uncertainty(item) if item.prediction else None,
        needs_review=prediction.needs_review if prediction else None,
        review_reasons=prediction.review_reasons if prediction else [],
        in_distribution=prediction.in_distribution if prediction else None,
        ood_score=prediction.ood_score if prediction else None,
        prediction=prediction,
    )


BATCH_FORM_FIELDS = 20  # the text fields of the batch forms, with room to spare
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


@dataclass
class BatchForm:
    images: list[ParsedFile]
    archive: ParsedFile | None
    fields: dict[str, str]

    def text(self, key: str) -> str | None:
        return self.fields.get(key) or None


@asynccontextmanager
async def batch_form(request: Request, settings: Settings, image_field: str) -> AsyncIterator[BatchForm]:
    """The multipart batch form, parsed with room for PAPCAD_MAX_BATCH_ITEMS files.

    Starlette's parser allows 1,000 files unless told otherwise, and FastAPI's own form parsing
    cannot be told, so the batch routes read their form here. Spooled files are closed on exit.
    """
    try:
        # +1: a browser sends the empty file input it was not given (images or archive) as a part too.
        form = await request.form(max_files=settings.max_batch_items + 1, max_fields=BATCH_FORM_FIELDS)
    except StarletteHTTPException as exc:  # the parser's refusal: too many files or fields, bad multipart
        if "Too many files" in str(exc.detail):
            raise InputError(f"a batch may hold at most {settings.max_batch_items} images") from exc
        raise InputError(f"the form cannot be read: {exc.detail}") from exc
    try:
        uploads = {key: [v for v in form.getlist(key) if isinstance(v, ParsedFile) and v.filename] for key in form}
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        archives = uploads.get("archive", [])
        if len(archives) > 1:
            raise InputError("send one 'archive' zip file")
        yield BatchForm(uploads.get(image_field, []), archives[0] if archives else None, fields)
    finally:
        await form.close()


def incoming_files(
    settings: Settings, images: list[ParsedFile], archive: ParsedFile | None
) -> Iterable[service.IncomingFile]:
    """The submitted files: several image files, or one zip archive (not both), read lazily in create_batch."""
    if bool(images) == bool(archive):
        raise InputError("send either one or more 'image' files or one 'archive' zip file")
    if archive is not None:
        return service.files_from_zip(archive.file, settings)
    if len(images) > settings.max_batch_items:
        raise InputError(f"a batch may hold at most {settings.max_batch_items} images")
    return service.files_from_uploads([(upload.filename, upload.file) for upload in images], settings)


@router.post("", status_code=202, response_model=BatchOut, responses=ERRORS, openapi_extra=BATCH_FORM_SCHEMA)
async def submit_batch(request: Request, context: ContextDep, actor: ActorDep, response: Response) -> BatchOut:
    """Queue a batch for background classification; poll `GET /api/v1/batches/{id}` for progress.

    Multipart fields: `image` (repeat, one per cell) or `archive` (one zip), `accession_id`, `name`."""
    async with batch_form(request, context.settings, "image") as form:
        name = form.text("name")
        if name is not None and len(name) > 128:
            raise InputError("name must be at most 128 characters")
        files = incoming_files(context.settings, form.images, form.archive)
        batch = await run_in_threadpool(
            service.create_batch,
            context.sessions,
            context.images,
            context.settings,
            actor,
            files,
            name,
            form.text("accession_id"),
        )
    context.work_arrived()
    response.headers["Location"] = f"/api/v1/batches/{batch.id}"
    with context.sessions() as session:
        return batch_out(session, service.get_batch(session, batch.id))


@router.get("/{batch_id}", response_model=BatchOut, responses=ERRORS)
def get_batch(batch_id: RecordId, session: SessionDep, actor: ActorDep) -> BatchOut:
    batch = service.get_batch(session, batch_id)
    audit.record(session, actor, "batch.read", "batch", batch.id)
    session.commit()
    return batch_out(session, batch)


@router.get("/{batch_id}/items", response_model=BatchItemPage, responses=ERRORS)
def list_items(
    batch_id: RecordId,
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
    needs_review: Annotated[
        bool, Query(description="Only cells that need review (near the cut-off, disagreeing, not typical, flagged).")
    ] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
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
def export(batch_id: RecordId, session: SessionDep, actor: ActorDep) -> Response:
    """One row per cell: file name, accession, probabilities, call, review, final label, reviewer, times."""
    body = service.export_csv(session, actor, batch_id)
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="papcad-batch-{batch_id}.csv"'},
    )
