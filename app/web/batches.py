"""Batch pages: intake, progress, the ranked gallery, and keyboard-driven review."""

from collections.abc import Mapping
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from starlette.datastructures import QueryParams

from app.api.batches import incoming_files
from app.api.deps import ContextDep, SessionDep
from app.db.models import Batch, BatchItem
from app.errors import InputError, NotFoundError, PapcadError, PermissionDeniedError
from app.ml.classes import BETHESDA_HINT
from app.services import batches as service
from app.services import predictions
from app.web.routes import CsrfChecked, PageActor, render

router = APIRouter(include_in_schema=False)


def queue_filter(q: Mapping[str, str]) -> service.QueueFilter:
    """Filters from a query string; blank fields mean 'any'."""

    def number(key: str) -> float | None:
        try:
            return float(q[key]) if q.get(key) else None
        except ValueError as exc:
            raise InputError(f"{key} must be a number between 0 and 1") from exc

    return service.QueueFilter(
        order=q.get("order") or "suspicion",
        unreviewed=q.get("unreviewed") == "1",
        predicted_class=q.get("class") or None,
        min_abnormal=number("min"),
        max_abnormal=number("max"),
        qc_only=q.get("qc") == "1",
        needs_review=q.get("needs_review") == "1",
    ).validate()


def batch_of(q: Mapping[str, str]) -> int | None:
    """The batch a queue is limited to, or None for the queue of all batches."""
    return int(q["batch"]) if q.get("batch", "").isdigit() else None


def filter_query(flt: service.QueueFilter, batch_id: int | None) -> str:
    params = {
        "batch": batch_id or "",
        "order": flt.order,
        "unreviewed": "1" if flt.unreviewed else "",
        "class": flt.predicted_class or "",
        "min": "" if flt.min_abnormal is None else flt.min_abnormal,
        "max": "" if flt.max_abnormal is None else flt.max_abnormal,
        "qc": "1" if flt.qc_only else "",
        "needs_review": "1" if flt.needs_review else "",
    }
    return urlencode({k: v for k, v in params.items() if v != ""})


@router.get("/batches")
def batches_page(request: Request, session: SessionDep, actor: PageActor):
    return _batches_view(request, session, actor)


def _batches_view(request: Request, session, actor, error: str | None = None, status: int = 200):
    """The intake form and recent batches (status and error are not for the query string)."""
    rows = list(session.scalars(select(Batch).order_by(Batch.id.desc()).limit(50)))
    progress = {b.id: service.progress(session, b.id) for b in rows}
    return render(request, "batches.html", status, actor=actor, batches=rows, progress=progress, error=error)


@router.post("/batches", dependencies=[CsrfChecked])
async def submit_batch(
    request: Request,
    context: ContextDep,
    actor: PageActor,
    images: Annotated[list[UploadFile] | None, File()] = None,
    archive: Annotated[UploadFile | None, File()] = None,
    name: Annotated[str | None, Form()] = None,
    accession_id: Annotated[str | None, Form()] = None,
):
    images = [f for f in images or [] if f.filename]
    archive = archive if archive is not None and archive.filename else None
    try:
        files = await incoming_files(context, images, archive)
        batch = await run_in_threadpool(
            service.create_batch, context.sessions, context.images, context.settings, actor, files, name, accession_id
        )
    except PapcadError as exc:
        with context.sessions() as session:
            return _batches_view(request, session, actor, error=str(exc), status=422)
    context.work_arrived()
    return RedirectResponse(f"/batches/{batch.id}", status_code=303)


def _gallery(request: Request, context, session, actor, batch: Batch | None):
    try:
        flt = queue_filter(request.query_params)
    except InputError as exc:
        flt, error = service.QueueFilter(), str(exc)
    else:
        error = None
    batch_id = batch.id if batch else None
    items = service.queue_items(session, batch_id, flt, context.policy)
    return render(
        request, "queue.html", actor=actor, batch=batch, items=items, flt=flt,
        progress=service.progress(session, batch.id) if batch else None,
        query=filter_query(flt, batch_id), error=error, uncertainty=service.uncertainty, policy=context.policy,
        qc_count=service.qc_sample_size(session, batch_id),
    )  # fmt: skip


@router.get("/batches/{batch_id}")
def batch_page(batch_id: int, request: Request, context: ContextDep, session: SessionDep, actor: PageActor):
    return _gallery(request, context, session, actor, service.get_batch(session, batch_id))


@router.get("/queue")
def global_queue(request: Request, context: ContextDep, session: SessionDep, actor: PageActor):
    return _gallery(request, context, session, actor, None)


def _neighbours(session, policy, item: BatchItem, batch_id: int | None, flt: service.QueueFilter):
    ids = [i.id for i in service.queue_items(session, batch_id, flt, policy) if i.prediction is not None]
    if item.id not in ids:
        return None, (ids[0] if ids else None), ids
    at = ids.index(item.id)
    return (ids[at - 1] if at > 0 else None), (ids[at + 1] if at + 1 < len(ids) else None), ids


@router.get("/queue/items/{item_id}")
def review_page(
    item_id: int, request: Request, context: ContextDep, session: SessionDep, actor: PageActor, error: str | None = None
):
    item = session.get(BatchItem, item_id)
    if item is None or item.prediction is None:
        raise NotFoundError(f"no classified cell {item_id}")
    batch_id = batch_of(request.query_params)
    flt = queue_filter(request.query_params)
    previous, following, ids = _neighbours(session, context.policy, item, batch_id, flt)
    prediction = predictions.read_prediction(session, actor, item.prediction.id)
    return render(
        request, "review.html", actor=actor, item=item, p=prediction, bethesda=BETHESDA_HINT,
        final_label=predictions.final_label(prediction), previous=previous, following=following,
        position=(ids.index(item.id) + 1 if item.id in ids else None), count=len(ids),
        query=filter_query(flt, batch_id), error=error, policy=context.policy,
    )  # fmt: skip


@router.post("/queue/items/{item_id}/review", dependencies=[CsrfChecked])
def review_item(
    item_id: int,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    action: Annotated[str, Form()],
    label: Annotated[str | None, Form()] = None,
    query: Annotated[str, Form()] = "",
):
    """Record the review, then go straight to the next cell of the same queue."""
    item = session.get(BatchItem, item_id)
    if item is None or item.prediction is None:
        raise NotFoundError(f"no classified cell {item_id}")
    params = QueryParams(query)
    flt, batch_id = queue_filter(params), batch_of(params)
    _, following, _ = _neighbours(session, context.policy, item, batch_id, flt)
    try:
        predictions.add_review(session, actor, item.prediction.id, action, label, None)
    except (InputError, PermissionDeniedError) as exc:
        session.rollback()
        return RedirectResponse(f"/queue/items/{item_id}?{query}&{urlencode({'error': str(exc)})}", status_code=303)
    target = f"/queue/items/{following}?{query}" if following else (f"/batches/{batch_id}" if batch_id else "/queue")
    return RedirectResponse(target, status_code=303)
