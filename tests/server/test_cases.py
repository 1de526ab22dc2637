"""Cases over real HTTP on SQLite and PostgreSQL: the accession's cells from single uploads and a batch,
the interpretation rule, review amendment and undo, referral, sign-out, lock, amendment, and the
case-level FHIR DiagnosticReport (validated with fhir.resources)."""

import json

import pytest
from alembic import command
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import create_engine, inspect, text

from app.db.migrate import alembic_config, upgrade_to_head
from app.services.cases import Evidence, suggest
from app.services.fhir import reference_problems
from tests.server.test_batches import wait_until_done

ACCESSION = "S26-77/A"  # a '/' in the id: the routes take it as a path
CELLS = [("severe_dysplastic", 0), ("normal_intermediate", 0), ("light_dysplastic", 1)]
BATCH_CELLS = [("normal_superficiel", 3), ("carcinoma_in_situ", 2)]


# --- the interpretation rule, on plain evidence -------------------------------------------------


def cell(model: str, final: str | None = None, needs_review: bool = False) -> Evidence:
    return Evidence(predicted_class=model, final_label=final, needs_review=needs_review)


@pytest.mark.parametrize(
    ("cells", "pending", "expected"),
    [
        ([], 0, "UNSATISFACTORY"),  # no cells
        ([cell("normal_superficiel"), cell("normal_columnar")], 0, "NILM"),
        ([cell("normal_superficiel"), cell("light_dysplastic")], 0, "LSIL"),
        ([cell("light_dysplastic"), cell("moderate_dysplastic")], 0, "HSIL"),
        # a reviewed label beats the model's class, both ways
        ([cell("severe_dysplastic", final="normal_intermediate")], 0, "NILM"),
        ([cell("normal_intermediate", final="carcinoma_in_situ")], 0, "HSIL"),
        # an unreviewed cell that needs review is unresolved: no NILM or LSIL while it is open ...
        ([cell("normal_superficiel"), cell("light_dysplastic", needs_review=True)], 0, "UNSATISFACTORY"),
        ([cell("light_dysplastic"), cell("normal_columnar", needs_review=True)], 0, "UNSATISFACTORY"),
        # ... but the worst counted finding still decides HSIL
        ([cell("severe_dysplastic"), cell("normal_columnar", needs_review=True)], 0, "HSIL"),
        # once reviewed it counts with its label
        (
            [cell("normal_superficiel"), cell("light_dysplastic", final="light_dysplastic", needs_review=True)],
            0,
            "LSIL",
        ),
        # cells still being classified are unresolved
        ([cell("normal_superficiel")], 2, "UNSATISFACTORY"),
        ([cell("carcinoma_in_situ")], 2, "HSIL"),
    ],
)
def test_interpretation_rule(cells, pending, expected):
    found = suggest(cells, pending)
    assert found.interpretation == expected
    assert found.reasons and found.label


# --- the case over HTTP -------------------------------------------------------------------------


def fhir_report(client, accession: str) -> tuple[dict, dict]:
    response = client.get(f"/api/v1/cases/{accession}/fhir")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate_json(response.text)  # the library's own validation
    assert reference_problems(bundle) == []
    body = json.loads(response.text)
    return body["entry"][0]["resource"], body


@pytest.fixture(scope="module")
def case(live_server, herlev_image):
    """Three single uploads and a two-cell batch of one accession, all classified."""
    ids = []
    with live_server.client() as api:
        for name, index in CELLS:
            image = herlev_image(name, index)
            created = api.post(
                "/api/v1/predictions",
                files={"image": (image.name, image.read_bytes())},
                data={"accession_id": ACCESSION},
            )
            assert created.status_code == 201, created.text
            ids.append(created.json()["id"])
        files = [("image", (herlev_image(n, i).name, herlev_image(n, i).read_bytes())) for n, i in BATCH_CELLS]
        batch = api.post("/api/v1/batches", files=files, data={"accession_id": ACCESSION})
        assert batch.status_code == 202, batch.text
        wait_until_done(api, batch.json()["id"])
    return {"prediction_ids": ids, "batch_id": batch.json()["id"]}


