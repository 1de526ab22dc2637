"""One prediction as a FHIR bundle for the LIS: DiagnosticReport, Observations and the model as a Device.

Built and validated with fhir.resources. Its 8.x release defaults to R5 and has no plain R4 package,
so this uses `fhir.resources.R4B` (FHIR 4.3.0): R4B keeps R4's DiagnosticReport, Observation and
Device elements, so the JSON reads as R4 for these resources.

The only standard codes emitted are the three SNOMED CT Bethesda findings the Herlev classes can
support (NILM, LSIL, HSIL); the model has no ASC-US/ASC-H/AGC/SCC class, so those never appear.
"""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from sqlalchemy.orm import Session

from app.db.models import Prediction, Review
from app.ml.classes import BETHESDA_HINT, CLASS_LABELS, CLASS_NAMES
from app.services import audit
from app.services.actors import Actor
from app.services.calls import CallPolicy
from app.services.predictions import get_prediction

SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
CLASS_SYSTEM = "urn:papcad:herlev-class"
OBSERVATION_SYSTEM = "urn:papcad:observation"
ACCESSION_SYSTEM = "urn:papcad:accession"
PREDICTION_SYSTEM = "urn:papcad:prediction"
USERNAME_SYSTEM = "urn:papcad:username"
WEIGHTS_SYSTEM = "urn:papcad:model-weights-sha256"

# SNOMED CT findings for the Bethesda categories the model's classes map onto (app.ml.classes.BETHESDA_HINT).
BETHESDA_SNOMED: dict[str, tuple[str, str]] = {
    "NILM": ("373887005", "Negative for intraepithelial lesion or malignancy"),
    "LSIL": ("62051000119105", "Low grade squamous intraepithelial lesion on cervical Papanicolaou smear"),
    "HSIL": ("62061000119107", "High grade squamous intraepithelial lesion on cervical Papanicolaou smear"),
}

AUTOMATED_STATEMENT = (
    "Produced by an automated device (PapCAD machine-learning classifier) from a single-cell image. "
    "A computer-generated suggestion for review by a qualified cytotechnologist or pathologist, not a diagnosis; "
    "the Bethesda category is a cell-level hint, not a slide-level interpretation."
)
DEVICE_NOTE = "Automated device; result requires review by a qualified person."


def bethesda_coding(class_name: str) -> Coding:
    """SNOMED CT coding of the cell-level Bethesda hint of a Herlev class (KeyError for anything else)."""
    code, display = BETHESDA_SNOMED[BETHESDA_HINT[class_name]]
    return Coding(system=SNOMED, code=code, display=display)


def _bethesda_concept(class_name: str) -> CodeableConcept:
    return CodeableConcept(coding=[bethesda_coding(class_name)], text=BETHESDA_HINT[class_name])


def _class_concept(class_name: str) -> CodeableConcept:
    label = CLASS_LABELS[class_name]
    return CodeableConcept(coding=[Coding(system=CLASS_SYSTEM, code=class_name, display=label)], text=label)


def _local_code(code: str, text: str) -> CodeableConcept:
    return CodeableConcept(coding=[Coding(system=OBSERVATION_SYSTEM, code=code, display=text)], text=text)


