"""Request limits and hostile input over real HTTP, on SQLite and PostgreSQL.

A server with small caps: body limits enforced while the body streams (before parsing or
authentication), anonymous uploads refused before their body is read, batches of more than
Starlette's default 1,000 files, zip archives read one capped member at a time (bombs, damaged
data, lying headers: 4xx and nothing stored), ids and offsets past what the databases hold,
control characters in names, CSV formula injection, EXIF orientation and bounded heatmaps.
"""

import csv
import http.client
import io
import select
import socket
import struct
import tracemalloc
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from sqlalchemy import text

from app.config import Settings
from app.context import AppContext
from app.http.limits import MULTIPART_OVERHEAD
from app.main import create_app
from app.services import accounts
from app.services.actors import SYSTEM
from app.services.batches import files_from_zip
from tests.server.conftest import PASSWORD, serving

MAX_UPLOAD = 300_000
MAX_BATCH_UPLOAD = 4_000_000
MAX_EXPANDED = 3_000_000
MAX_REQUEST = 64 * 1024
MAX_ITEMS = 1100


@dataclass
class TightServer:
    url: str
    context: AppContext
    api_key: str
    users: dict[str, str] = field(default_factory=dict)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=120)

    def anonymous(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def count(self, table: str) -> int:
        with self.context.engine.connect() as connection:
            return connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()

    def stored(self) -> tuple[int, int, int]:
        return self.count("batches"), self.count("batch_items"), self.count("images")


@pytest.fixture(scope="module")
def server(database_url, bundled_classifier, tmp_path_factory) -> Iterator[TightServer]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("tight"),
        database_url=database_url,
        max_upload_bytes=MAX_UPLOAD,
        max_batch_upload_bytes=MAX_BATCH_UPLOAD,
        max_archive_expanded_bytes=MAX_EXPANDED,
        max_request_bytes=MAX_REQUEST,
        max_batch_items=MAX_ITEMS,
        embedded_worker=False,
    )
    app = create_app(settings, classifier=bundled_classifier)
    with serving(app) as url:
        context: AppContext = app.state.context
        with context.sessions() as session:
            _, key = accounts.create_api_client(session, SYSTEM, "tight-lis")
            users = {"pathologist": "tight-pathologist", "admin": "tight-admin"}
            for role, username in users.items():
                accounts.create_user(session, SYSTEM, username, PASSWORD, role)
            session.commit()
        yield TightServer(url, context, key, users)


