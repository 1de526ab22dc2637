"""A real PapCAD server over real HTTP, on SQLite and on PostgreSQL, with the bundled model.

PostgreSQL: set PAPCAD_TEST_POSTGRES_URL to a server where the user may create databases
(`.ci/run` starts one). Each server under test gets a fresh database.
"""

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import text

from app.config import Settings, get_settings
from app.context import AppContext
from app.main import create_app
from app.ml.classifier import Classifier
from app.services import accounts
from app.services.actors import SYSTEM

HERLEV = Path(
    os.environ.get("PAPCAD_HERLEV_DIR", Path(__file__).resolve().parents[3] / "shared" / "datasets" / "herlev")
)
PASSWORD = "correct-horse-battery"


@pytest.fixture(scope="session")
def herlev_image():
    """herlev_image(class_name, index) -> path of a real Herlev cell image."""

    def pick(class_name: str, index: int = 0) -> Path:
        return sorted((HERLEV / class_name).glob("*.BMP"))[index]

    return pick


@pytest.fixture(scope="session")
def bundled_classifier() -> Classifier:
    """The model the server ships with (PAPCAD_MODEL_DIR, default model_store/<version>)."""
    return Classifier.load(get_settings().model_dir)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_url(postgres_database) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'papcad.db'}"
    else:
        with request.getfixturevalue("postgres_database")() as url:
            yield url


@dataclass
class LiveServer:
    url: str
    context: AppContext
    data_dir: Path
    api_key: str
    users: dict[str, str] = field(default_factory=dict)  # role -> username

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.api_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def anonymous(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def count(self, table: str) -> int:
        with self.context.engine.connect() as connection:
            return connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()

    def stored_files(self) -> list[str]:
        """SHA-256 of every image whose bytes are stored (in the database, not in files)."""
        query = "SELECT images.sha256 FROM image_data JOIN images ON images.id = image_data.image_id ORDER BY 1"
        with self.context.engine.connect() as connection:
            return list(connection.execute(text(query)).scalars())


@contextmanager
def serving(app) -> Iterator[str]:
    """Serve the app with uvicorn on a free loopback port, in a thread of this process; yields its base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live_server(database_url, bundled_classifier, tmp_path_factory) -> Iterator[LiveServer]:
    """uvicorn serving create_app() on a free loopback port, in a thread of this process."""
    data_dir = tmp_path_factory.mktemp("data")
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        max_upload_bytes=2_000_000,
        max_archive_expanded_bytes=30_000_000,
        embedded_worker=True,
        qc_share=0.5,
        qc_max_abnormal_probability=0.5,
    )
    app = create_app(settings, classifier=bundled_classifier)
    with serving(app) as url:
        context: AppContext = app.state.context
        with context.sessions() as session:
            _, key = accounts.create_api_client(session, SYSTEM, "test-lis")
            users = {}
            for role in ("admin", "pathologist", "cytotechnologist"):
                users[role] = f"{role}-user"
                accounts.create_user(session, SYSTEM, users[role], PASSWORD, role)
            session.commit()
        yield LiveServer(url, context, data_dir, key, users)


def csrf_of(html: str) -> str:
    return html.split('name="csrf" value="', 1)[1].split('"', 1)[0]


@pytest.fixture
def sign_in():
    """sign_in(server, role) -> (browser-like client signed in with that role, its CSRF token)."""
    return _sign_in


def _sign_in(server: LiveServer, role: str) -> tuple[httpx.Client, str]:
    client = server.anonymous()
    page = client.get("/login")
    token = csrf_of(page.text)
    response = client.post("/login", data={"username": server.users[role], "password": PASSWORD, "csrf": token})
    assert response.status_code == 303, response.text
    home = client.get("/")
    return client, csrf_of(home.text)