def test_case_gathers_uploads_and_batches(live_server, case):
    with live_server.client() as api:
        response = api.get(f"/api/v1/cases/{ACCESSION}")
        assert response.status_code == 200, response.text
        body = response.json()
        cells = {c["prediction_id"]: c for c in body["most_suspicious"]}
        predictions = {pid: api.get(f"/api/v1/predictions/{pid}").json() for pid in cells}
        report, bundle = fhir_report(api, ACCESSION)
        missing = api.get("/api/v1/cases/NO-SUCH-CASE")
        bad = api.get("/api/v1/cases/" + "x" * 70)
    assert body["accession_id"] == ACCESSION and body["status"] == "open" and body["cells"] == 5
    assert body["batch_ids"] == [case["batch_id"]] and body["pending"] == 0 and body["reviewed"] == 0
    assert set(case["prediction_ids"]) < set(cells)
    batch_cells = [c for c in cells.values() if c["batch_id"] == case["batch_id"]]
    assert len(batch_cells) == 2 and all(c["batch_item_id"] for c in batch_cells)
    # counts agree with the cells, which come most suspicious first
    p_abnormal = [c["abnormal_probability"] for c in body["most_suspicious"]]
    assert p_abnormal == sorted(p_abnormal, reverse=True)
    for pid, c in cells.items():
        assert c["predicted_class"] == predictions[pid]["predicted_class"]
        assert c["abnormal_call"] == predictions[pid]["abnormal_call"]
        assert c["review_reasons"] == predictions[pid]["review_reasons"]
    assert sum(body["counts_by_call"].values()) == 5 and body["counts_by_final_label"]["unreviewed"] == 5
    assert body["counts_by_cutoff"]["abnormal"] == sum(c["abnormal_call"] == "abnormal" for c in cells.values())
    expected = suggest(
        [Evidence(c["predicted_class"], None, bool(c["review_reasons"])) for c in cells.values()]
    ).interpretation
    assert body["suggested_interpretation"] == expected
    # FHIR: preliminary, every cell's Observations referenced
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "preliminary"
    observations = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert len(report["result"]) == len(observations) >= 5 * 10
    assert "Not signed out" in report["conclusion"]
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


