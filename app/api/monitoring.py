"""/api/v1/monitoring: agreement between the model and its reviewers, for admins and pathologists."""

from datetime import date

from fastapi import APIRouter

from app.api.deps import ActorDep, SessionDep
from app.api.predictions import ERRORS
from app.services import monitoring as service

router = APIRouter(prefix="/api/v1/monitoring", tags=["monitoring"])


@router.get("", response_model=service.Report, responses=ERRORS)
def get_monitoring(
    session: SessionDep, actor: ActorDep, date_from: date | None = None, date_to: date | None = None
) -> service.Report:
    """Confusion matrix (rows: model call, columns: final human label), agreement, override rate,
    Cohen's kappa and override rate per day, overall and per model version. Dates filter on the
    UTC day of each prediction's latest review, both ends included. API keys are refused."""
    service.check_can_view(actor)
    return service.load_report(session, date_from, date_to)
