"""Non-cells over real HTTP (SQLite and PostgreSQL): refused, or sent to review with a reason wherever shown."""

import json
import time
from types import SimpleNamespace

import pytest
from alembic import command
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import create_engine, inspect

from app.db.migrate import alembic_config, upgrade_to_head
from app.services import fhir
from app.services.calls import CallPolicy
from app.services.predictions import get_prediction

OOD_COLUMNS = {"in_distribution", "ood_score", "input_flags"}


# Upload names of the conftest's non-cell images.
FILES = {
    "noise.png": "random noise",
    "flat.png": "flat grey square",
    "dot.png": "1x1 image",
    "gradient16.png": "16-bit gradient",
}


def named_non_cells(non_cell_images: dict[str, bytes]) -> dict[str, bytes]:
    return {file: non_cell_images[name] for file, name in FILES.items()}


def post(client, name: str, data: bytes):
    return client.post("/api/v1/predictions", files={"image": (name, data, "application/octet-stream")})


@pytest.fixture(scope="module")
def posted(live_server, non_cell_images) -> dict[str, dict]:
    """Each named non-cell posted once: name -> response JSON (with its status code)."""
    results = {}
    with live_server.client() as client:
        for name, data in named_non_cells(non_cell_images).items():
            response = post(client, name, data)
            # Each decodes as an image: it is stored and called, and flagged for review (never refused).
            assert response.status_code == 201, response.text
            results[name] = {"status": response.status_code, **response.json()}
    return results


def test_named_non_cells_are_stored_and_need_review_with_a_reason(posted):
    for name, body in posted.items():
        assert body["needs_review"] is True, name
        assert body["review_reasons"], name
        assert body["in_distribution"] is False or body["input_flags"], name
        assert all(flag in body["review_reasons"] for flag in body["input_flags"])
    noise = posted["noise.png"]
    assert noise["status"] == 201 and noise["in_distribution"] is False and noise["ood_score"] > 1
    assert any(r.startswith("not a typical cell (OOD score") for r in noise["review_reasons"])
    assert posted["flat.png"]["status"] == 201
    assert any("nearly uniform" in f for f in posted["flat.png"]["input_flags"])


def test_a_herlev_cell_is_in_distribution_and_read_back_the_same(live_server, herlev_image):
    with live_server.client() as client:
        created = post(client, "cell.bmp", herlev_image("normal_intermediate", 3).read_bytes()).json()
        again = client.get(f"/api/v1/predictions/{created['id']}").json()
    assert created["in_distribution"] is True and 0 < created["ood_score"] <= 1
    assert created["input_flags"] == []
    assert not any(r.startswith("not a typical cell") for r in created["review_reasons"])
    assert created["needs_review"] == bool(created["review_reasons"])
    for key in ("in_distribution", "ood_score", "input_flags", "needs_review", "review_reasons"):
        assert again[key] == created[key]


def test_result_page_says_not_a_typical_cell(live_server, posted, sign_in):
    browser, _ = sign_in(live_server, "pathologist")
    page = browser.get(f"/predictions/{posted['noise.png']['id']}")
    browser.close()
    assert page.status_code == 200
    assert 'id="not-typical"' in page.text and "Not a typical cell." in page.text
    assert 'id="review-reasons"' in page.text and "not a typical cell (OOD score" in page.text


def wait_until_done(client, batch_id: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get(f"/api/v1/batches/{batch_id}").json()["status"] == "done":
            return
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} not done in {timeout} s")


