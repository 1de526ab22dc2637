"""The LIS REST contract over real HTTP, on SQLite and PostgreSQL, with the bundled model."""

import hashlib

import numpy as np
import pytest
from sqlalchemy import text

from app.ml.classes import ABNORMAL_CLASSES, CLASS_NAMES


def submit(client, path, accession_id=None, headers=None):
    data = {"accession_id": accession_id} if accession_id else {}
    with open(path, "rb") as handle:
        return client.post(
            "/api/v1/predictions", files={"image": (path.name, handle, "image/bmp")}, data=data, headers=headers or {}
        )


def test_submit_returns_the_models_call(live_server, herlev_image, bundled_classifier):
    path = herlev_image("severe_dysplastic", 3)
    with live_server.client() as client:
        response = submit(client, path, accession_id="ACC-1001")
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/api/v1/predictions/{body['id']}"
    assert body["accession_id"] == "ACC-1001"
    assert set(body["probabilities"]) == set(CLASS_NAMES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert body["predicted_class"] == max(body["probabilities"], key=body["probabilities"].get)
    abnormal = sum(p for c, p in body["probabilities"].items() if c in ABNORMAL_CLASSES)
    assert body["abnormal_probability"] == pytest.approx(abnormal, abs=1e-6)
    assert body["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["model_version"] == bundled_classifier.version
    assert body["weights_sha256"] == bundled_classifier.weights_sha256
    assert body["created_at"].endswith(("+00:00", "Z"))
    assert body["reviews"] == [] and body["final_label"] is None
    assert "model" in body["notice"].lower()
    # The server's numbers are the classifier's own on the same bytes.
    direct = bundled_classifier.predict([path.read_bytes()])[0]
    got = np.array([body["probabilities"][c] for c in CLASS_NAMES])
    want = np.array([direct.probabilities[c] for c in CLASS_NAMES])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_get_and_list_with_pagination(live_server, herlev_image):
    with live_server.client() as client:
        ids = [
            submit(client, herlev_image("light_dysplastic", i), accession_id="ACC-LIST").json()["id"] for i in range(3)
        ]
        single = client.get(f"/api/v1/predictions/{ids[0]}")
        assert single.status_code == 200
        assert single.json()["id"] == ids[0] and single.json()["reviews"] == []
        page1 = client.get("/api/v1/predictions", params={"accession_id": "ACC-LIST", "limit": 2}).json()
        page2 = client.get("/api/v1/predictions", params={"accession_id": "ACC-LIST", "limit": 2, "offset": 2}).json()
    assert page1["total"] == 3 and page2["total"] == 3
    assert [p["id"] for p in page1["items"]] + [p["id"] for p in page2["items"]] == sorted(ids, reverse=True)
    assert all(p["accession_id"] == "ACC-LIST" for p in page1["items"])


def test_same_image_is_stored_once(live_server, herlev_image):
    path = herlev_image("normal_columnar", 5)
    with live_server.client() as client:
        first, second = submit(client, path).json(), submit(client, path).json()
    assert first["id"] != second["id"]
    assert first["image_sha256"] == second["image_sha256"]
    with live_server.context.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT COUNT(*) FROM images WHERE sha256 = :s"), {"s": first["image_sha256"]}
        ).scalar_one()
        stored = connection.execute(
            text("SELECT COUNT(*) FROM image_data JOIN images ON images.id = image_data.image_id WHERE sha256 = :s"),
            {"s": first["image_sha256"]},
        ).scalar_one()
    assert rows == 1 and stored == 1


def test_idempotency_key_returns_the_first_result(live_server, herlev_image):
    path = herlev_image("carcinoma_in_situ", 2)
    headers = {"Idempotency-Key": "lis-retry-42"}
    with live_server.client() as client:
        before = live_server.count("predictions")
        first = submit(client, path, "ACC-IDEM", headers)
        retry = submit(client, path, "ACC-IDEM", headers)
        other_image = submit(client, herlev_image("carcinoma_in_situ", 3), "ACC-IDEM", headers)
    assert first.status_code == 201 and retry.status_code == 201
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    assert live_server.count("predictions") == before + 1
    assert other_image.status_code == 409
    assert other_image.headers["content-type"].startswith("application/problem+json")


def test_reviews_never_change_the_prediction(live_server, herlev_image, sign_in):
    with live_server.client() as lis:
        created = submit(lis, herlev_image("moderate_dysplastic", 1), "ACC-REV").json()
    browser, csrf = sign_in(live_server, "pathologist")
    other = next(c for c in CLASS_NAMES if c != created["predicted_class"])
    try:
        confirm = browser.post(
            f"/api/v1/predictions/{created['id']}/reviews", json={"action": "confirm"}, headers={"X-CSRF-Token": csrf}
        )
        override = browser.post(
            f"/api/v1/predictions/{created['id']}/reviews",
            json={"action": "override", "label": other, "comment": "nuclear features favour this", "reason": "re-read"},
            headers={"X-CSRF-Token": csrf},
        )
        no_csrf = browser.post(f"/api/v1/predictions/{created['id']}/reviews", json={"action": "confirm"})
    finally:
        browser.close()
    assert confirm.status_code == 201, confirm.text
    assert confirm.json()["label"] == created["predicted_class"]
    assert override.status_code == 201, override.text
    assert no_csrf.status_code == 403
    with live_server.client() as lis:
        after = lis.get(f"/api/v1/predictions/{created['id']}").json()
    assert after["predicted_class"] == created["predicted_class"]
    assert after["probabilities"] == created["probabilities"]
    assert [r["action"] for r in after["reviews"]] == ["confirm", "override"]
    assert after["reviews"][1]["reviewer"] == live_server.users["pathologist"]
    assert after["reviews"][1]["comment"] == "nuclear features favour this"
    assert after["reviews"][1]["amends_review_id"] == after["reviews"][0]["id"]
    assert after["reviews"][1]["amend_reason"] == "re-read"
    assert after["final_label"] == other


def test_reads_and_changes_are_audited_and_audit_is_append_only(live_server, herlev_image):
    with live_server.client() as client:
        created = submit(client, herlev_image("normal_intermediate", 0), "ACC-AUD").json()
        client.get(f"/api/v1/predictions/{created['id']}")
    with live_server.context.engine.connect() as connection:
        events = connection.execute(
            text("SELECT actor, action FROM audit_events WHERE entity_type='prediction' AND entity_id=:i ORDER BY id"),
            {"i": str(created["id"])},
        ).all()
    assert [tuple(e) for e in events] == [
        ("apikey:test-lis", "prediction.create"),
        ("apikey:test-lis", "prediction.read"),
    ]
    for statement in ("UPDATE audit_events SET actor = 'someone-else'", "DELETE FROM audit_events"):
        with live_server.context.engine.connect() as connection, pytest.raises(Exception, match="append-only"):
            connection.execute(text(statement))
            connection.commit()
    assert live_server.count("audit_events") >= 2


def test_health_needs_no_auth_but_everything_else_does(live_server):
    with live_server.anonymous() as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz").json()
        assert ready["status"] == "ready" and ready["model_version"]
        for method, path in [
            ("GET", "/api/v1/predictions"),
            ("GET", "/api/v1/predictions/1"),
            ("GET", "/api/v1/predictions/1/image"),
            ("POST", "/api/v1/predictions"),
        ]:
            response = anonymous.request(method, path)
            assert response.status_code == 401, (method, path)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["detail"]
        assert anonymous.get("/", follow_redirects=False).status_code == 303
        assert anonymous.get("/docs").status_code == 200
