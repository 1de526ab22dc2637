"""Case pages: the list of accessions, one case (counts, ranked cells, referral, sign-out, amendment)
and its printable report."""

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from app.context import AppContext
from app.errors import ConflictError, InputError, PermissionDeniedError
from app.http.deps import ContextDep, SessionDep
from app.ml.classes import BETHESDA_HINT
from app.services import cases
from app.services.actors import Actor
from app.services.cases import INTERPRETATIONS, STATUS_LABELS, SUGGESTION_LABELS, CaseSummary
from app.web.routes import CsrfChecked, PageActor, render

router = APIRouter(include_in_schema=False)
SHOWN_CELLS = 200  # the case page lists this many cells, most suspicious first (the API lists all)


def case_url(accession_id: str, suffix: str = "") -> str:
    return f"/cases/{quote(accession_id, safe='')}{suffix}"


def _case_view(
    request: Request, context: AppContext, actor: Actor, summary: CaseSummary, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    return render(
        request, "case.html", status_code, actor=actor, s=summary, cells=summary.cells[:SHOWN_CELLS],
        interpretations=INTERPRETATIONS, statuses=STATUS_LABELS, suggestion_labels=SUGGESTION_LABELS,
        bethesda=BETHESDA_HINT, policy=context.policy, case_url=case_url, **extra,
    )  # fmt: skip


@router.get("/cases")
def cases_page(request: Request, session: SessionDep, actor: PageActor, accession_id: str | None = None) -> Response:
    """Recent cases, and a box to open one by accession id."""
    if accession_id and accession_id.strip():
        return RedirectResponse(case_url(accession_id.strip()), status_code=303)
    rows = cases.recent(session, actor)
    return render(request, "cases.html", actor=actor, rows=rows, statuses=STATUS_LABELS, case_url=case_url)


@router.get("/cases/{accession_id:path}/report")
def case_report(
    accession_id: str, request: Request, context: ContextDep, session: SessionDep, actor: PageActor
) -> HTMLResponse:
    """The case for the chart: a page laid out for printing."""
    summary = cases.read(session, actor, accession_id, context.policy)
    return render(
        request, "case_report.html", actor=actor, s=summary, interpretations=INTERPRETATIONS,
        statuses=STATUS_LABELS, suggestion_labels=SUGGESTION_LABELS, policy=context.policy,
        now_utc=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )  # fmt: skip


def _act(
    request: Request,
    context: AppContext,
    session: Session,
    actor: Actor,
    accession_id: str,
    action: Callable[[], CaseSummary],
) -> Response:
    """Run one case action; on a refusal show the case again with the reason, else go back to it."""
    try:
        summary = action()
    except (InputError, ConflictError, PermissionDeniedError) as exc:
        session.rollback()
        status = {PermissionDeniedError: 403, ConflictError: 409}.get(type(exc), 422)
        summary = cases.load(session, accession_id, context.policy)
        return _case_view(request, context, actor, summary, status, error=str(exc))
    return RedirectResponse(case_url(summary.accession_id) + "#status", status_code=303)


@router.post("/cases/{accession_id:path}/refer", dependencies=[CsrfChecked])
def refer(
    accession_id: str,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    note: Annotated[str | None, Form()] = None,
) -> Response:
    return _act(
        request, context, session, actor, accession_id,
        lambda: cases.refer(session, actor, accession_id, note, context.policy),
    )  # fmt: skip


@router.post("/cases/{accession_id:path}/sign-out", dependencies=[CsrfChecked])
def sign_out(
    accession_id: str,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    interpretation: Annotated[str, Form()],
    comment: Annotated[str | None, Form()] = None,
) -> Response:
    return _act(
        request, context, session, actor, accession_id,
        lambda: cases.sign_out(session, actor, accession_id, interpretation, comment, context.policy),
    )  # fmt: skip


@router.post("/cases/{accession_id:path}/amend", dependencies=[CsrfChecked])
def amend(
    accession_id: str,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    interpretation: Annotated[str, Form()],
    reason: Annotated[str | None, Form()] = None,
    comment: Annotated[str | None, Form()] = None,
) -> Response:
    return _act(
        request, context, session, actor, accession_id,
        lambda: cases.amend(session, actor, accession_id, interpretation, comment, reason, context.policy),
    )  # fmt: skip


@router.get("/cases/{accession_id:path}")
def case_page(
    accession_id: str, request: Request, context: ContextDep, session: SessionDep, actor: PageActor
) -> HTMLResponse:
    return _case_view(request, context, actor, cases.read(session, actor, accession_id, context.policy))