def _id(*parts: object) -> str:
    """Stable ids: the same prediction gives the same resource ids on every export."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:papcad:" + ":".join(str(p) for p in parts)))


def _ref(resource: Resource) -> Reference:
    return Reference(reference=f"urn:uuid:{resource.id}", type=resource.get_resource_type())


def _practitioner(review: Review) -> Reference:
    username = review.reviewer.username
    return Reference(
        type="Practitioner",
        identifier=Identifier(system=USERNAME_SYSTEM, value=username),
        display=f"{username} ({review.reviewer.role})",
    )


def _review_note(review: Review) -> str:
    return f"{review.action} of the model call" + (f": {review.comment}" if review.comment else "")


def _quantity(value: float) -> dict[str, float | str]:
    return {"value": value, "unit": "1", "system": UCUM, "code": "1"}


def model_device(model_version: str, weights_sha256: str) -> Device:
    return Device(
        id=_id("model", model_version, weights_sha256),
        identifier=[Identifier(system=WEIGHTS_SYSTEM, value=weights_sha256)],
        status="active",
        deviceName=[
            {"name": "PapCAD", "type": "model-name"},
            {"name": f"PapCAD {model_version}", "type": "user-friendly-name"},
        ],
        type=CodeableConcept(text="Machine-learning classifier for single-cell Pap-smear images (software)"),
        version=[{"value": model_version}],
        note=[{"text": DEVICE_NOTE}],
    )


def _coded(system: str, code: str, display: str) -> CodeableConcept:
    return CodeableConcept(coding=[Coding(system=system, code=code, display=display)])


def _review_observations(
    prediction: Prediction,
    policy: CallPolicy | None,
    observation: Callable[..., Observation],
    by_model: dict[str, Any],
) -> list[Observation]:
    """Whether the image is a typical cell (OOD score, input checks) and, with the lab's policy, whether a
    person must review it and why."""
    made: list[Observation] = []
    if prediction.ood_score is not None:
        made.append(
            observation(
                "ood_score",
                "Out-of-distribution score of the image (at most 1: a typical cell; over 1: not a typical cell)",
                valueQuantity=_quantity(prediction.ood_score),
                **by_model,
            )
        )
    flags = prediction.input_flags or []
    if prediction.in_distribution is not None or flags:
        typical = prediction.in_distribution is not False and not flags
        found = "; ".join(flags + ([] if prediction.in_distribution is not False else ["OOD score over 1"]))
        made.append(
            observation(
                "typical_cell",
                "The image looks like a typical single-cell crop (false: not a typical cell)",
                valueBoolean=typical,
                **{**by_model, "note": [*by_model["note"], *([{"text": found}] if found else [])]},
            )
        )
    if policy is not None:
        reasons = policy.review_reasons(prediction)
        made.append(
            observation(
                "needs_review",
                "Needs review by a person (near the cut-off, call disagreement, not a typical cell, input checks)",
                valueBoolean=bool(reasons),
                **{**by_model, "note": [*by_model["note"], *({"text": r} for r in reasons)]},
            )
        )
    return made


def _observations(
    prediction: Prediction,
    review: Review | None,
    device: Device,
    common: dict[str, Any],
    policy: CallPolicy | None = None,
) -> list[Observation]:
    """The model's outputs (made by the device), then the reviewer's label (made by a person) if any."""

    def observation(part: str, text: str, **fields: Any) -> Observation:
        return Observation(id=_id("prediction", prediction.id, part), code=_local_code(part, text), **fields)

    by_model = {
        **common,
        "device": _ref(device),
        "method": CodeableConcept(text="Automated image analysis (machine-learning classifier)"),
        "note": [{"text": AUTOMATED_STATEMENT}],
    }
    made = [
        observation(
            f"probability:{name}",
            f"Probability: {CLASS_LABELS[name]}",
            valueQuantity=_quantity(prediction.probabilities[name]),
            **by_model,
        )
        for name in CLASS_NAMES
    ]
    made.append(
        observation(
            "abnormal_probability",
            "Probability of an abnormal cell (dysplasia or carcinoma in situ)",
            valueQuantity=_quantity(prediction.abnormal_probability),
            **by_model,
        )
    )
    made.append(
        observation(
            "model_call",
            "Model call (Herlev class)",
            valueCodeableConcept=_class_concept(prediction.predicted_class),
            **by_model,
        )
    )
    made.append(
        observation(
            "bethesda_hint",
            "Cell-level Bethesda category hint from the model call",
            valueCodeableConcept=_bethesda_concept(prediction.predicted_class),
            **by_model,
        )
    )
    made += _review_observations(prediction, policy, observation, by_model)
    if review is not None:
        made.append(
            observation(
                "final_label",
                "Reviewer's final label (Herlev class)",
                valueCodeableConcept=_class_concept(review.label),
                performer=[_practitioner(review)],
                note=[{"text": _review_note(review)}],
                **{**common, "effectiveDateTime": review.created_at},
            )
        )
    return made


def build_bundle(prediction: Prediction, issued: datetime | None = None, policy: CallPolicy | None = None) -> Bundle:
    """A `collection` bundle: the report first, then its observations and the device that made them.

    With the lab's call policy it also carries the needs-review flag and its reasons.
    """
    issued = issued or datetime.now(UTC)
    review = prediction.reviews[-1] if prediction.reviews else None
    status = "final" if review else "preliminary"
    device = model_device(prediction.model_version, prediction.weights_sha256)
    identifiers = [Identifier(system=PREDICTION_SYSTEM, value=str(prediction.id))]
    specimen = None
    if prediction.accession_id:
        # The LIS accession identifies the specimen (and order), not the patient: PapCAD holds no patient data.
        accession = Identifier(system=ACCESSION_SYSTEM, value=prediction.accession_id)
        specimen = Reference(type="Specimen", identifier=accession)
        identifiers.append(
            Identifier(
                type=_coded("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN", "Accession ID"),
                system=ACCESSION_SYSTEM,
                value=prediction.accession_id,
            )
        )
    common = {
        "status": status,
        "category": [_coded("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory", "Laboratory")],
        "effectiveDateTime": prediction.created_at,
        "issued": issued,
        "specimen": specimen,
    }
    observations = _observations(prediction, review, device, common, policy)
    reviewed = f" Reviewed: final label {CLASS_LABELS[review.label]} ({review.action})." if review else ""
    report = DiagnosticReport(
        id=_id("prediction", prediction.id, "report"),
        identifier=identifiers,
        status=status,
        category=[_coded("http://terminology.hl7.org/CodeSystem/v2-0074", "CP", "Cytopathology")],
        code=CodeableConcept(text="Automated single-cell Pap-smear classification (PapCAD)"),
        specimen=[specimen] if specimen else None,
        effectiveDateTime=prediction.created_at,
        issued=issued,
        # R4 allows no Device here: the device is named on each model-made Observation instead.
        resultsInterpreter=[_practitioner(review)] if review else None,
        result=[_ref(o) for o in observations],
        conclusion=AUTOMATED_STATEMENT + (reviewed or " Not yet reviewed."),
        conclusionCode=[_bethesda_concept(review.label if review else prediction.predicted_class)],
    )
    resources: list[Resource] = [report, *observations, device]
    return Bundle(
        id=str(uuid.uuid4()),
        type="collection",
        timestamp=issued,
        entry=[{"fullUrl": f"urn:uuid:{r.id}", "resource": r} for r in resources],
    )


def reference_problems(bundle: Bundle) -> list[str]:
    """References the library accepts but FHIR does not: dangling urn:uuid links, or a target type
    the element does not allow (fhir.resources checks structure, not reference targets)."""
    types = {e.fullUrl: e.resource.get_resource_type() for e in bundle.entry or [] if e.resource is not None}
    problems: list[str] = []

    def walk(model: FHIRAbstractModel, where: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name, None)
            extra = field.json_schema_extra
            listed = extra.get("enum_reference_types") if isinstance(extra, dict) else None
            allowed = listed if isinstance(listed, list) else None
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, Reference):
                    target = types.get(item.reference) if item.reference else item.type
                    if item.reference and item.reference.startswith("urn:uuid:") and target is None:
                        problems.append(f"{where}.{name}: {item.reference} is not in the bundle")
                    elif allowed and "Resource" not in allowed and target not in allowed:
                        problems.append(f"{where}.{name}: {target} is not one of {allowed}")
                elif isinstance(item, FHIRAbstractModel):
                    walk(item, f"{where}.{name}")

    for entry in bundle.entry or []:
        if entry.resource is None:
            problems.append(f"{entry.fullUrl}: an entry without a resource")
            continue
        walk(entry.resource, entry.resource.get_resource_type())
    return problems


def to_validated_json(bundle: Bundle) -> str:
    """Serialize, parse back with the library's Bundle model, and check references: what leaves is valid."""
    text = bundle.model_dump_json()
    parsed = Bundle.model_validate_json(text)
    problems = reference_problems(parsed)
    if problems:
        raise ValueError("invalid FHIR bundle: " + "; ".join(problems))
    return text


def read_bundle(session: Session, actor: Actor, prediction_id: int, policy: CallPolicy | None) -> str:
    """One prediction as validated FHIR JSON; the read is audited."""
    prediction = get_prediction(session, prediction_id)
    body = to_validated_json(build_bundle(prediction, policy=policy))
    audit.record_read(session, actor, "prediction.fhir.read", "prediction", prediction.id)
    return body
