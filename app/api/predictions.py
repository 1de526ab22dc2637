"""/api/v1/predictions: submit an image, read results, review them."""

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.api.schemas import PredictionOut, PredictionPage, Problem, ReviewIn, ReviewOut
from app.domain import PredictionSource
from app.http.deps import ActorDep, ContextDep, SessionDep
from app.http.params import Offset, RecordId
from app.services import predictions as service
from app.services import reviews
from app.services.text import strip_control_characters

router = APIRouter(prefix="/api/v1/predictions", tags=["predictions"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {"application/problem+json": {}}} for code in (401, 403, 404, 422)
}


@router.post(
    "", status_code=201, response_model=PredictionOut, responses={**ERRORS, 409: ERRORS[422], 413: ERRORS[422]}
)
async def submit_prediction(
    context: ContextDep,
    session: SessionDep,
    actor: ActorDep,
    response: Response,
    image: Annotated[UploadFile, File(description="The cell image (BMP, PNG, JPEG or TIFF).")],
    accession_id: Annotated[str | None, Form(description="The LIS accession id of the specimen.")] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> PredictionOut:
    """Classify one cell image and record the result. Retrying with the same `Idempotency-Key`
    returns the first result (header `Idempotent-Replayed: true`) instead of a new one."""
    submission = service.Submission(
        data=image.file,
        source=PredictionSource.API,
        accession_id=accession_id,
        filename=strip_control_characters(image.filename),
        idempotency_key=idempotency_key,
    )
    prediction, created = await run_in_threadpool(
        service.create_prediction, session, context.batcher, context.images, context.settings, actor, submission
    )
    response.headers["Location"] = f"/api/v1/predictions/{prediction.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return PredictionOut.of(prediction, context.policy)


@router.get("", response_model=PredictionPage, responses=ERRORS)
def list_predictions(
    context: ContextDep,
    session: SessionDep,
    actor: ActorDep,
    accession_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Offset = 0,
) -> PredictionPage:
    """Newest first; filter by accession id."""
    rows, total = service.list_predictions(session, actor, accession_id, limit, offset)
    return PredictionPage(
        items=[PredictionOut.of(p, context.policy) for p in rows], total=total, limit=limit, offset=offset
    )


@router.get("/{prediction_id}", response_model=PredictionOut, responses=ERRORS)
def get_prediction(prediction_id: RecordId, context: ContextDep, session: SessionDep, actor: ActorDep) -> PredictionOut:
    return PredictionOut.of(service.read_prediction(session, actor, prediction_id), context.policy)


@router.get("/{prediction_id}/image", responses=ERRORS, response_class=Response)
def get_image(prediction_id: RecordId, context: ContextDep, session: SessionDep, actor: ActorDep) -> Response:
    """The submitted image file, as uploaded."""
    data, media_type = service.read_image(session, context.images, actor, prediction_id)
    return Response(data, media_type=media_type)


@router.get("/{prediction_id}/heatmap", responses={**ERRORS, 409: ERRORS[422]}, response_class=Response)
def get_heatmap(
    prediction_id: RecordId,
    context: ContextDep,
    session: SessionDep,
    actor: ActorDep,
    class_name: Annotated[str | None, Query(alias="class", description="Class to explain; default: the call.")] = None,
) -> Response:
    """Grad-CAM map (PNG, inferno, the image's aspect, at most 1024 px a side) of what drove the model's call."""
    png = service.read_heatmap(session, context.images, context.heatmaps, actor, prediction_id, class_name)
    return Response(png, media_type="image/png")


@router.post(
    "/{prediction_id}/reviews", status_code=201, response_model=ReviewOut, responses={**ERRORS, 409: ERRORS[422]}
)
def review_prediction(prediction_id: RecordId, body: ReviewIn, session: SessionDep, actor: ActorDep) -> ReviewOut:
    """Confirm or override the model's call. The prediction itself is never changed. A review of an
    already reviewed cell amends it and needs a `reason`; cells of a signed-out case are locked (409)."""
    review = reviews.add_review(session, actor, prediction_id, body.action, body.label, body.comment, body.reason)
    return ReviewOut.of(review)


@router.delete("/{prediction_id}/reviews/{review_id}", status_code=204, response_class=Response,
               responses={**ERRORS, 409: ERRORS[422]})  # fmt: skip
def undo_review(prediction_id: RecordId, review_id: RecordId, session: SessionDep, actor: ActorDep) -> Response:
    """Undo one's own latest review of a cell within a minute of making it (the audit trail keeps it)."""
    reviews.undo_review(session, actor, prediction_id, review_id)
    return Response(status_code=204)
