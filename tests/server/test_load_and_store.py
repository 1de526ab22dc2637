"""Under load: many simultaneous uploads with a small pool and a small in-flight limit, the same new
image many times at once, simultaneous idempotent pairs, readiness and metrics while the pool is
exhausted, and workers that read images from the database only. SQLite and PostgreSQL."""

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import text

from app.config import Settings
from app.context import AppContext
from app.db.session import make_engine, make_session_factory
from app.main import create_app
from app.services import accounts, batches
from app.services.actors import SYSTEM
from app.services.images import ImageStore
from app.worker import Worker

CLASSES = ["normal_superficiel", "normal_intermediate", "normal_columnar", "light_dysplastic", "carcinoma_in_situ"]
POOL_SIZE = 2
MAX_IN_FLIGHT = 6


@pytest.fixture(scope="module")
def small_server(database_url, bundled_classifier, tmp_path_factory) -> Iterator:
    """A server with 2 pooled connections (no overflow), a 1 s pool timeout and 6 requests in flight."""
    from tests.server.conftest import PASSWORD, LiveServer, serving

    data_dir = tmp_path_factory.mktemp("load-data")
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        embedded_worker=False,
        pool_size=POOL_SIZE,
        max_overflow=0,
        pool_timeout=1,
        max_in_flight=MAX_IN_FLIGHT,
        retry_after_seconds=2,
        inference_batch_timeout_ms=20,
    )
    app = create_app(settings, classifier=bundled_classifier)
    with serving(app) as url:
        context: AppContext = app.state.context
        with context.sessions() as session:
            _, key = accounts.create_api_client(session, SYSTEM, "load-lis")
            accounts.create_user(session, SYSTEM, "load-pathologist", PASSWORD, "pathologist")
            session.commit()
        yield LiveServer(url, context, data_dir, key, {"pathologist": "load-pathologist"})


def _post(server, data: bytes, name: str, headers: dict | None = None, client: httpx.Client | None = None):
    own = client is None
    client = client or server.client()
    try:
        return client.post("/api/v1/predictions", files={"image": (name, data, "image/bmp")}, headers=headers or {})
    finally:
        if own:
            client.close()


