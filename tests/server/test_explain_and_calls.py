"""Grad-CAM heatmaps over HTTP, and the lab's abnormal cut-off and uncertainty band in results."""

import io

import numpy as np
from PIL import Image


def submit(client, path):
    return client.post("/api/v1/predictions", files={"image": (path.name, path.read_bytes(), "image/bmp")}).json()


def test_heatmap_png_fits_the_image_and_depends_on_it(live_server, herlev_image):
    paths = [herlev_image("carcinoma_in_situ", 5), herlev_image("normal_intermediate", 5)]
    with live_server.client() as client:
        created = [submit(client, p) for p in paths]
        maps = []
        for path, prediction in zip(paths, created, strict=True):
            response = client.get(f"/api/v1/predictions/{prediction['id']}/heatmap")
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            png = Image.open(io.BytesIO(response.content))
            assert png.size == Image.open(path).size
            maps.append(np.asarray(png.resize((64, 64)), dtype=float))
            again = client.get(f"/api/v1/predictions/{prediction['id']}/heatmap")
            assert again.content == response.content  # cached, identical
        other_class = client.get(f"/api/v1/predictions/{created[0]['id']}/heatmap", params={"class": "normal_columnar"})
        bad_class = client.get(f"/api/v1/predictions/{created[0]['id']}/heatmap", params={"class": "koilocyte"})
        unknown = client.get("/api/v1/predictions/987654/heatmap")
    assert maps[0].std() > 0 and not np.allclose(maps[0], maps[1])
    assert other_class.status_code == 200
    assert bad_class.status_code == 422 and "class must be one of" in bad_class.json()["detail"]
    assert unknown.status_code == 404
    with live_server.anonymous() as anonymous:
        assert anonymous.get(f"/api/v1/predictions/{created[0]['id']}/heatmap").status_code == 401


def test_calls_follow_the_threshold_and_band(live_server, herlev_image):
    policy = live_server.context.policy
    assert policy.abnormal_threshold == live_server.context.classifier.abnormal_threshold
    with live_server.client() as client:
        results = [
            submit(client, herlev_image(c, 9)) for c in ("normal_superficiel", "light_dysplastic", "severe_dysplastic")
        ]
    for r in results:
        p = r["abnormal_probability"]
        assert r["abnormal_threshold"] == policy.abnormal_threshold
        assert r["abnormal_call"] == ("abnormal" if p >= policy.abnormal_threshold else "normal")
        near_cutoff = abs(p - policy.abnormal_threshold) <= policy.uncertainty_band
        assert r["needs_review"] == bool(r["review_reasons"])
        assert near_cutoff == any(reason.startswith("near the cut-off") for reason in r["review_reasons"])