def test_queue_filter_needs_review_is_the_same_rule_as_the_items(live_server, herlev_image, sign_in, non_cell_images):
    inputs = named_non_cells(non_cell_images)
    cells = [
        herlev_image(c, i) for c in ("normal_superficiel", "carcinoma_in_situ", "light_dysplastic") for i in (1, 2)
    ]
    files = [("image", (p.name, p.read_bytes(), "image/bmp")) for p in cells]
    files += [("image", (name, inputs[name], "image/png")) for name in ("noise.png", "gradient16.png")]
    with live_server.client() as client:
        batch = client.post("/api/v1/batches", files=files).json()
        wait_until_done(client, batch["id"])
        items = client.get(f"/api/v1/batches/{batch['id']}/items").json()["items"]
        flagged = client.get(f"/api/v1/batches/{batch['id']}/items", params={"needs_review": "true"}).json()["items"]
    by_name = {i["file_name"]: i for i in items}
    assert all(i["status"] == "classified" for i in items)
    assert {i["id"] for i in flagged} == {i["id"] for i in items if i["needs_review"]}
    for name in ("noise.png", "gradient16.png"):  # batch items go in as bytes: the checks see the 16-bit mode
        item = by_name[name]
        assert item["needs_review"] is True and item["review_reasons"] == item["prediction"]["review_reasons"]
        assert item["in_distribution"] is False or item["prediction"]["input_flags"]
    assert any("16-bit image" in r for r in by_name["gradient16.png"]["review_reasons"])
    assert by_name["noise.png"]["in_distribution"] is False
    browser, _ = sign_in(live_server, "cytotechnologist")
    queue = browser.get(f"/batches/{batch['id']}", params={"needs_review": "1"}).text
    review = browser.get(f"/queue/items/{by_name['noise.png']['id']}", params={"batch": batch["id"]}).text
    browser.close()
    assert "not a typical cell" in queue and "needs review</span>: " in queue
    assert queue.count('data-item="') == len(flagged)
    assert 'id="not-typical"' in review and 'id="review-reasons"' in review


def test_fhir_bundle_carries_the_ood_score_and_validates(live_server, posted):
    noise_id = posted["noise.png"]["id"]
    with live_server.client() as client:
        response = client.get(f"/api/v1/predictions/{noise_id}/fhir")
    assert response.status_code == 200
    bundle = Bundle.model_validate_json(response.text)
    assert fhir.reference_problems(bundle) == []
    observations = {
        e.resource.code.coding[0].code: e.resource
        for e in bundle.entry
        if e.resource.get_resource_type() == "Observation"
    }
    assert observations["ood_score"].valueQuantity.value > 1
    assert observations["typical_cell"].valueBoolean is False
    with live_server.context.sessions() as session:
        prediction = get_prediction(session, noise_id)
        text = fhir.to_validated_json(fhir.build_bundle(prediction, policy=live_server.context.policy))
    flagged = [
        e["resource"]
        for e in json.loads(text)["entry"]
        if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") == "needs_review"
    ]
    assert len(flagged) == 1 and flagged[0]["valueBoolean"] is True
    assert any(n["text"].startswith("not a typical cell") for n in flagged[0]["note"])


def row(predicted_class: str, p: float, in_distribution=True, ood_score=0.5, input_flags=None):
    return SimpleNamespace(
        predicted_class=predicted_class,
        abnormal_probability=p,
        in_distribution=in_distribution,
        ood_score=ood_score,
        input_flags=input_flags,
    )


def test_review_reasons_disagreement_near_cutoff_ood_and_flags():
    policy = CallPolicy(abnormal_threshold=0.77, uncertainty_band=0.1)
    assert policy.review_reasons(row("severe_dysplastic", 0.95)) == []
    assert policy.review_reasons(row("normal_intermediate", 0.05)) == []
    under = policy.review_reasons(row("severe_dysplastic", 0.40))
    assert under == ["top class Severe dysplasia but P(abnormal) 0.40 under the cut-off 0.77"]
    over = policy.review_reasons(row("normal_columnar", 0.90))
    assert over == ["top class Columnar (normal) but P(abnormal) 0.90 at or over the cut-off 0.77"]
    assert policy.review_reasons(row("normal_columnar", 0.77))[1].startswith("top class Columnar (normal) but")
    near = policy.review_reasons(row("light_dysplastic", 0.80))
    assert near == ["near the cut-off (P(abnormal) 0.80, cut-off 0.77 ± 0.10)"]
    assert len(policy.review_reasons(row("light_dysplastic", 0.70))) == 2  # near, and under the cut-off
    odd = policy.review_reasons(row("severe_dysplastic", 0.95, False, 3.25, ["too small (1x1 px)"]))
    assert odd == ["not a typical cell (OOD score 3.2; typical cells score at most 1)", "too small (1x1 px)"]
    assert policy.needs_review(row("severe_dysplastic", 0.95, None, None)) is False  # no OOD model: no OOD reason


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0005_adds_and_removes_the_columns(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade_to_head(url)
    config = alembic_config(url)
    engine = create_engine(url)

    def columns() -> set[str]:
        with engine.connect() as connection:
            return {c["name"] for c in inspect(connection).get_columns("predictions")}

    assert OOD_COLUMNS <= columns()
    command.downgrade(config, "0004")
    assert not OOD_COLUMNS & columns()
    command.upgrade(config, "head")
    assert OOD_COLUMNS <= columns()
    engine.dispose()
