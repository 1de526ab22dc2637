"""The FHIR export over real HTTP: every resource validates with fhir.resources, only supportable codes."""

import json

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy import text

from app.ml.classes import BETHESDA_HINT, CLASS_LABELS, CLASS_NAMES
from app.services import fhir

SNOMED = "http://snomed.info/sct"
ALLOWED_SNOMED = {"373887005", "62051000119105", "62061000119107"}  # NILM, LSIL, HSIL
ALLOWED_SYSTEMS = {
    SNOMED,
    "http://unitsofmeasure.org",
    "http://terminology.hl7.org/CodeSystem/observation-category",
    "http://terminology.hl7.org/CodeSystem/v2-0074",
    "http://terminology.hl7.org/CodeSystem/v2-0203",
    "urn:papcad:herlev-class",
    "urn:papcad:observation",
}


def test_every_bethesda_hint_maps_to_one_of_the_three_allowed_codes():
    assert set(BETHESDA_HINT.values()) == set(fhir.BETHESDA_SNOMED)
    for class_name in CLASS_NAMES:
        coding = fhir.bethesda_coding(class_name)
        assert coding.system == SNOMED and coding.code in ALLOWED_SNOMED
    assert {c: fhir.bethesda_coding(c).code for c in ("normal_columnar", "light_dysplastic", "carcinoma_in_situ")} == {
        "normal_columnar": "373887005",
        "light_dysplastic": "62051000119105",
        "carcinoma_in_situ": "62061000119107",
    }


def test_reference_check_catches_what_the_models_accept():
    """A Device is not an allowed DiagnosticReport.performer in R4, and urn:uuid links must resolve."""
    report = DiagnosticReport(
        id="r1",
        status="final",
        code={"text": "x"},
        performer=[{"reference": "urn:uuid:d1"}],
        result=[{"reference": "urn:uuid:missing"}],
    )
    device = get_fhir_model_class("Device")(id="d1")
    bundle = Bundle(
        type="collection",
        entry=[{"fullUrl": "urn:uuid:r1", "resource": report}, {"fullUrl": "urn:uuid:d1", "resource": device}],
    )
    problems = fhir.reference_problems(bundle)
    assert len(problems) == 2
    assert any("performer: Device" in p for p in problems) and any("missing" in p for p in problems)


