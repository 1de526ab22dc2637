"""Bad input: a clear 4xx problem+json, nothing stored, and the server stays healthy."""

import io
import struct
import zlib

import pytest
from PIL import Image


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims an absurd size, with a tiny body (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def encoded(fmt: str, size=(120, 100)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (180, 120, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.fixture
def unchanged(live_server):
    """Asserts after the test that no prediction, image row or image file was added."""
    before = (live_server.count("predictions"), live_server.count("images"), live_server.stored_files())
    yield
    after = (live_server.count("predictions"), live_server.count("images"), live_server.stored_files())
    assert after == before, "a refused request stored something"
    with live_server.anonymous() as client:
        assert client.get("/readyz").status_code == 200


def assert_problem(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert words in body["detail"].lower(), body["detail"]


BAD_FILES = {
    "not an image": (b"MSH|^~\\&|LIS|LAB|this is an HL7 message, not an image", 422, "not an image"),
    "empty file": (b"", 422, "empty"),
    "truncated png": (truncated(encoded("PNG", (300, 300))), 422, "truncated"),
    "truncated jpeg": (truncated(encoded("JPEG", (300, 300))), 422, "truncated"),
    "gif is not accepted": (encoded("GIF"), 422, "not accepted"),
    "decompression bomb": (png_claiming(60_000, 60_000), 422, "pixels"),
    "over the byte limit": (encoded("BMP", (900, 900)), 413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_image_files_are_refused(live_server, unchanged, case):
    data, status, words = BAD_FILES[case]
    with live_server.client() as client:
        response = client.post("/api/v1/predictions", files={"image": ("cell.png", data, "image/png")})
    assert_problem(response, status, words)


def test_truncated_herlev_bmp_is_refused(live_server, unchanged, herlev_image):
    data = truncated(herlev_image("light_dysplastic", 0).read_bytes())
    with live_server.client() as client:
        response = client.post("/api/v1/predictions", files={"image": ("cell.bmp", data, "image/bmp")})
    assert_problem(response, 422, "truncated")


def test_missing_and_wrong_fields(live_server, unchanged, herlev_image):
    with live_server.client() as client:
        missing = client.post("/api/v1/predictions", data={"accession_id": "ACC-1"})
        wrong_name = client.post("/api/v1/predictions", files={"picture": ("c.bmp", b"xx", "image/bmp")})
        bad_accession = client.post(
            "/api/v1/predictions",
            files={"image": ("c.bmp", herlev_image("light_dysplastic", 1).read_bytes(), "image/bmp")},
            data={"accession_id": "<script>alert(1)</script>"},
        )
    assert_problem(missing, 422, "image")
    assert_problem(wrong_name, 422, "image")
    assert_problem(bad_accession, 422, "accession_id")


def test_unknown_ids(live_server):
    with live_server.client() as client:
        assert_problem(client.get("/api/v1/predictions/987654"), 404, "does not exist")
        assert_problem(client.get("/api/v1/predictions/987654/image"), 404, "does not exist")
        assert_problem(client.get("/api/v1/predictions/not-a-number"), 422, "prediction_id")


def test_wrong_and_revoked_keys(live_server, unchanged):
    from app.services import accounts
    from app.services.actors import SYSTEM

    with live_server.context.sessions() as session:
        _, key = accounts.create_api_client(session, SYSTEM, "soon-revoked")
        session.commit()
    with live_server.client(key) as client:
        assert client.get("/api/v1/predictions").status_code == 200
    with live_server.context.sessions() as session:
        accounts.revoke_api_client(session, SYSTEM, "soon-revoked")
        session.commit()
    with live_server.client(key) as client:
        assert_problem(client.get("/api/v1/predictions"), 401, "revoked")
    with live_server.client("pcad_000000000000_guessed") as client:
        assert_problem(client.get("/api/v1/predictions"), 401, "not valid")
    with live_server.anonymous() as client:
        response = client.get("/api/v1/predictions", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert_problem(response, 401, "bearer")


def test_reviews_by_roles_that_may_not_review(live_server, herlev_image, sign_in):
    with live_server.client() as lis:
        created = lis.post(
            "/api/v1/predictions", files={"image": ("c.bmp", herlev_image("normal_superficiel", 2).read_bytes())}
        ).json()
        by_lis = lis.post(f"/api/v1/predictions/{created['id']}/reviews", json={"action": "confirm"})
    admin, csrf = sign_in(live_server, "admin")
    by_admin = admin.post(
        f"/api/v1/predictions/{created['id']}/reviews", json={"action": "confirm"}, headers={"X-CSRF-Token": csrf}
    )
    admin.close()
    assert_problem(by_lis, 403, "pathologists and cytotechnologists")
    assert_problem(by_admin, 403, "pathologists and cytotechnologists")
    with live_server.client() as lis:
        assert lis.get(f"/api/v1/predictions/{created['id']}").json()["reviews"] == []


def test_bad_review_bodies(live_server, herlev_image, sign_in):
    with live_server.client() as lis:
        created = lis.post(
            "/api/v1/predictions", files={"image": ("c.bmp", herlev_image("normal_superficiel", 3).read_bytes())}
        ).json()
    client, csrf = sign_in(live_server, "cytotechnologist")
    url = f"/api/v1/predictions/{created['id']}/reviews"
    headers = {"X-CSRF-Token": csrf}
    try:
        assert_problem(
            client.post(url, json={"action": "override", "label": "koilocyte"}, headers=headers), 422, "label"
        )
        assert_problem(client.post(url, json={"action": "override"}, headers=headers), 422, "label")
        assert_problem(client.post(url, json={"action": "delete"}, headers=headers), 422, "action")
        assert_problem(client.post(url, json={"action": "confirm", "labl": "x"}, headers=headers), 422, "labl")
        assert_problem(
            client.post(url, json={"action": "override", "label": created["predicted_class"]}, headers=headers),
            422,
            "confirm",
        )
        assert_problem(
            client.post("/api/v1/predictions/987654/reviews", json={"action": "confirm"}, headers=headers),
            404,
            "does not exist",
        )
    finally:
        client.close()
    with live_server.client() as lis:
        assert lis.get(f"/api/v1/predictions/{created['id']}").json()["reviews"] == []
