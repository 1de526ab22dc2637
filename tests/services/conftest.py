"""Service-level tests: the functions of app/services called in-process with a plain Session, on a
migrated database (SQLite; PostgreSQL too, marked `postgres`), no HTTP server and no model.

Each test gets a fresh database copied from one migrated once per run (a file copy on SQLite,
CREATE DATABASE ... TEMPLATE on PostgreSQL), so the whole folder runs in seconds.
"""

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.db.migrate import upgrade_to_head
from app.db.models import Batch, BatchItem, Prediction, StoredImage, User
from app.db.session import make_engine, make_session_factory
from app.domain import ItemStatus, PredictionSource
from app.ml.classes import ABNORMAL_CLASSES, CLASS_NAMES, NORMAL_CLASSES
from app.services.actors import Actor
from app.services.calls import CallPolicy

MODEL_VERSION = "fake-model"
WEIGHTS = "0" * 64
POLICY = CallPolicy(abnormal_threshold=0.5, uncertainty_band=0.1)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "papcad.sqlite"
    upgrade_to_head(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_template(postgres_database) -> Iterator[str]:
    with postgres_database("papcad_services") as url:
        upgrade_to_head(url)
        yield make_url(url).database or ""


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh migrated database for one test."""
    if request.param == "sqlite":
        path = tmp_path / "papcad.sqlite"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    make = request.getfixturevalue("postgres_database")
    with make("papcad_service", template=request.getfixturevalue("postgres_template")) as url:
        yield url


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as opened:
        yield opened


def add_user(session: Session, username: str, role: str = "pathologist") -> Actor:
    user = User(username=username, password_hash="-", role=role, active=True)
    session.add(user)
    session.commit()
    return Actor.of_user(user)


def add_image(session: Session, seed: object) -> StoredImage:
    image = StoredImage(
        sha256=hashlib.sha256(str(seed).encode()).hexdigest(), format="PNG", width=64, height=64, byte_size=1
    )
    session.add(image)
    session.flush()
    return image


def fake_prediction(
    session: Session, abnormal: float, *, accession_id: str | None = None, predicted_class: str | None = None
) -> Prediction:
    """A stored model output with made-up probabilities: its class is the call at 0.5 unless given."""
    if predicted_class is None:
        predicted_class = sorted(ABNORMAL_CLASSES)[0] if abnormal >= 0.5 else sorted(NORMAL_CLASSES)[0]
    probabilities = dict.fromkeys(CLASS_NAMES, 0.0) | {predicted_class: 1.0}
    prediction = Prediction(
        image_id=add_image(session, uuid.uuid4()).id,
        accession_id=accession_id,
        source=PredictionSource.BATCH,
        predicted_class=predicted_class,
        probabilities=probabilities,
        abnormal_probability=abnormal,
        model_version=MODEL_VERSION,
        weights_sha256=WEIGHTS,
    )
    session.add(prediction)
    session.flush()
    return prediction


def add_batch(
    session: Session, cells: list[float | str | None], accession_id: str | None = None, **classes: str
) -> tuple[Batch, list[BatchItem]]:
    """A batch whose items, in position order, are classified with the given P(abnormal) (a float),
    or queued (None) or failed ("failed"). `classes` names the predicted class of some positions (p3=...)."""
    batch = Batch(name="test", accession_id=accession_id)
    session.add(batch)
    session.flush()
    items = []
    for position, cell in enumerate(cells):
        item = BatchItem(batch_id=batch.id, position=position, filename=f"cell-{position}.png", attempts=0)
        if isinstance(cell, float):
            prediction = fake_prediction(
                session, cell, accession_id=accession_id, predicted_class=classes.get(f"p{position}")
            )
            item.status, item.prediction_id, item.image_id = ItemStatus.CLASSIFIED, prediction.id, prediction.image_id
        elif cell is None:
            item.status, item.image_id = ItemStatus.QUEUED, add_image(session, uuid.uuid4()).id
        else:
            item.status, item.error = ItemStatus.FAILED, "not an image"
        session.add(item)
        session.flush()
        items.append(item)
    session.commit()
    return batch, items
