"""Batch pages: intake, progress and the ranked gallery (the review view of one cell is in app.web.review)."""

from collections.abc import Mapping
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db.models import Batch
from app.domain import QueueOrder
from app.errors import InputError, PapcadError, PermissionDeniedError
from app.http import sessions as browser_sessions
from app.http.deps import ContextDep, SessionDep
from app.http.params import RecordId, bounded_id
from app.http.uploads import batch_form, incoming_files
from app.security import csrf_matches
from app.services import batches as service
from app.services.actors import Actor
from app.web.routes import PageActor, render

router = APIRouter(include_in_schema=False)


def queue_order(value: str | None) -> QueueOrder:
    """The queue's ranking from a query string (blank: by suspicion)."""
    try:
        return QueueOrder(value) if value else QueueOrder.SUSPICION
    except ValueError as exc:
        raise InputError("order must be 'suspicion', 'uncertainty' or 'position'") from exc


def queue_filter(q: Mapping[str, str]) -> service.QueueFilter:
    """Filters from a query string; blank fields mean 'any'."""

    def number(key: str) -> float | None:
        try:
            return float(q[key]) if q.get(key) else None
        except ValueError as exc:
            raise InputError(f"{key} must be a number between 0 and 1") from exc

    return service.QueueFilter(
        order=queue_order(q.get("order")),
        unreviewed=q.get("unreviewed") == "1",
        predicted_class=q.get("class") or None,
        min_abnormal=number("min"),
        max_abnormal=number("max"),
        qc_only=q.get("qc") == "1",
        needs_review=q.get("needs_review") == "1",
    ).validate()


def batch_of(q: Mapping[str, str]) -> int | None:
    """The batch a queue is limited to, or None for the queue of all batches."""
    return bounded_id(q.get("batch"))


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
def batches_page(request: Request, session: SessionDep, actor: PageActor) -> HTMLResponse:
    return _batches_view(request, session, actor)


def _batches_view(
    request: Request, session: Session, actor: Actor, error: str | None = None, status: int = 200
) -> HTMLResponse:
    """The intake form and recent batches (status and error are not for the query string)."""
    rows = service.recent_batches(session, actor)
    progress = {b.id: service.progress(session, b.id) for b in rows}
    return render(request, "batches.html", status, actor=actor, batches=rows, progress=progress, error=error)


@router.post("/batches")
async def submit_batch(request: Request, context: ContextDep, session: SessionDep, actor: PageActor) -> Response:
    """Read the form here (not with FastAPI's parser) so a batch may hold PAPCAD_MAX_BATCH_ITEMS files."""
    try:
        async with batch_form(request, context.settings, "images") as form:
            if not csrf_matches(browser_sessions.signed_in_csrf(request), form.text("csrf")):
                raise PermissionDeniedError(
                    "the form has expired or did not come from this site; reload the page and retry"
                )
            files = incoming_files(context.settings, form.images, form.archive)
            batch = await run_in_threadpool(
                service.create_batch, session, context.images, context.settings, actor, files,
                form.text("name"), form.text("accession_id"),
            )  # fmt: skip
    except PermissionDeniedError:
        raise
    except PapcadError as exc:
        return _batches_view(request, session, actor, error=str(exc), status=422)
    context.work_arrived()
    return RedirectResponse(f"/batches/{batch.id}", status_code=303)


def _gallery(
    request: Request, context: AppContext, session: Session, actor: Actor, batch: Batch | None
) -> HTMLResponse:
    error: str | None = None
    try:
        flt = queue_filter(request.query_params)
    except InputError as exc:
        flt, error = service.QueueFilter(), str(exc)
    batch_id = batch.id if batch else None
    items = service.read_gallery(session, actor, batch_id, flt, context.policy, filter_query(flt, None))
    return render(
        request, "queue.html", actor=actor, batch=batch, items=items, flt=flt,
        progress=service.progress(session, batch.id) if batch else None,
        query=filter_query(flt, batch_id), error=error, policy=context.policy,
        qc_count=service.qc_sample_size(session, batch_id),
    )  # fmt: skip


@router.get("/batches/{batch_id}")
def batch_page(
    batch_id: RecordId, request: Request, context: ContextDep, session: SessionDep, actor: PageActor
) -> HTMLResponse:
    return _gallery(request, context, session, actor, service.get_batch(session, batch_id))


@router.get("/queue")
def global_queue(request: Request, context: ContextDep, session: SessionDep, actor: PageActor) -> HTMLResponse:
    return _gallery(request, context, session, actor, None)
