"""/api/v1/cases/{accession_id}: a specimen's cells as one case; referral, sign-out, amendment, FHIR.

Accession ids may hold '/', so the id is matched as a path; the action routes come first.
"""

from fastapi import APIRouter, Response

from app.api.predictions import ERRORS
from app.api.schemas import AmendIn, CaseCellOut, CaseOut, CaseReportOut, ReferIn, SignOutIn
from app.http.deps import ActorDep, ContextDep, SessionDep
from app.services import case_fhir, cases
from app.services.cases import INTERPRETATIONS, CaseSummary

router = APIRouter(prefix="/api/v1/cases", tags=["cases"])
ACTION_ERRORS = {**ERRORS, 409: ERRORS[422]}
FHIR_JSON = "application/fhir+json"


def case_out(s: CaseSummary) -> CaseOut:
    case, current = s.case, s.current
    return CaseOut(
        accession_id=s.accession_id,
        status=s.status,
        amended=s.amended,
        cells=len(s.cells),
        reviewed=s.reviewed,
        unreviewed=len(s.cells) - s.reviewed,
        must_review=s.must_review,
        pending=s.pending,
        failed=s.failed,
        batch_ids=[b.id for b in s.batches],
        counts_by_call=s.by_call,
        counts_by_cutoff=s.by_cutoff,
        counts_by_final_label=s.by_final,
        qc_sample=s.qc,
        suggested_interpretation=s.suggestion.interpretation,
        suggested_label=s.suggestion.label,
        suggestion_reasons=s.suggestion.reasons,
        referred_by=case.referred_by.username if case and case.referred_by else None,
        referred_at=case.referred_at if case else None,
        referral_note=case.referral_note if case else None,
        interpretation=current.interpretation if current else None,
        reports=[
            CaseReportOut(
                sequence=r.sequence,
                kind=r.kind,
                interpretation=r.interpretation,
                interpretation_label=INTERPRETATIONS[r.interpretation],
                suggested=r.suggested,
                comment=r.comment,
                reason=r.reason,
                pathologist=r.author.username,
                created_at=r.created_at,
            )
            for r in s.reports
        ],
        most_suspicious=[
            CaseCellOut(
                prediction_id=c.prediction.id,
                batch_id=c.item.batch_id if c.item else None,
                batch_item_id=c.item.id if c.item else None,
                file_name=c.item.filename if c.item else c.prediction.original_filename,
                predicted_class=c.prediction.predicted_class,
                abnormal_probability=c.prediction.abnormal_probability,
                abnormal_call="abnormal" if c.abnormal_call else "normal",
                review_reasons=c.reasons,
                qc_sample=bool(c.item and c.item.qc_sample),
                final_label=c.final_label,
                overridden=c.overridden,
                must_review=c.must_review,
            )
            for c in s.cells
        ],
    )


@router.get(
    "/{accession_id:path}/fhir",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {FHIR_JSON: {}}, "description": "A FHIR Bundle (type collection)."}},
)
def get_case_fhir(accession_id: str, context: ContextDep, session: SessionDep, actor: ActorDep) -> Response:
    """The case as a FHIR R4B Bundle: a slide-level DiagnosticReport (`preliminary` before sign-out,
    `final` after, `amended` after an amendment) referencing every cell's Observations, and the model
    Devices. Validated against the fhir.resources models before it is sent."""
    body = case_fhir.read_case_bundle(session, actor, accession_id, context.policy)
    return Response(body, media_type=FHIR_JSON)


@router.post("/{accession_id:path}/refer", response_model=CaseOut, responses=ACTION_ERRORS)
def refer_case(accession_id: str, body: ReferIn, context: ContextDep, session: SessionDep, actor: ActorDep) -> CaseOut:
    """A cytotechnologist refers the case to a pathologist."""
    return case_out(cases.refer(session, actor, accession_id, body.note, context.policy))


@router.post("/{accession_id:path}/sign-out", response_model=CaseOut, responses=ACTION_ERRORS)
def sign_out_case(
    accession_id: str, body: SignOutIn, context: ContextDep, session: SessionDep, actor: ActorDep
) -> CaseOut:
    """A pathologist signs the case out with the final interpretation; the case is locked from then on.
    409 while cells are still being classified or cells that need a person are unreviewed."""
    summary = cases.sign_out(session, actor, accession_id, body.interpretation, body.comment, context.policy)
    return case_out(summary)


@router.post("/{accession_id:path}/amend", response_model=CaseOut, responses=ACTION_ERRORS)
def amend_case(accession_id: str, body: AmendIn, context: ContextDep, session: SessionDep, actor: ActorDep) -> CaseOut:
    """A pathologist amends a signed-out case with a reason; the original report is kept."""
    summary = cases.amend(session, actor, accession_id, body.interpretation, body.comment, body.reason, context.policy)
    return case_out(summary)


@router.get("/{accession_id:path}", response_model=CaseOut, responses=ERRORS)
def get_case(accession_id: str, context: ContextDep, session: SessionDep, actor: ActorDep) -> CaseOut:
    """Counts by model call and by final label, every cell most suspicious first, review and QC-sample
    state, status, and the suggested slide-level interpretation (see the rule in the README)."""
    return case_out(cases.read(session, actor, accession_id, context.policy))