def submit(client, path, accession_id=None) -> dict:
    data = {"accession_id": accession_id} if accession_id else {}
    with open(path, "rb") as handle:
        response = client.post("/api/v1/predictions", files={"image": (path.name, handle, "image/bmp")}, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def codings(node):
    """Every Coding anywhere in a JSON tree."""
    if isinstance(node, dict):
        if "system" in node and "code" in node and "value" not in node:
            yield node
        for value in node.values():
            yield from codings(value)
    elif isinstance(node, list):
        for value in node:
            yield from codings(value)


def fetch_bundle(client, prediction_id: int) -> dict:
    response = client.get(f"/api/v1/predictions/{prediction_id}/fhir")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    # The whole bundle, and each resource on its own, validate with the library's models.
    parsed = Bundle.model_validate_json(response.text)
    assert parsed.type == "collection"
    assert fhir.reference_problems(parsed) == []
    body = response.json()
    for entry in body["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
    # Only the three Bethesda SNOMED CT codes; no ASC-US/ASC-H/AGC/SCC, no other terminologies.
    found = list(codings(body))
    assert {c["code"] for c in found if c["system"] == SNOMED} <= ALLOWED_SNOMED
    assert {c["system"] for c in found} <= ALLOWED_SYSTEMS
    return body


def resources(body: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == kind]


def observation(body: dict, code: str) -> dict:
    (found,) = [o for o in resources(body, "Observation") if o["code"]["coding"][0]["code"] == code]
    return found


def snomed_of(class_name: str) -> str:
    return fhir.BETHESDA_SNOMED[BETHESDA_HINT[class_name]][0]


def test_fhir_bundle_before_and_after_review(live_server, herlev_image, sign_in, bundled_classifier):
    with live_server.client() as lis:
        created = submit(lis, herlev_image("moderate_dysplastic", 2), accession_id="ACC-FHIR-1")
        body = fetch_bundle(lis, created["id"])

    (report,) = resources(body, "DiagnosticReport")
    (device,) = resources(body, "Device")
    assert report["status"] == "preliminary" and "resultsInterpreter" not in report
    assert "automated device" in report["conclusion"].lower()
    assert [c["code"] for c in report["conclusionCode"][0]["coding"]] == [snomed_of(created["predicted_class"])]
    assert report["specimen"][0]["identifier"] == {"system": "urn:papcad:accession", "value": "ACC-FHIR-1"}
    assert {"system": "urn:papcad:accession", "value": "ACC-FHIR-1"}.items() <= report["identifier"][1].items()
    assert {r["reference"] for r in report["result"]} == {f"urn:uuid:{o['id']}" for o in resources(body, "Observation")}

    assert device["version"] == [{"value": bundled_classifier.version}]
    assert device["version"][0]["value"] == created["model_version"]
    assert "automated device" in device["note"][0]["text"].lower()

    probabilities = {name: observation(body, f"probability:{name}")["valueQuantity"]["value"] for name in CLASS_NAMES}
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert probabilities == pytest.approx(created["probabilities"])
    for name in CLASS_NAMES:
        obs = observation(body, f"probability:{name}")
        assert CLASS_LABELS[name] in obs["code"]["text"] and obs["valueQuantity"]["unit"] == "1"
        assert obs["device"]["reference"] == f"urn:uuid:{device['id']}" and obs["status"] == "preliminary"
    abnormal = observation(body, "abnormal_probability")["valueQuantity"]["value"]
    assert abnormal == pytest.approx(created["abnormal_probability"])
    hint = observation(body, "bethesda_hint")["valueCodeableConcept"]
    assert hint["text"] == created["bethesda_hint"] and hint["coding"][0]["code"] == snomed_of(
        created["predicted_class"]
    )
    assert not [o for o in resources(body, "Observation") if o["code"]["coding"][0]["code"] == "final_label"]

    # A pathologist overrides the call: the report becomes final and carries the person's label.
    label = "normal_superficiel" if created["predicted_class"] != "normal_superficiel" else "carcinoma_in_situ"
    browser, csrf = sign_in(live_server, "pathologist")
    try:
        review = browser.post(
            f"/api/v1/predictions/{created['id']}/reviews",
            json={"action": "override", "label": label},
            headers={"X-CSRF-Token": csrf},
        )
        assert review.status_code == 201, review.text
        reviewed = fetch_bundle(browser, created["id"])  # a signed-in person may read it too
    finally:
        browser.close()
    (report,) = resources(reviewed, "DiagnosticReport")
    assert report["status"] == "final"
    assert [c["code"] for c in report["conclusionCode"][0]["coding"]] == [snomed_of(label)]
    person = {"system": "urn:papcad:username", "value": live_server.users["pathologist"]}
    assert report["resultsInterpreter"][0]["identifier"] == person
    final = observation(reviewed, "final_label")
    assert final["valueCodeableConcept"]["coding"][0]["code"] == label
    assert final["performer"][0] == {**final["performer"][0], "type": "Practitioner", "identifier": person}
    assert "device" not in final
    # The model's own observations are unchanged, and the ids are stable between exports.
    assert (
        observation(reviewed, "probability:normal_superficiel")["id"]
        == observation(body, "probability:normal_superficiel")["id"]
    )
    assert json.dumps(observation(reviewed, "model_call")["valueCodeableConcept"]) == json.dumps(
        observation(body, "model_call")["valueCodeableConcept"]
    )

    with live_server.context.engine.connect() as connection:
        reads = connection.execute(
            text("SELECT actor FROM audit_events WHERE action = 'prediction.fhir.read' AND entity_id = :i ORDER BY id"),
            {"i": str(created["id"])},
        ).scalars()
        assert list(reads) == ["apikey:test-lis", f"user:{live_server.users['pathologist']}"]


def test_fhir_unknown_id_and_no_credentials(live_server):
    with live_server.client() as lis:
        missing = lis.get("/api/v1/predictions/999999/fhir")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert missing.json()["status"] == 404 and "999999" in missing.json()["detail"]
    with live_server.anonymous() as anonymous:
        response = anonymous.get("/api/v1/predictions/1/fhir")
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
