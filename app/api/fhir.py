"""/api/v1/predictions/{id}/fhir: one prediction as a FHIR R4-family bundle for the LIS."""

from fastapi import APIRouter, Response

from app.api.predictions import ERRORS
from app.http.deps import ActorDep, ContextDep, SessionDep
from app.http.params import RecordId
from app.services import fhir as service

router = APIRouter(prefix="/api/v1/predictions", tags=["predictions"])

FHIR_JSON = "application/fhir+json"


@router.get(
    "/{prediction_id}/fhir",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {FHIR_JSON: {}}, "description": "A FHIR Bundle (type collection)."}},
)
def get_fhir_bundle(prediction_id: RecordId, context: ContextDep, session: SessionDep, actor: ActorDep) -> Response:
    """DiagnosticReport with Observations (per-class probabilities, P(abnormal), the model call, its
    SNOMED CT Bethesda hint, and the reviewer's final label once reviewed) and the model as a Device.
    Validated against the fhir.resources R4B models before it is sent."""
    return Response(service.read_bundle(session, actor, prediction_id, context.policy), media_type=FHIR_JSON)