def test_amend_and_undo_a_cell_review(live_server, case, sign_in):
    pid = case["prediction_ids"][1]
    cyto, cyto_csrf = sign_in(live_server, "cytotechnologist")
    path, headers = f"/api/v1/predictions/{pid}/reviews", {"X-CSRF-Token": cyto_csrf}
    first = cyto.post(path, json={"action": "confirm"}, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["amends_review_id"] is None
    silent = cyto.post(path, json={"action": "override", "label": "light_dysplastic"}, headers=headers)
    assert silent.status_code == 422 and "reason" in silent.json()["detail"]
    amended = cyto.post(
        path, json={"action": "override", "label": "light_dysplastic", "reason": "nucleus enlarged"}, headers=headers
    )
    assert amended.status_code == 201, amended.text
    assert amended.json()["amends_review_id"] == first.json()["id"]
    assert amended.json()["amend_reason"] == "nucleus enlarged"

    patho, patho_csrf = sign_in(live_server, "pathologist")
    review_id = amended.json()["id"]
    not_theirs = patho.delete(f"{path}/{review_id}", headers={"X-CSRF-Token": patho_csrf})
    assert not_theirs.status_code == 403
    not_latest = cyto.delete(f"{path}/{first.json()['id']}", headers=headers)
    assert not_latest.status_code == 409
    undone = cyto.delete(f"{path}/{review_id}", headers=headers)
    assert undone.status_code == 204, undone.text
    with live_server.client() as api:
        after = api.get(f"/api/v1/predictions/{pid}").json()
        case_body = api.get(f"/api/v1/cases/{ACCESSION}").json()
    assert [r["id"] for r in after["reviews"]] == [first.json()["id"]]
    assert after["final_label"] == after["predicted_class"]
    assert case_body["status"] == "in_review" and case_body["reviewed"] == 1
    with live_server.context.engine.connect() as connection:
        undo_events = connection.execute(
            text("SELECT COUNT(*) FROM audit_events WHERE action = 'review.undo' AND entity_id = :pid"),
            {"pid": str(pid)},
        ).scalar_one()
    assert undo_events == 1
    cyto.close()
    patho.close()


def test_refer_sign_out_lock_and_amend(live_server, case, sign_in):
    cyto, cyto_csrf = sign_in(live_server, "cytotechnologist")
    patho, patho_csrf = sign_in(live_server, "pathologist")
    ch, ph = {"X-CSRF-Token": cyto_csrf}, {"X-CSRF-Token": patho_csrf}
    base = f"/api/v1/cases/{ACCESSION}"

    # only a cytotechnologist refers, once; only a pathologist signs out
    assert patho.post(f"{base}/refer", json={}, headers=ph).status_code == 403
    referred = cyto.post(f"{base}/refer", json={"note": "HSIL cells?"}, headers=ch)
    assert referred.status_code == 200, referred.text
    assert (
        referred.json()["status"] == "referred"
        and referred.json()["referred_by"] == live_server.users["cytotechnologist"]
    )
    assert cyto.post(f"{base}/refer", json={}, headers=ch).status_code == 409
    assert cyto.post(f"{base}/sign-out", json={"interpretation": "HSIL"}, headers=ch).status_code == 403
    with live_server.client() as api:
        assert api.post(f"{base}/sign-out", json={"interpretation": "HSIL"}).status_code == 403

    # refused while cells that need a person are unreviewed; nothing is written
    state = patho.get(base).json()
    assert state["must_review"] >= 1  # at least the severe dysplasia, called abnormal
    blocked = patho.post(f"{base}/sign-out", json={"interpretation": "HSIL"}, headers=ph)
    assert blocked.status_code == 409 and "unreviewed" in blocked.json()["detail"]
    assert live_server.count("case_reports") == 0
    # review every unreviewed cell: the severe dysplasia as such, the rest normal
    severe = case["prediction_ids"][0]
    for c in state["most_suspicious"]:
        if c["final_label"] is None:
            label = "severe_dysplastic" if c["prediction_id"] == severe else "normal_superficiel"
            action = "confirm" if label == c["predicted_class"] else "override"
            done = cyto.post(
                f"/api/v1/predictions/{c['prediction_id']}/reviews", json={"action": action, "label": label}, headers=ch
            )
            assert done.status_code == 201, done.text
    ready = patho.get(base).json()
    assert ready["must_review"] == 0 and ready["reviewed"] == 5 and ready["suggested_interpretation"] == "HSIL"

    assert patho.post(f"{base}/sign-out", json={"interpretation": "CIN9"}, headers=ph).status_code == 422
    signed = patho.post(f"{base}/sign-out", json={"interpretation": "HSIL", "comment": "colposcopy"}, headers=ph)
    assert signed.status_code == 200, signed.text
    body = signed.json()
    assert body["status"] == "signed_out" and body["interpretation"] == "HSIL" and not body["amended"]
    assert body["reports"][0]["kind"] == "sign_out" and body["reports"][0]["suggested"] == "HSIL"
    report, _ = fhir_report(patho, ACCESSION)
    assert report["status"] == "final"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "62061000119107"  # SNOMED CT HSIL
    assert report["resultsInterpreter"][0]["identifier"]["value"] == live_server.users["pathologist"]

    # locked: no second sign-out, no cell review, no undo
    assert patho.post(f"{base}/sign-out", json={"interpretation": "LSIL"}, headers=ph).status_code == 409
    locked = cyto.post(
        f"/api/v1/predictions/{severe}/reviews",
        json={"action": "override", "label": "carcinoma_in_situ", "reason": "second look"},
        headers=ch,
    )
    assert locked.status_code == 409 and "signed out" in locked.json()["detail"]

    # an amendment needs a reason and a pathologist; the original stays
    assert patho.post(f"{base}/amend", json={"interpretation": "SCC"}, headers=ph).status_code == 422
    assert patho.post(f"{base}/amend", json={"interpretation": "SCC", "reason": " "}, headers=ph).status_code == 422
    assert cyto.post(f"{base}/amend", json={"interpretation": "SCC", "reason": "x"}, headers=ch).status_code == 403
    amended = patho.post(f"{base}/amend", json={"interpretation": "SCC", "reason": "invasion on review"}, headers=ph)
    assert amended.status_code == 200, amended.text
    reports = amended.json()["reports"]
    assert [(r["sequence"], r["kind"], r["interpretation"]) for r in reports] == [
        (1, "sign_out", "HSIL"),
        (2, "amendment", "SCC"),
    ]
    assert reports[1]["reason"] == "invasion on review" and amended.json()["amended"]
    report, _ = fhir_report(patho, ACCESSION)
    assert report["status"] == "amended"
    assert (
        "invasion on review" in report["conclusion"] and "originally signed out as High-grade" in report["conclusion"]
    )
    assert report["conclusionCode"][0]["text"].startswith("Squamous cell carcinoma")
    with live_server.context.engine.connect() as connection:
        actions = (
            connection.execute(
                text("SELECT action FROM audit_events WHERE entity_type = 'case' AND entity_id = :a ORDER BY id"),
                {"a": ACCESSION},
            )
            .scalars()
            .all()
        )
    assert [a for a in actions if a != "case.read" and a != "case.fhir.read"] == [
        "case.refer",
        "case.sign_out",
        "case.amend",
    ]
    cyto.close()
    patho.close()


def test_cases_migration_downgrades_and_upgrades_again(tmp_path, postgres_url):
    """0006 on a fresh SQLite file and a fresh PostgreSQL database: down to 0005 removes its tables and
    columns, up again restores them."""
    for url in (f"sqlite:///{tmp_path / 'm.db'}", postgres_url):
        upgrade_to_head(url)
        config = alembic_config(url)
        command.downgrade(config, "0005")
        engine = create_engine(url)
        tables = set(inspect(engine).get_table_names())
        columns = {c["name"] for c in inspect(engine).get_columns("reviews")}
        assert not {"cases", "case_reports"} & tables and not {"amends_review_id", "amend_reason"} & columns
        upgrade_to_head(url)
        tables = set(inspect(engine).get_table_names())
        columns = {c["name"] for c in inspect(engine).get_columns("reviews")}
        engine.dispose()
        assert {"cases", "case_reports"} <= tables and {"amends_review_id", "amend_reason"} <= columns
