"""Batch triage over real HTTP: intake (files and zip), background classification, ranked queue, CSV."""

import csv
import io
import time
import zipfile

import pytest

from app.config import Settings
from app.ml.classes import CLASS_NAMES
from app.services.calls import uncertainty_at
from app.services.work_queue import _in_qc_sample

CLASSES = ["normal_superficiel", "normal_columnar", "light_dysplastic", "severe_dysplastic", "carcinoma_in_situ"]


def wait_until_done(client, batch_id: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/batches/{batch_id}").json()
        if body["status"] == "done":
            return body
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} not done in {timeout} s: {body}")


def zipped(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_batch_of_files_is_classified_and_ranked(live_server, herlev_image):
    paths = [herlev_image(c, i) for c in CLASSES for i in range(2)]
    files = [("image", (p.name, p.read_bytes(), "image/bmp")) for p in paths]
    files.append(("image", ("notes.txt", b"not an image at all", "text/plain")))
    with live_server.client() as client:
        submitted = client.post("/api/v1/batches", files=files, data={"accession_id": "S26-0042", "name": "slide 42"})
        assert submitted.status_code == 202, submitted.text
        batch = submitted.json()
        assert submitted.headers["location"] == f"/api/v1/batches/{batch['id']}"
        assert batch["counts"]["total"] == len(paths) + 1 and batch["counts"]["failed"] == 1
        done = wait_until_done(client, batch["id"])
        assert done["counts"] == {
            "total": len(paths) + 1, "queued": 0, "processing": 0, "classified": len(paths), "failed": 1, "reviewed": 0,
        }  # fmt: skip
        assert done["progress"] == 1.0
        ranked = client.get(f"/api/v1/batches/{batch['id']}/items", params={"order": "suspicion"}).json()
        by_uncertainty = client.get(f"/api/v1/batches/{batch['id']}/items", params={"order": "uncertainty"}).json()
        high = client.get(f"/api/v1/batches/{batch['id']}/items", params={"min_abnormal": 0.5}).json()
    items = ranked["items"]
    assert ranked["total"] == len(paths) + 1
    classified = [i for i in items if i["status"] == "classified"]
    p_abnormal = [i["prediction"]["abnormal_probability"] for i in classified]
    assert p_abnormal == sorted(p_abnormal, reverse=True)
    assert items[-1]["status"] == "failed" and "not an image" in items[-1]["error"]
    assert {i["file_name"] for i in classified} == {p.name for p in paths}
    assert all(
        i["prediction"]["source"] == "batch" and i["prediction"]["accession_id"] == "S26-0042" for i in classified
    )
    by_doubt = [i for i in by_uncertainty["items"] if i["status"] == "classified"]
    uncertainties = [i["uncertainty"] for i in by_doubt]
    assert uncertainties == sorted(uncertainties, reverse=True)
    for item in by_doubt:  # measured from the model's own cut-off (about 0.74), not from 0.5
        p, cut = item["prediction"]["abnormal_probability"], item["prediction"]["abnormal_threshold"]
        assert cut != 0.5 and item["uncertainty"] == pytest.approx(uncertainty_at(p, cut))
    assert all(i["prediction"]["abnormal_probability"] >= 0.5 for i in high["items"])
    assert len(high["items"]) == sum(p >= 0.5 for p in p_abnormal)


def test_zip_batch_and_csv_export(live_server, herlev_image, sign_in):
    paths = [herlev_image(c, 3) for c in CLASSES]
    archive = zipped({f"slide/{p.name}": p.read_bytes() for p in paths} | {"__MACOSX/._junk": b"x"})
    with live_server.client() as client:
        submitted = client.post("/api/v1/batches", files={"archive": ("slide.zip", archive, "application/zip")})
        assert submitted.status_code == 202, submitted.text
        batch_id = submitted.json()["id"]
        wait_until_done(client, batch_id)
        items = client.get(f"/api/v1/batches/{batch_id}/items").json()["items"]
    assert len(items) == len(paths)
    reviewer, csrf = sign_in(live_server, "pathologist")
    target = items[0]["prediction"]
    other = next(c for c in CLASS_NAMES if c != target["predicted_class"])
    try:
        review = reviewer.post(
            f"/api/v1/predictions/{target['id']}/reviews",
            json={"action": "override", "label": other},
            headers={"X-CSRF-Token": csrf},
        )
        assert review.status_code == 201
    finally:
        reviewer.close()
    with live_server.client() as client:
        status = client.get(f"/api/v1/batches/{batch_id}").json()
        unreviewed = client.get(f"/api/v1/batches/{batch_id}/items", params={"unreviewed": True}).json()
        export = client.get(f"/api/v1/batches/{batch_id}/export.csv")
    assert status["counts"]["reviewed"] == 1
    assert unreviewed["total"] == len(paths) - 1
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [r["file_name"] for r in rows] == [p.name for p in paths]
    reviewed = next(r for r in rows if r["prediction_id"] == str(target["id"]))
    assert reviewed["review_action"] == "override" and reviewed["final_label"] == other
    assert reviewed["reviewer"] == live_server.users["pathologist"] and reviewed["reviewed_at"]
    for row in rows:
        probs = [float(row[f"p_{c}"]) for c in CLASS_NAMES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted_class"] in CLASS_NAMES and row["model_version"]


def _unchanged(live_server):
    return live_server.count("batches"), live_server.count("batch_items"), live_server.count("images")


@pytest.mark.parametrize(
    "entries, words",
    [
        ({"../../etc/evil.bmp": b"BM.."}, "unsafe path"),
        ({"/abs/evil.bmp": b"BM.."}, "unsafe path"),
        ({"inner.zip": zipped({"a.bmp": b"BM"})}, "another archive"),
        ({"disguised.bmp": zipped({"a.bmp": b"BM"})}, "another archive"),
        ({"zeros.bmp": b"\0" * 31_000_000}, "expands to more than"),
        ({}, "no files"),
    ],
    ids=["traversal", "absolute", "nested", "nested-disguised", "too-large-expanded", "empty"],
)
def test_unsafe_archives_are_refused_whole(live_server, herlev_image, entries, words):
    good = herlev_image("light_dysplastic", 7)
    archive = zipped({good.name: good.read_bytes(), **entries}) if entries else zipped({})
    before = _unchanged(live_server)
    files_before = live_server.stored_files()
    with live_server.client() as client:
        response = client.post("/api/v1/batches", files={"archive": ("a.zip", archive, "application/zip")})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert words in response.json()["detail"]
    assert _unchanged(live_server) == before and live_server.stored_files() == files_before


def test_bad_batch_requests(live_server, herlev_image):
    image = herlev_image("light_dysplastic", 8)
    with live_server.client() as client:
        neither = client.post("/api/v1/batches", data={"name": "x"})
        both = client.post(
            "/api/v1/batches",
            files=[("image", (image.name, image.read_bytes())), ("archive", ("a.zip", zipped({"a": b"1"})))],
        )
        not_zip = client.post("/api/v1/batches", files={"archive": ("a.zip", b"plain text", "application/zip")})
        existing = client.post("/api/v1/batches", files={"image": (image.name, image.read_bytes())})
        assert existing.status_code == 202, existing.text
        batch_id = existing.json()["id"]
        # A well-formed id of no batch is 404, on every batch route; a malformed id is 422, whether or not
        # a batch has that number; a malformed query on a batch that exists is 422.
        unknown = {path: client.get(f"/api/v1/batches/987654{path}") for path in ("", "/items", "/export.csv")}
        malformed_ids = {raw: client.get(f"/api/v1/batches/{raw}/items") for raw in ("abc", "0", "-1", str(2**31))}
        bad_queries = {
            name: client.get(f"/api/v1/batches/{batch_id}/items", params=params)
            for name, params in {
                "order": {"order": "random"},
                "class": {"class": "no_such_class"},
                "min_abnormal": {"min_abnormal": 1.5},
                "limit": {"limit": 0},
            }.items()
        }
        good_query = client.get(f"/api/v1/batches/{batch_id}/items", params={"order": "position"})
    assert neither.status_code == 422 and "either" in neither.json()["detail"]
    assert both.status_code == 422 and "either" in both.json()["detail"]
    assert not_zip.status_code == 422 and "not a valid zip" in not_zip.json()["detail"]
    for response in [*unknown.values(), *malformed_ids.values(), *bad_queries.values()]:
        assert response.headers["content-type"].startswith("application/problem+json"), response.text
    assert {path: r.status_code for path, r in unknown.items()} == {"": 404, "/items": 404, "/export.csv": 404}
    assert {raw: r.status_code for raw, r in malformed_ids.items()} == dict.fromkeys(malformed_ids, 422)
    assert {name: r.status_code for name, r in bad_queries.items()} == dict.fromkeys(bad_queries, 422)
    assert good_query.status_code == 200 and good_query.json()["total"] == 1
    with live_server.anonymous() as anonymous:
        assert anonymous.post("/api/v1/batches", files={"image": (image.name, image.read_bytes())}).status_code == 401


def test_qc_sample_takes_a_fixed_share_of_confident_normal_calls():
    settings = Settings(qc_share=0.25, qc_max_abnormal_probability=0.1)
    drawn = [_in_qc_sample(item_id, 0.02, settings) for item_id in range(4000)]
    assert 0.22 < sum(drawn) / len(drawn) < 0.28
    assert drawn == [_in_qc_sample(item_id, 0.02, settings) for item_id in range(4000)]  # reproducible
    assert not any(_in_qc_sample(item_id, 0.3, settings) for item_id in range(1000))  # not confident normal
    assert not any(_in_qc_sample(i, 0.0, Settings(qc_share=0.0)) for i in range(1000))
