"""/api/v1/predictions: submit an image, read results, review them."""

from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.api.deps import ActorDep, ContextDep, SessionDep
from app.api.schemas import PredictionOut, PredictionPage, Problem, ReviewIn, ReviewOut
from app.config import Settings
from app.services import audit
from app.services import predictions as service
from app.services.images import CheckedImage, check_image

router = APIRouter(prefix="/api/v1/predictions", tags=["predictions"])

ERRORS = {code: {"model": Problem, "content": {"application/problem+json": {}}} for code in (401, 403, 404, 422)}


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes: enough to tell an over-size file without holding all of it."""
    return await upload.read(max_bytes + 1)


async def checked_upload(upload: UploadFile, settings: Settings) -> CheckedImage:
    """The uploaded file, decoded and checked off the event loop (decoding a large image takes time)."""
    data = await read_upload(upload, settings.max_upload_bytes)
    return await run_in_threadpool(check_image, data, settings.max_upload_bytes, settings.max_image_pixels)


@router.post(
    "", status_code=201, response_model=PredictionOut, responses={**ERRORS, 409: ERRORS[422], 413: ERRORS[422]}
)
async def submit_prediction(
    context: ContextDep,
    actor: ActorDep,
    response: Response,
    image: Annotated[UploadFile, File(description="The cell image (BMP, PNG, JPEG or TIFF).")],
    accession_id: Annotated[str | None, Form(description="The LIS accession id of the specimen.")] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> PredictionOut:
    """Classify one cell image and record the result. Retrying with the same `Idempotency-Key`
    returns the first result (header `Idempotent-Replayed: true`) instead of a new one."""
    checked = await checked_upload(image, context.settings)
    submission = service.Submission(
        image=checked, source="api", accession_id=accession_id, filename=image.filename, idempotency_key=idempotency_key
    )
    prediction, created = await run_in_threadpool(
        service.create_prediction, context.sessions, context.classifier, context.images, actor, submission
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
    offset: Annotated[int, Query(ge=0)] = 0,
) -> PredictionPage:
    """Newest first; filter by accession id."""
    rows, total = service.list_predictions(session, actor, accession_id, limit, offset)
    return PredictionPage(
        items=[PredictionOut.of(p, context.policy) for p in rows], total=total, limit=limit, offset=offset
    )


@router.get("/{prediction_id}", response_model=PredictionOut, responses=ERRORS)
def get_prediction(prediction_id: int, context: ContextDep, session: SessionDep, actor: ActorDep) -> PredictionOut:
    return PredictionOut.of(service.read_prediction(session, actor, prediction_id), context.policy)


@router.get("/{prediction_id}/image", responses=ERRORS, response_class=Response)
def get_image(prediction_id: int, context: ContextDep, session: SessionDep, actor: ActorDep) -> Response:
    """The submitted image file, as uploaded."""
    prediction = service.get_prediction(session, prediction_id)
    audit.record(session, actor, "prediction.image.read", "prediction", prediction.id)
    session.commit()
    stored = prediction.image
    data = context.images.path_for(stored.storage_path).read_bytes()
    media = {"BMP": "image/bmp", "PNG": "image/png", "JPEG": "image/jpeg", "TIFF": "image/tiff"}[stored.format]
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


@router.get("/{prediction_id}/heatmap", responses={**ERRORS, 409: ERRORS[422]}, response_class=Response)
def get_heatmap(
    prediction_id: int,
    context: ContextDep,
    session: SessionDep,
    actor: ActorDep,
    class_name: Annotated[str | None, Query(alias="class", description="Class to explain; default: the call.")] = None,
) -> Response:
    """Grad-CAM map (PNG, inferno colours, the image's own size) of what drove the model's call."""
    prediction = service.get_prediction(session, prediction_id)
    image = context.images.path_for(prediction.image.storage_path).read_bytes()
    png = context.heatmaps.png(prediction, image, class_name)
    audit.record(session, actor, "prediction.heatmap.read", "prediction", prediction.id)
    session.commit()
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.post("/{prediction_id}/reviews", status_code=201, response_model=ReviewOut, responses=ERRORS)
def review_prediction(prediction_id: int, body: ReviewIn, session: SessionDep, actor: ActorDep) -> ReviewOut:
    """Confirm or override the model's call. The prediction itself is never changed."""
    review = service.add_review(session, actor, prediction_id, body.action, body.label, body.comment)
    return ReviewOut.of(review)
