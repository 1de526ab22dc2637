"""One case (accession) as a FHIR bundle for the LIS: a slide-level DiagnosticReport over the cells.

The report's status follows the case: `preliminary` until a pathologist signs it out, `final` after,
`amended` once the sign-out has been amended. Its conclusion is the pathologist's interpretation
(before sign-out: the rule's suggestion, marked as such) and its `result` references every cell's
Observations, built by app.services.fhir as for the cell-level bundle.
"""

import uuid
from datetime import UTC, datetime

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from sqlalchemy.orm import Session

from app.db.models import CaseReport, User
from app.services import audit, cases, fhir
from app.services.actors import Actor
from app.services.calls import CallPolicy
from app.services.cases import INTERPRETATIONS, SUGGESTION_LABELS, CaseSummary

CASE_SYSTEM = "urn:papcad:case"
CASE_STATEMENT = (
    "Slide-level report over single-cell images classified by an automated device (PapCAD machine-learning "
    "classifier) and reviewed by cytology staff."
)


def _interpretation_concept(code: str, label: str) -> CodeableConcept:
    """SNOMED CT where the Bethesda category has a code here (NILM, LSIL, HSIL); text otherwise."""
    if code in fhir.BETHESDA_SNOMED:
        snomed, display = fhir.BETHESDA_SNOMED[code]
        return CodeableConcept(coding=[Coding(system=fhir.SNOMED, code=snomed, display=display)], text=label)
    return CodeableConcept(text=label)


def _pathologist(user: User) -> Reference:
    return Reference(
        type="Practitioner",
        identifier=Identifier(system=fhir.USERNAME_SYSTEM, value=user.username),
        display=f"{user.username} ({user.role})",
    )


def status_of(summary: CaseSummary) -> str:
    if summary.current is None:
        return "preliminary"
    return "amended" if summary.amended else "final"


def _conclusion(summary: CaseSummary, current: CaseReport | None) -> str:
    if current is None:
        suggestion = summary.suggestion
        return (
            f"{CASE_STATEMENT} Not signed out. Suggested from the cells (not a diagnosis): {suggestion.label} "
            f"({'; '.join(suggestion.reasons)})."
        )
    text = f"{CASE_STATEMENT} Interpretation: {INTERPRETATIONS[current.interpretation]}."
    if current.comment:
        text += f" Comment: {current.comment}"
    if current.kind == "amendment":
        original = summary.reports[0]
        text += (
            f" Amended ({current.reason}); originally signed out as {INTERPRETATIONS[original.interpretation]} "
            f"by {original.author.username} on {original.created_at.strftime('%Y-%m-%d %H:%M')} UTC."
        )
    return text


def build_case_bundle(summary: CaseSummary, policy: CallPolicy, issued: datetime | None = None) -> Bundle:
    """A `collection` bundle: the case report first, then each cell's Observations, then the model Devices."""
    issued = issued or datetime.now(UTC)
    status = status_of(summary)
    current = summary.current
    accession = Identifier(system=fhir.ACCESSION_SYSTEM, value=summary.accession_id)
    specimen = Reference(type="Specimen", identifier=accession)
    devices: dict[tuple[str, str], Device] = {}
    observations: list[Observation] = []
    for cell in summary.cells:
        p = cell.prediction
        key = (p.model_version, p.weights_sha256)
        device = devices.setdefault(key, fhir.model_device(*key))
        review = p.reviews[-1] if p.reviews else None
        common = {
            "status": "final" if review else "preliminary",
            "category": [
                fhir._coded("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory", "Laboratory")
            ],
            "effectiveDateTime": p.created_at,
            "issued": issued,
            "specimen": specimen,
        }
        observations += fhir._observations(p, review, device, common, policy)
    if current is not None:
        code, label = current.interpretation, INTERPRETATIONS[current.interpretation]
    else:
        code, label = summary.suggestion.interpretation, SUGGESTION_LABELS[summary.suggestion.interpretation]
        label = f"Suggested, not signed out: {label}"
    report = DiagnosticReport(
        id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:papcad:case:{summary.accession_id}:report")),
        identifier=[
            Identifier(system=CASE_SYSTEM, value=summary.accession_id),
            Identifier(
                type=fhir._coded("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN", "Accession ID"),
                system=fhir.ACCESSION_SYSTEM,
                value=summary.accession_id,
            ),
        ],
        status=status,
        category=[fhir._coded("http://terminology.hl7.org/CodeSystem/v2-0074", "CP", "Cytopathology")],
        code=CodeableConcept(text="Cervical cytology, slide-level interpretation (PapCAD case)"),
        specimen=[specimen],
        effectiveDateTime=min((c.prediction.created_at for c in summary.cells), default=issued),
        issued=current.created_at if current is not None else issued,
        resultsInterpreter=[_pathologist(current.author)] if current is not None else None,
        result=[fhir._ref(o) for o in observations] or None,
        conclusion=_conclusion(summary, current),
        conclusionCode=[_interpretation_concept(code, label)],
    )
    resources: list[Resource] = [report, *observations, *devices.values()]
    return Bundle(
        id=str(uuid.uuid4()),
        type="collection",
        timestamp=issued,
        entry=[{"fullUrl": f"urn:uuid:{r.id}", "resource": r} for r in resources],
    )


def read_case_bundle(session: Session, actor: Actor, accession_id: str, policy: CallPolicy) -> str:
    """The case as validated FHIR JSON; the read is audited."""
    summary = cases.load(session, accession_id, policy)
    body = fhir.to_validated_json(build_case_bundle(summary, policy))
    audit.record_read(session, actor, "case.fhir.read", "case", summary.accession_id)
    return body
