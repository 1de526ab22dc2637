"""One upload, one service call: read, check, classify (a fake model here) and store, with
Idempotency-Key replays per caller and no database connection held while the model runs."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import ApiClient, AuditEvent, Prediction, StoredImage
from app.domain import PredictionSource
from app.errors import ConflictError, ImageTooLargeError, InvalidImageError
from app.ml.classifier import Prediction as ModelPrediction
from app.services.actors import Actor
from app.services.images import ImageStore
from app.services.predictions import Submission, create_prediction
from tests.services.conftest import MODEL_VERSION, WEIGHTS, add_user


class FakeBatcher:
    """Stands in for the dynamic batcher: counts forward passes and checks that the session holds no
    transaction (so no pooled connection) while the 'model' runs."""

    def __init__(self, session: Session):
        self.session, self.calls = session, 0
        self.classifier = SimpleNamespace(weights_sha256=WEIGHTS)

    def predict(self, image: Image.Image) -> ModelPrediction:
        assert isinstance(image, Image.Image)  # the decoded picture, not the file again
        assert not self.session.in_transaction()
        self.calls += 1
        return ModelPrediction(
            probabilities={"normal_intermediate": 0.7, "light_dysplastic": 0.3},
            predicted_class="normal_intermediate",
            abnormal_probability=0.3,
            model_version=MODEL_VERSION,
        )


def png(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def upload(session: Session, tmp_path, database_url):
    settings = Settings(data_dir=tmp_path, database_url=database_url, max_upload_bytes=100_000)
    batcher = FakeBatcher(session)

    def send(actor: Actor, data, key: str | None = None, source=PredictionSource.API):
        return create_prediction(session, batcher, ImageStore(), settings, actor, Submission(data, source, "S-1",
                                 "cell.png", key))  # fmt: skip

    send.batcher = batcher
    return send


def api_client(session: Session, name: str) -> Actor:
    client = ApiClient(name=name, key_prefix=name[:16], key_hash="-")
    session.add(client)
    session.commit()
    return Actor.of_client(client)


def count(session: Session, model) -> int:
    return session.scalar(select(func.count()).select_from(model))


def test_same_key_same_caller_replays_the_first_prediction_without_running_the_model(session, upload):
    lis = api_client(session, "lis")
    first, created = upload(lis, png(1), "order-1")
    again, replayed = upload(lis, io.BytesIO(png(1)), "order-1")  # a stream, as a route passes it
    assert created and not replayed and again.id == first.id
    assert upload.batcher.calls == 1 and count(session, Prediction) == 1
    assert first.api_client_id == lis.id and first.source == PredictionSource.API
    creates = session.scalars(select(AuditEvent).where(AuditEvent.action == "prediction.create")).all()
    assert [e.entity_id for e in creates] == [str(first.id)]


def test_same_key_different_callers_are_separate_predictions(session, upload):
    lis, other_lis = api_client(session, "lis-a"), api_client(session, "lis-b")
    person = add_user(session, "dr.k")
    made = [upload(actor, png(2), "same-key") for actor in (lis, other_lis, person)]
    assert all(created for _, created in made)
    assert len({p.id for p, _ in made}) == 3 and upload.batcher.calls == 3
    assert count(session, StoredImage) == 1  # one image, stored once by its hash
    assert made[2][0].user_id == person.id and made[2][0].api_client_id is None


def test_same_key_for_another_image_is_a_conflict(session, upload):
    lis = api_client(session, "lis")
    upload(lis, png(3), "order-3")
    with pytest.raises(ConflictError):
        upload(lis, png(4), "order-3")
    assert count(session, Prediction) == 1


def test_no_key_always_classifies_again(session, upload):
    lis = api_client(session, "lis")
    assert upload(lis, png(5))[0].id != upload(lis, png(5))[0].id
    assert upload.batcher.calls == 2


def test_refused_files_store_nothing(session, upload):
    lis = api_client(session, "lis")
    with pytest.raises(ImageTooLargeError):
        upload(lis, io.BytesIO(png(6, size=400)))  # over 100,000 bytes: read only up to the limit + 1
    with pytest.raises(InvalidImageError):
        upload(lis, b"not an image")
    with pytest.raises(InvalidImageError):
        upload(lis, io.BytesIO(b"GIF89a" + png(7)[6:]))
    assert count(session, Prediction) == count(session, StoredImage) == 0 and upload.batcher.calls == 0
