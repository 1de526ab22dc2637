"""Safety monitoring over real HTTP on SQLite and PostgreSQL (a fresh server per database): sensitivity and
specificity of the call at the cut-off against the final labels, missed abnormal cells, QC-sample
outcomes and agreement per reviewer, checked against counts made here from the API's own calls."""

from tests.server.test_batches import wait_until_done

SINGLE = [("carcinoma_in_situ", 7), ("severe_dysplastic", 7), ("normal_superficiel", 7), ("normal_intermediate", 7)]
BATCH = [("normal_superficiel", 8), ("normal_intermediate", 8), ("normal_superficiel", 9), ("normal_intermediate", 9)]


def test_safety_numbers(live_server, herlev_image, sign_in):
    with live_server.client() as api:
        calls = {}
        for name, index in SINGLE:
            image = herlev_image(name, index)
            body = api.post("/api/v1/predictions", files={"image": (image.name, image.read_bytes())}).json()
            calls[body["id"]] = body
        files = [("image", (herlev_image(n, i).name, herlev_image(n, i).read_bytes())) for n, i in BATCH]
        batch_id = api.post("/api/v1/batches", files=files, data={"accession_id": "S26-SAFE"}).json()["id"]
        wait_until_done(api, batch_id)
        items = api.get(f"/api/v1/batches/{batch_id}/items").json()["items"]
    qc_items = [i for i in items if i["qc_sample"]]
    assert qc_items, "the test server samples half of the confident normal calls"

    cyto, cyto_csrf = sign_in(live_server, "cytotechnologist")
    patho, patho_csrf = sign_in(live_server, "pathologist")

    def review(client, csrf, p: dict, label: str, reason: str | None = None) -> None:
        action = "confirm" if label == p["predicted_class"] else "override"
        response = client.post(
            f"/api/v1/predictions/{p['id']}/reviews",
            json={"action": action, "label": label, "reason": reason},
            headers={"X-CSRF-Token": csrf},
        )
        assert response.status_code == 201, response.text

    # Alternate the truth so every cell of the confusion table is fed whatever the model calls.
    truth = {}
    for n, (pid, p) in enumerate(calls.items()):
        truth[pid] = "carcinoma_in_situ" if n % 2 == 0 else "normal_intermediate"
        review(cyto, cyto_csrf, p, "normal_superficiel")
        review(patho, patho_csrf, p, truth[pid], reason="second opinion")  # amends the cytotechnologist's
    qc_found = qc_items[0]["prediction"]
    truth[qc_found["id"]] = "light_dysplastic"
    review(cyto, cyto_csrf, qc_found, "light_dysplastic")
    all_calls = {**calls, qc_found["id"]: qc_found}

    report = patho.get("/api/v1/monitoring").json()
    page = patho.get("/dashboard").text
    refused = cyto.get("/api/v1/monitoring")
    cyto.close()
    patho.close()

    called = {pid: p["abnormal_call"] == "abnormal" for pid, p in all_calls.items()}
    actual = {pid: label != "normal_intermediate" for pid, label in truth.items()}
    tp = sum(called[p] and actual[p] for p in truth)
    fn = sum(not called[p] and actual[p] for p in truth)
    tn = sum(not called[p] and not actual[p] for p in truth)
    fp = sum(called[p] and not actual[p] for p in truth)
    safety = report["safety"]
    assert (safety["true_positive"], safety["false_negative"], safety["true_negative"], safety["false_positive"]) == (
        tp,
        fn,
        tn,
        fp,
    )
    assert safety["reviewed"] == len(truth) == 5
    assert safety["sensitivity"] == (tp / (tp + fn) if tp + fn else None)
    assert safety["specificity"] == (tn / (tn + fp) if tn + fp else None)
    assert {m["prediction_id"] for m in safety["missed"]} == {p for p in truth if actual[p] and not called[p]}
    assert qc_found["id"] in {m["prediction_id"] for m in safety["missed"]}  # a QC cell is a confident normal call
    missed = next(m for m in safety["missed"] if m["prediction_id"] == qc_found["id"])
    assert missed["accession_id"] == "S26-SAFE" and missed["final_label"] == "light_dysplastic"
    assert safety["qc"]["sampled"] == len(qc_items) and safety["qc"]["reviewed"] == 1
    assert safety["qc"]["found_abnormal"] == 1 and safety["qc"]["found_abnormal_ids"] == [qc_found["id"]]

    reviewers = {r["reviewer"]: r for r in safety["reviewers"]}
    cyto_name, patho_name = live_server.users["cytotechnologist"], live_server.users["pathologist"]
    assert reviewers[cyto_name]["reviews"] == 5 and reviewers[cyto_name]["amended_later"] == 4
    assert reviewers[cyto_name]["agreed"] == sum(
        p["predicted_class"] == "normal_superficiel" for p in calls.values()
    ) + (qc_found["predicted_class"] == "light_dysplastic")
    assert reviewers[patho_name]["reviews"] == 4 and reviewers[patho_name]["amended_later"] == 0
    assert reviewers[patho_name]["agreed"] == sum(p["predicted_class"] == truth[pid] for pid, p in calls.items())

    assert 'id="safety"' in page and 'id="missed-cells"' in page and f'data-prediction="{qc_found["id"]}"' in page
    assert refused.status_code == 403
