"""/api/v1/monitoring: agreement between the model and its reviewers, for admins and pathologists."""

from datetime import date

from fastapi import APIRouter

from app.api.predictions import ERRORS
from app.http.deps import ActorDep, ContextDep, SessionDep
from app.services import monitoring as service

router = APIRouter(prefix="/api/v1/monitoring", tags=["monitoring"])


@router.get("", response_model=service.Report, responses=ERRORS)
def get_monitoring(
    context: ContextDep,
    session: SessionDep,
    actor: ActorDep,
    date_from: date | None = None,
    date_to: date | None = None,
) -> service.Report:
    """Confusion matrix (rows: model call, columns: final human label), agreement, override rate,
    Cohen's kappa and override rate per day, overall and per model version. Dates filter on the
    UTC day of each prediction's latest review, both ends included. `safety`: sensitivity and specificity of
    the call at the lab's cut-off against the final labels, the missed abnormal cells (called normal, reviewed
    abnormal), QC-sample outcomes and agreement per reviewer. API keys are refused."""
    return service.read_report(session, actor, date_from, date_to, context.policy)