def _at_once(calls: list) -> list:
    """Run the calls in threads released together."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_simultaneous_uploads_get_201_or_503_never_500(small_server, herlev_image):
    cells = [herlev_image(CLASSES[i % len(CLASSES)], 20 + i // len(CLASSES)) for i in range(40)]
    before = small_server.count("predictions")
    responses = _at_once([lambda p=p: _post(small_server, p.read_bytes(), p.name) for p in cells])

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {201, 503}, [(r.status_code, r.text[:200]) for r in responses if r.status_code != 201]
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 2  # the configured minimum, or the time the work needs
            assert response.headers["content-type"].startswith("application/problem+json")
    created = [r.json() for r in responses if r.status_code == 201]
    # The first MAX_IN_FLIGHT admitted all complete: none waits for a second connection while holding one.
    assert len(created) >= MAX_IN_FLIGHT
    ids = [p["id"] for p in created]
    assert len(set(ids)) == len(ids)
    assert small_server.count("predictions") - before == len(created)
    with small_server.context.engine.connect() as connection:
        for p in created:
            row = connection.execute(
                text(
                    "SELECT COUNT(*) FROM predictions p JOIN images i ON i.id = p.image_id "
                    "WHERE p.id = :id AND i.sha256 = :s"
                ),
                {"id": p["id"], "s": p["image_sha256"]},
            ).scalar_one()
            assert row == 1


def test_same_new_image_uploaded_at_once_is_stored_once(small_server, herlev_image):
    path = herlev_image("moderate_dysplastic", 30)
    data = path.read_bytes()
    responses: list[httpx.Response] = []
    for _ in range(6):  # retry the 503s (admission control) until all 12 are stored
        pending = 12 - len([r for r in responses if r.status_code == 201])
        if not pending:
            break
        responses += _at_once([lambda: _post(small_server, data, path.name)] * pending)
    created = [r.json() for r in responses if r.status_code == 201]
    assert len(created) == 12, [(r.status_code, r.text[:200]) for r in responses if r.status_code != 201]
    assert {r.status_code for r in responses} <= {201, 503}
    sha = created[0]["image_sha256"]
    with small_server.context.engine.connect() as connection:
        images = connection.execute(text("SELECT COUNT(*) FROM images WHERE sha256 = :s"), {"s": sha}).scalar_one()
    assert images == 1
    assert small_server.stored_files().count(sha) == 1
    with small_server.client() as client:
        for p in created:
            image = client.get(f"/api/v1/predictions/{p['id']}/image")
            assert image.status_code == 200 and image.content == data


def test_simultaneous_idempotent_pairs_make_one_row_each(small_server, herlev_image, sign_in):
    path = herlev_image("severe_dysplastic", 11)
    data = path.read_bytes()
    browser, csrf = sign_in(small_server, "pathologist")
    twin = httpx.Client(base_url=small_server.url, cookies=browser.cookies, timeout=60)
    user_headers = {"Idempotency-Key": "user-pair-1", "X-CSRF-Token": csrf}
    api_headers = {"Idempotency-Key": "lis-pair-1"}
    with twin, small_server.client() as lis_a, small_server.client() as lis_b:
        responses = _at_once(
            [
                lambda: _post(small_server, data, path.name, user_headers, browser),
                lambda: _post(small_server, data, path.name, user_headers, twin),
                lambda: _post(small_server, data, path.name, api_headers, lis_a),
                lambda: _post(small_server, data, path.name, api_headers, lis_b),
            ]
        )
    browser.close()
    assert [r.status_code for r in responses] == [201] * 4, [r.text[:200] for r in responses]
    assert responses[0].json()["id"] == responses[1].json()["id"]
    assert responses[2].json()["id"] == responses[3].json()["id"]
    assert responses[0].json()["submitted_by"] == "user:load-pathologist"
    with small_server.context.engine.connect() as connection:
        for key in ("user-pair-1", "lis-pair-1"):
            rows = connection.execute(
                text("SELECT COUNT(*) FROM predictions WHERE idempotency_key = :k"), {"k": key}
            ).scalar_one()
            assert rows == 1, key


def test_readyz_and_metrics_answer_while_the_pool_is_exhausted(small_server):
    engine = small_server.context.engine
    held = [engine.connect() for _ in range(POOL_SIZE)]
    try:
        for connection in held:
            connection.execute(text("SELECT 1"))
        with small_server.anonymous() as anonymous:
            ready = anonymous.get("/readyz")
            metrics = anonymous.get("/metrics")
        with small_server.client() as client:
            busy = client.get("/api/v1/predictions")
    finally:
        for connection in held:
            connection.close()
    assert ready.status_code == 200, ready.text
    assert ready.json()["model_version"] == small_server.context.classifier.version
    assert metrics.status_code == 200
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "2"
    assert busy.headers["content-type"].startswith("application/problem+json")
    with small_server.client() as client:
        assert client.get("/api/v1/predictions").status_code == 200


def test_metrics_count_requests_predictions_and_queue(small_server, herlev_image):
    path = herlev_image("normal_columnar", 40)
    with small_server.client() as client:
        assert _post(small_server, path.read_bytes(), path.name, client=client).status_code == 201
        client.get("/api/v1/predictions/999999999")
    with small_server.anonymous() as anonymous:
        response = anonymous.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    body = response.text
    with small_server.context.engine.connect() as connection:
        stored = connection.execute(
            text(
                "SELECT predicted_class, model_version, COUNT(*) FROM predictions "
                "GROUP BY predicted_class, model_version"
            )
        ).all()
    for predicted_class, version, count in stored:
        assert f'papcad_predictions_total{{class="{predicted_class}",model_version="{version}"}} {float(count)}' in body
    assert 'papcad_http_requests_total{method="POST",route="/api/v1/predictions",status="201"}' in body
    assert 'papcad_http_requests_total{method="GET",route="/api/v1/predictions/{prediction_id}",status="404"}' in body
    assert 'papcad_http_request_duration_seconds_bucket{le="0.5",method="POST",route="/api/v1/predictions"' in body
    assert 'papcad_batch_queue_items{status="queued"}' in body
    assert "papcad_classifying_requests_in_flight" in body and "papcad_http_requests_in_flight" in body
    assert "papcad_metrics_database_up 1.0" in body


def test_a_worker_reads_images_from_the_database_only(
    database_url, small_server, bundled_classifier, herlev_image, tmp_path
):
    files = [batches.IncomingFile(f"{c}.bmp", herlev_image(c, 50).read_bytes()) for c in CLASSES[:3]]
    context = small_server.context
    with context.sessions() as session:
        batch = batches.create_batch(session, context.images, context.settings, SYSTEM, files, "db only", None)
    # A worker elsewhere: its own engine and settings, and a data folder that holds nothing.
    settings = Settings(data_dir=tmp_path / "elsewhere", database_url=database_url, embedded_worker=False)
    engine = make_engine(database_url)
    try:
        worker = Worker(make_session_factory(engine), bundled_classifier, ImageStore(), settings, name="remote")
        done = 0
        for _ in range(5):
            done += worker.run_once()
            if done >= len(files):
                break
    finally:
        engine.dispose()
    assert done == len(files)
    assert not (tmp_path / "elsewhere").exists() and not (small_server.data_dir / "images").exists()
    with context.sessions() as session:
        assert batches.progress(session, batch.id).classified == len(files)


def test_admission_control_sheds_what_is_over_the_limit_at_once():
    import asyncio

    from app.http.admission import AdmissionControl

    async def scenario() -> list[tuple[int, dict]]:
        release = asyncio.Event()

        async def slow_app(scope, receive, send):
            await release.wait()
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        control = AdmissionControl(slow_app, max_in_flight=2, retry_after_seconds=3)

        async def request(path: str = "/api/v1/predictions", method: str = "POST") -> tuple[int, dict]:
            sent: list[dict] = []

            async def receive():
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": method, "path": path, "headers": []}
            await control(scope, receive, send)
            start = sent[0]
            return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}

        admitted = [asyncio.create_task(request()), asyncio.create_task(request("/upload"))]
        await asyncio.sleep(0)  # both are inside the app now, waiting
        shed = await request("/api/v1/batches")
        other = asyncio.create_task(request("/api/v1/predictions/1", "GET"))  # not a classifying route
        await asyncio.sleep(0)
        release.set()
        results = [shed, *(await asyncio.gather(*admitted, other))]
        assert control.in_flight == 0
        return results + [await request()]

    shed, first, second, other, after = asyncio.run(scenario())
    assert shed[0] == 503 and 3 <= int(shed[1]["retry-after"]) <= 4  # the minimum, plus up to half again
    assert shed[1]["content-type"].startswith("application/problem+json")
    assert [first[0], second[0], other[0], after[0]] == [201, 201, 201, 201]


def test_retry_after_grows_with_the_work_in_flight():
    from types import SimpleNamespace

    from app.http.admission import MAX_RETRY_AFTER_S, AdmissionControl

    def scope_with(seconds_per_image):
        batcher = SimpleNamespace(seconds_per_image=seconds_per_image)
        return {"app": SimpleNamespace(state=SimpleNamespace(context=SimpleNamespace(batcher=batcher)))}

    control = AdmissionControl(None, max_in_flight=10, retry_after_seconds=2)
    control.in_flight = 10
    assert control.retry_after_for({}) == 2  # no model timing yet: the configured value
    assert control.retry_after_for(scope_with(None)) == 2
    assert control.retry_after_for(scope_with(0.1)) == 2  # half the work takes 0.5 s: the minimum
    assert control.retry_after_for(scope_with(1.5)) == 8  # half of 10 images at 1.5 s each, rounded up
    assert control.retry_after_for(scope_with(100.0)) == MAX_RETRY_AFTER_S


def test_refused_clients_are_told_different_waits():
    """Jitter: a crowd refused at once must not come back at once."""
    from app.http.admission import MAX_RETRY_AFTER_S, jittered

    waits = [jittered(8) for _ in range(200)]
    assert all(8 <= w <= 12 for w in waits) and len(set(waits)) > 1
    assert jittered(MAX_RETRY_AFTER_S) == MAX_RETRY_AFTER_S
