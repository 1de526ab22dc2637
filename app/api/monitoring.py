"""/api/v1/monitoring: agreement between the model and its reviewers, for admins and pathologists."""

from datetime import date

from fastapi import APIRouter

from app.api.deps import ActorDep, ContextDep, SessionDep
from app.api.predictions import ERRORS
from app.services import audit
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
    service.check_can_view(actor)
    report = service.load_report(session, date_from, date_to, context.policy)
    dates = {"date_from": date_from and date_from.isoformat(), "date_to": date_to and date_to.isoformat()}
    audit.record_read(session, actor, "monitoring.read", None, None, **dates)
    return report