def assert_problem(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    assert words in response.json()["detail"], response.json()


def bmp(size=(40, 30), colour=(180, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="BMP")
    return buffer.getvalue()


# ---------------------------------------------------------------- streamed body limits (raw sockets)


@dataclass
class RawResult:
    status: int
    headers: dict[str, str]
    body: bytes
    body_bytes_sent: int


def raw_post(
    server: TightServer, path: str, headers: dict[str, str], chunks: Iterable[bytes] = (), chunked: bool = False
) -> RawResult:
    """POST over a plain socket, sending body chunks only while the server has not answered yet."""
    address = urlsplit(server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=30)
    with sock:
        head = [f"POST {path} HTTP/1.1", f"Host: {address.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
        if chunked:
            head.append("Transfer-Encoding: chunked")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered
            data = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return RawResult(response.status, dict(response.getheaders()), response.read(), sent)


BOUNDARY = "papcad-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart body written by hand, so file names go out byte for byte (httpx escapes control characters)."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def zero_chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A well-formed start of a file part, then zeros: the parser is happy until the limit stops it."""
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="c.bmp"\r\n\r\n'.encode()
    for _ in range(total // size):
        yield b"\0" * size


def test_declared_length_over_the_limit_is_refused_before_the_body(server):
    """Content-Length of 1 GB, no body sent at all: the 413 comes at once."""
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": MULTIPART}
    for path, limit in (
        ("/api/v1/predictions", MAX_UPLOAD + MULTIPART_OVERHEAD),
        ("/api/v1/batches", MAX_BATCH_UPLOAD),
    ):
        result = raw_post(server, path, headers | {"Content-Length": str(10**9)})
        assert result.status == 413 and result.body_bytes_sent == 0
        assert result.headers["content-type"].startswith("application/problem+json")
        assert f"limit of {limit:,} bytes" in result.body.decode()
    review = raw_post(server, "/api/v1/predictions/1/reviews", headers | {"Content-Length": str(MAX_REQUEST + 1)})
    assert review.status == 413


def test_chunked_upload_is_stopped_soon_after_the_limit(server):
    """No Content-Length: the server counts the streamed bytes and answers 413 long before 40 MB are sent."""
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": MULTIPART}
    planned = 40_000_000
    result = raw_post(server, "/api/v1/predictions", headers, zero_chunks(planned), chunked=True)
    assert result.status == 413, result.body
    assert b"over the limit" in result.body
    assert result.body_bytes_sent < planned / 2, f"sent {result.body_bytes_sent:,} bytes before the 413"


def test_anonymous_upload_gets_401_before_its_body_is_read(server):
    """Neither an Authorization header nor a session cookie: refused before a byte of the body."""
    form = {"Content-Type": MULTIPART}
    api = raw_post(server, "/api/v1/batches", form | {"Content-Length": "1000"})
    assert api.status == 401 and api.body_bytes_sent == 0
    assert api.headers["www-authenticate"].startswith("Bearer")
    streamed = raw_post(server, "/api/v1/predictions", form, zero_chunks(40_000_000), chunked=True)
    assert streamed.status == 401 and streamed.body_bytes_sent < 20_000_000
    page = raw_post(server, "/batches", form | {"Content-Length": "1000"})
    assert page.status == 303 and page.headers["location"].startswith("/login")
    with server.anonymous() as anonymous:  # and a small one the ordinary way
        response = anonymous.post("/api/v1/predictions", files={"image": ("c.bmp", bmp(), "image/bmp")})
    assert_problem(response, 401, "authentication")


def test_over_size_bodies_are_413_through_an_ordinary_client(server):
    big = b"\0" * (MAX_UPLOAD + 100_000)
    small_json = {"action": "confirm", "comment": "x" * (MAX_REQUEST + 10)}
    with server.client() as client:
        image = client.post("/api/v1/predictions", files={"image": ("c.bmp", big, "image/bmp")})
        review = client.post("/api/v1/predictions/1/reviews", json=small_json)
        generated = client.post(
            "/api/v1/batches",
            content=zero_chunks(MAX_BATCH_UPLOAD + 1_000_000),
            headers={"Content-Type": MULTIPART},
        )
    assert_problem(image, 413, "over the limit")
    assert_problem(review, 413, "over the limit")
    assert_problem(generated, 413, "over the limit")


# ---------------------------------------------------------------- more than 1,000 files


def test_batch_of_more_than_1000_files_is_accepted_and_the_cap_holds(server, sign_in):
    junk = [("image", (f"note-{i}.txt", b"not an image", "text/plain")) for i in range(1050)]
    with server.client() as client:
        accepted = client.post("/api/v1/batches", files=junk)
        refused = client.post("/api/v1/batches", files=junk + junk[: MAX_ITEMS + 2 - 1050])
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["counts"]["total"] == 1050 and accepted.json()["counts"]["failed"] == 1050
    assert_problem(refused, 422, f"at most {MAX_ITEMS}")
    browser, csrf = sign_in(server, "pathologist")
    page = browser.post(
        "/batches", files=[("images", f) for _, f in junk[:1020]], data={"csrf": csrf, "name": "page batch"}
    )
    browser.close()
    assert page.status_code == 303, page.text[:500]
    batch_id = int(page.headers["location"].rsplit("/", 1)[1])
    with server.client() as client:
        assert client.get(f"/api/v1/batches/{batch_id}").json()["counts"]["total"] == 1020


# ---------------------------------------------------------------- zip archives


def zipped(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _patch_member(archive: bytes, **fields) -> bytes:
    """Rewrite fields of the first member's local and central headers: crc, size (uncompressed), flags, method."""
    data = bytearray(archive)
    local, central = 0, data.find(b"PK\x01\x02")
    offsets = {"flags": (6, 8), "method": (8, 10), "crc": (14, 16), "size": (22, 24)}
    formats = {"flags": "<H", "method": "<H", "crc": "<I", "size": "<I"}
    for name, value in fields.items():
        local_at, central_at = offsets[name]
        struct.pack_into(formats[name], data, local + local_at, value)
        struct.pack_into(formats[name], data, central + central_at, value)
    return bytes(data)


def corrupted_deflate() -> bytes:
    archive = bytearray(zipped({"cell.bmp": bmp((200, 200), (10, 200, 30)) + bytes(range(256)) * 50}))
    start = 30 + len("cell.bmp")
    archive[start : start + 40] = b"\xff" * 40  # garbage where the deflate stream begins
    return bytes(archive)


DAMAGED = {
    "corrupted deflate data": corrupted_deflate(),
    "bad crc": _patch_member(zipped({"cell.bmp": bmp()}), crc=0xDEADBEEF),
    "size header smaller than the data": _patch_member(zipped({"cell.bmp": bmp()}), size=100),
    "size header larger than the data": _patch_member(zipped({"cell.bmp": bmp()}), size=len(bmp()) + 5000),
    "encrypted": _patch_member(zipped({"cell.bmp": bmp()}), flags=0x1),
    "unsupported compression": _patch_member(zipped({"cell.bmp": bmp()}), method=99),
    "truncated archive": zipped({"cell.bmp": bmp()})[:-30],
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_archives_are_422_and_store_nothing(server, case):
    good = zipped({"good.bmp": bmp(colour=(1, 2, 3))})
    # The damaged member comes after a good one, so refusing it must undo the good one too.
    damaged = DAMAGED[case]
    combined = _prepend(good, damaged)
    before = server.stored()
    with server.client() as client:
        response = client.post("/api/v1/batches", files={"archive": ("a.zip", combined, "application/zip")})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    # Without its end record the file is no zip at all; every other damage is in a member of a valid zip.
    assert ("not a valid zip" if case == "truncated archive" else "the archive is refused") in detail, detail
    assert server.stored() == before


def _prepend(good: bytes, damaged: bytes) -> bytes:
    """One archive: the good member, then the damaged archive's member(s), byte for byte."""
    if not damaged.startswith(b"PK\x03\x04") or b"PK\x05\x06" not in damaged:
        return damaged  # not a well-formed container: send it as it is
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("good.bmp", zipfile.ZipFile(io.BytesIO(good)).read("good.bmp"))
    head = buffer.getvalue()
    head_central = head.find(b"PK\x01\x02")
    head_end = head.find(b"PK\x05\x06")
    tail_central = damaged.find(b"PK\x01\x02")
    tail_end = damaged.find(b"PK\x05\x06")
    shift = head_central
    central = bytearray(damaged[tail_central:tail_end])
    struct.pack_into("<I", central, 42, struct.unpack_from("<I", central, 42)[0] + shift)
    body = head[:head_central] + damaged[:tail_central]
    directory = head[head_central:head_end] + bytes(central)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 2, 2, len(directory), len(body), 0)
    return body + directory + end


def test_a_zip_bomb_is_refused_with_flat_memory(server):
    """Zeros that expand to 200 MB from a few hundred KB: refused, nothing stored, and memory stays flat."""
    bomb = zipped({f"cell-{i}.bmp": b"\0" * 20_000_000 for i in range(10)})
    assert len(bomb) < 1_000_000
    before = server.stored()
    tracemalloc.start()
    try:
        with server.client() as client:
            response = client.post("/api/v1/batches", files={"archive": ("bomb.zip", bomb, "application/zip")})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_problem(response, 422, "expands to more than")
    assert server.stored() == before
    assert peak < 30_000_000, f"peak {peak:,} bytes"


def test_members_are_read_capped_whatever_their_headers_say(tmp_path):
    """Unit level: a 64 MB member is read only up to one image's limit + 1 byte, in chunks."""
    source = tmp_path / "big.zip"
    source.write_bytes(zipped({"big.bmp": b"\0" * 64_000_000, "small.bmp": bmp()}))
    settings = Settings(max_upload_bytes=100_000, max_archive_expanded_bytes=10**9)
    tracemalloc.start()
    try:
        with source.open("rb") as handle:
            sizes = [len(f.data) for f in files_from_zip(handle, settings)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [100_001, len(bmp())]
    assert peak < 8_000_000, f"peak {peak:,} bytes"


def test_the_real_expanded_total_is_capped(tmp_path):
    """Members whose sum passes the archive cap are refused on the bytes actually produced."""
    settings = Settings(max_upload_bytes=1_000_000, max_archive_expanded_bytes=2_500_000)
    data = zipped({f"c{i}.bmp": bytes([i]) * 900_000 for i in range(3)})
    # Headers claiming tiny sizes would fail the CRC; claim honest ones but more files than the cap allows.
    from app.errors import InputError

    with pytest.raises(InputError, match="expands to more than"):
        list(files_from_zip(io.BytesIO(data), settings))


def test_an_over_size_member_fails_only_its_item(server):
    archive = zipped({"big.bmp": bmp((400, 300)), "small.bmp": bmp(colour=(9, 9, 9))})
    with server.client() as client:
        response = client.post("/api/v1/batches", files={"archive": ("a.zip", archive, "application/zip")})
        assert response.status_code == 202, response.text
        items = client.get(f"/api/v1/batches/{response.json()['id']}/items", params={"order": "position"}).json()
    big, small = items["items"]
    assert big["status"] == "failed" and "limit" in big["error"]
    assert small["status"] == "queued"


# ---------------------------------------------------------------- bounded ids and offsets


HUGE = [2**31, 2**63, 10**30]


@pytest.mark.parametrize("value", HUGE)
def test_ids_and_offsets_past_the_database_range_are_422(server, value):
    with server.client() as client:
        for path in (
            f"/api/v1/predictions/{value}",
            f"/api/v1/predictions/{value}/image",
            f"/api/v1/predictions/{value}/heatmap",
            f"/api/v1/predictions/{value}/fhir",
            f"/api/v1/batches/{value}",
            f"/api/v1/batches/{value}/items",
            f"/api/v1/batches/{value}/export.csv",
        ):
            assert_problem(client.get(path), 422, "")
        assert_problem(client.post(f"/api/v1/predictions/{value}/reviews", json={"action": "confirm"}), 422, "")
        assert_problem(client.get("/api/v1/predictions", params={"offset": value}), 422, "offset")
        assert_problem(client.get("/api/v1/batches/1/items", params={"offset": value}), 422, "offset")


def test_largest_ids_and_offsets_are_plain_404_or_empty(server, sign_in):
    top = 2**31 - 1
    with server.client() as client:
        assert_problem(client.get(f"/api/v1/predictions/{top}"), 404, "does not exist")
        assert_problem(client.get(f"/api/v1/batches/{top}"), 404, "does not exist")
        page = client.get("/api/v1/predictions", params={"offset": top})
        assert page.status_code == 200 and page.json()["items"] == []
        assert_problem(client.get("/api/v1/predictions/0"), 422, "")
    browser, _ = sign_in(server, "pathologist")
    for path in (f"/predictions/{2**63}", f"/batches/{2**63}", f"/queue/items/{2**63}"):
        response = browser.get(path)
        assert response.status_code == 422 and "text/html" in response.headers["content-type"], path
    assert browser.get(f"/predictions/{top}").status_code == 404
    assert browser.get("/queue", params={"batch": str(2**70)}).status_code == 200
    browser.close()


# ---------------------------------------------------------------- control characters, CSV injection


def test_control_characters_in_names_are_stripped_or_refused(server):
    form = {"Content-Type": MULTIPART}
    with server.client() as client:
        single = client.post(
            "/api/v1/predictions",
            content=multipart([("image", "ce\x00ll\x07.bmp", bmp(colour=(5, 50, 5)))]),
            headers=form,
        )
        assert single.status_code == 201, single.text
        batch = client.post(
            "/api/v1/batches", content=multipart([("image", "a\x00b.bmp", bmp(colour=(6, 60, 6)))]), headers=form
        )
        assert batch.status_code == 202, batch.text
        items = client.get(f"/api/v1/batches/{batch.json()['id']}/items").json()["items"]
        archive = zipped({"z\x01ip\x00.bmp": bmp(colour=(7, 70, 7))})
        zipped_batch = client.post("/api/v1/batches", files={"archive": ("a.zip", archive, "application/zip")})
        assert zipped_batch.status_code == 202, zipped_batch.text
        zip_items = client.get(f"/api/v1/batches/{zipped_batch.json()['id']}/items").json()["items"]
        before = server.stored()
        bad_name = client.post(
            "/api/v1/batches",
            content=multipart([("image", "b.bmp", bmp()), ("name", None, b"slide\x00 1")]),
            headers=form,
        )
    assert single.json()["original_filename"] == "cell.bmp"
    assert items[0]["file_name"] == "ab.bmp"
    assert zip_items[0]["file_name"] == "zip"  # zipfile ends a name at its first NUL; \x01 is stripped
    assert_problem(bad_name, 422, "control characters")
    assert server.stored() == before


def test_csv_cells_cannot_run_as_formulas(server):
    names = ['=HYPERLINK("http://evil","x").bmp', "+1.bmp", "-2.bmp", "@SUM(A1).bmp", "plain.bmp"]
    parts = [("image", name, bmp(colour=(i, 2 * i, 3 * i))) for i, name in enumerate(names, 1)]
    with server.client() as client:
        batch = client.post("/api/v1/batches", content=multipart(parts), headers={"Content-Type": MULTIPART})
        assert batch.status_code == 202, batch.text
        export = client.get(f"/api/v1/batches/{batch.json()['id']}/export.csv")
    assert export.status_code == 200
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [r["file_name"] for r in rows] == [
        "'=HYPERLINK(\"http://evil\",\"x\").bmp", "'+1.bmp", "'-2.bmp", "'@SUM(A1).bmp", "plain.bmp",
    ]  # fmt: skip


def test_nul_in_other_text_fields_is_refused_not_a_server_error(server, sign_in):
    with server.client() as client:
        created = client.post("/api/v1/predictions", files={"image": ("c.bmp", bmp(colour=(8, 80, 8)), "image/bmp")})
        assert created.status_code == 201, created.text
        prediction_id = created.json()["id"]
        by_accession = client.get("/api/v1/predictions", params={"accession_id": "S26\x00"})
    assert_problem(by_accession, 422, "accession")
    reviewer, csrf = sign_in(server, "pathologist")
    reviews_before = server.count("reviews")
    api_review = reviewer.post(
        f"/api/v1/predictions/{prediction_id}/reviews",
        json={"action": "confirm", "comment": "looks\x00 fine"},
        headers={"X-CSRF-Token": csrf},
    )
    page_review = reviewer.post(
        f"/predictions/{prediction_id}/reviews", data={"action": "confirm", "comment": "a\x00b", "csrf": csrf}
    )
    reviewer.close()
    assert_problem(api_review, 422, "control characters")
    assert page_review.status_code == 422
    assert server.count("reviews") == reviews_before
    admin, admin_csrf = sign_in(server, "admin")
    users_before = server.count("users")
    created_user = admin.post(
        "/admin/users",
        data={"username": "evil\x00", "password": PASSWORD + "!x", "role": "pathologist", "csrf": admin_csrf},
    )
    switched = admin.post("/admin/users/active", data={"username": "nobody\x00", "active": "false", "csrf": admin_csrf})
    admin.close()
    # NUL in a username is malformed input (422), not an unknown user (404).
    assert created_user.status_code == 422 and switched.status_code == 422
    assert server.count("users") == users_before
    with server.anonymous() as anonymous:
        login_page = anonymous.get("/login")
        token = login_page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        login = anonymous.post("/login", data={"username": "ghost\x00", "password": "x", "csrf": token})
    assert login.status_code == 422  # refused as malformed, before any account is looked up or counted


# ---------------------------------------------------------------- EXIF and heatmap over HTTP


def test_rotated_jpeg_is_stored_upright_and_its_heatmap_matches(server):
    upright = Image.new("RGB", (600, 300), (210, 180, 220))
    upright.paste(Image.new("RGB", (200, 100), (80, 20, 110)), (100, 50))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    with server.client() as client:
        created = client.post("/api/v1/predictions", files={"image": ("rotated.jpg", buffer.getvalue(), "image/jpeg")})
        assert created.status_code == 201, created.text
        heatmap = client.get(f"/api/v1/predictions/{created.json()['id']}/heatmap")
    assert heatmap.status_code == 200 and heatmap.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(heatmap.content)).size == (600, 300)
    with server.context.engine.connect() as connection:
        width, height = connection.execute(
            text("SELECT width, height FROM images WHERE sha256 = :s"), {"s": created.json()["image_sha256"]}
        ).one()
    assert (width, height) == (600, 300)


def test_heatmap_of_a_large_image_keeps_its_aspect_at_most_1024_px(server):
    image = Image.new("RGB", (2400, 1600), (200, 170, 210))
    image.paste(Image.new("RGB", (500, 400), (90, 40, 120)), (900, 600))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert len(buffer.getvalue()) < MAX_UPLOAD
    with server.client() as client:
        created = client.post("/api/v1/predictions", files={"image": ("big.png", buffer.getvalue(), "image/png")})
        assert created.status_code == 201, created.text
        heatmap = client.get(f"/api/v1/predictions/{created.json()['id']}/heatmap")
    assert heatmap.status_code == 200
    assert Image.open(io.BytesIO(heatmap.content)).size == (1024, 683)
