"""The review view of one batch cell: buttons and keys to confirm or override, a comment, amendment
with a reason, undo of one's last review within a minute, and where the cell stands (batch, case)."""

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import QueryParams

from app.context import AppContext
from app.db.models import Batch, BatchItem, Prediction
from app.errors import ConflictError, InputError, NotFoundError, PermissionDeniedError
from app.http.deps import ContextDep, SessionDep
from app.http.params import RecordId
from app.ml.classes import BETHESDA_HINT
from app.services import batches as batch_service
from app.services import cases, predictions, reviews
from app.services.actors import Actor
from app.web.batches import batch_of, filter_query, queue_filter
from app.web.cases import case_url
from app.web.routes import CsrfChecked, PageActor, render

router = APIRouter(include_in_schema=False)


def _item(session: Session, item_id: int) -> tuple[BatchItem, Prediction]:
    """A classified batch cell and its prediction; NotFoundError for any other id."""
    item = session.get(BatchItem, item_id)
    if item is None or item.prediction is None:
        raise NotFoundError(f"no classified cell {item_id}")
    return item, item.prediction


def _review_view(
    request: Request,
    context: AppContext,
    session: Session,
    actor: Actor,
    item: BatchItem,
    prediction_id: int,
    params: Mapping[str, str],
    status_code: int = 200,
    **extra: Any,
) -> HTMLResponse:
    batch_id, flt = batch_of(params), queue_filter(params)
    near = batch_service.neighbours(session, item.id, batch_id, flt, context.policy)
    prediction = predictions.read_prediction(session, actor, prediction_id)
    batch = session.get(Batch, item.batch_id)
    accession = prediction.accession_id or (batch.accession_id if batch else None)
    undo = reviews.undoable(session, actor)
    undo_item = session.scalar(select(BatchItem).where(BatchItem.prediction_id == undo.prediction_id)) if undo else None
    return render(
        request, "review.html", status_code, actor=actor, item=item, p=prediction, bethesda=BETHESDA_HINT,
        final_label=predictions.final_label(prediction), previous=near.previous, following=near.following,
        position=near.position, count=near.count,
        query=filter_query(flt, batch_id), policy=context.policy, batch=batch, accession=accession,
        batch_progress=batch_service.progress(session, item.batch_id),
        case_progress=cases.review_progress(session, accession) if accession else None,
        locked=bool(accession and cases.is_signed_out(session, accession)),
        case_link=case_url(accession) if accession else None, undo=undo, undo_item=undo_item,
        undo_seconds=reviews.UNDO_SECONDS, **extra,
    )  # fmt: skip


@router.get("/queue/items/{item_id}")
def review_page(
    item_id: RecordId,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    error: str | None = None,
) -> HTMLResponse:
    item, prediction = _item(session, item_id)
    return _review_view(request, context, session, actor, item, prediction.id, request.query_params, error=error)


@router.post("/queue/items/{item_id}/review", dependencies=[CsrfChecked])
def review_item(
    item_id: RecordId,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    label: Annotated[str | None, Form()] = None,
    action: Annotated[str | None, Form()] = None,
    comment: Annotated[str | None, Form()] = None,
    reason: Annotated[str | None, Form()] = None,
    query: Annotated[str, Form()] = "",
) -> Response:
    """Record the review (the button or key names the class: the model's call confirms, any other
    overrides), then go straight to the next cell of the same queue."""
    item, prediction = _item(session, item_id)
    params = QueryParams(query)
    flt, batch_id = queue_filter(params), batch_of(params)
    following = batch_service.neighbours(session, item.id, batch_id, flt, context.policy).following
    model_call = prediction.predicted_class
    if action is None:
        action = "confirm" if label in (None, "", model_call) else "override"
    try:
        reviews.add_review(session, actor, prediction.id, action, label, comment, reason)
    except (InputError, PermissionDeniedError, ConflictError) as exc:
        session.rollback()
        status = {PermissionDeniedError: 403, ConflictError: 409}.get(type(exc), 422)
        return _review_view(
            request, context, session, actor, item, prediction.id, params, status,
            error=str(exc), comment=comment, reason=reason,
        )  # fmt: skip
    if following:
        target = f"/queue/items/{following}?{query}"
    else:
        target = f"/batches/{batch_id}" if batch_id else "/queue"
    return RedirectResponse(target, status_code=303)


@router.post("/queue/items/{item_id}/undo", dependencies=[CsrfChecked])
def undo_item(
    item_id: RecordId,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    review_id: Annotated[int, Form()],
    prediction_id: Annotated[int, Form()],
    query: Annotated[str, Form()] = "",
) -> Response:
    """Take back one's last review (within a minute) and show that cell again."""
    item, cell_prediction = _item(session, item_id)
    try:
        reviews.undo_review(session, actor, prediction_id, review_id)
    except (InputError, PermissionDeniedError, ConflictError, NotFoundError) as exc:
        session.rollback()
        return _review_view(
            request, context, session, actor, item, cell_prediction.id, QueryParams(query), 409, error=str(exc)
        )
    undone = session.scalar(select(BatchItem).where(BatchItem.prediction_id == prediction_id))
    target = f"/queue/items/{undone.id}?{query}" if undone else f"/predictions/{prediction_id}"
    return RedirectResponse(target, status_code=303)
