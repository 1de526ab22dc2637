"""Batch items leased to workers: claim, expiry and re-claim, a late worker storing nothing, and
items that used up their attempts (the model is a fake: the lease logic is under test)."""

from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.models import AuditEvent, BatchItem, ImageData, Prediction, utcnow
from app.domain import ItemStatus, PredictionSource
from app.ml.classifier import Prediction as ModelPrediction
from app.services import work_queue
from app.services.images import ImageStore
from tests.services.conftest import MODEL_VERSION, WEIGHTS, add_batch

LEASE, ATTEMPTS = 60, 3


class FakeClassifier(SimpleNamespace):
    def predict(self, images: list[bytes]) -> list[ModelPrediction]:
        return [ModelPrediction({"carcinoma_in_situ": 0.8}, "carcinoma_in_situ", 0.8, MODEL_VERSION) for _ in images]


@pytest.fixture
def queued(session: Session) -> list[int]:
    batch, items = add_batch(session, [None] * 4, accession_id="S-LEASE")
    session.add_all(ImageData(image_id=item.image_id, data=b"pixels") for item in items)
    session.commit()
    return [item.id for item in items]


def claim(factory: sessionmaker[Session], worker: str, limit: int = 2) -> list[work_queue.Lease]:
    return work_queue.claim(factory, worker, limit, LEASE, ATTEMPTS)


def process(factory, worker: str, leases, tmp_path) -> int:
    settings = Settings(data_dir=tmp_path, qc_share=0.0)
    model = FakeClassifier(weights_sha256=WEIGHTS)
    return work_queue.process(factory, model, ImageStore(), settings, worker, leases)


def items(session: Session) -> dict[int, BatchItem]:
    session.expire_all()
    return {i.id: i for i in session.scalars(select(BatchItem))}


def expire(session: Session, item_ids: list[int]) -> None:
    past = utcnow() - timedelta(seconds=1)
    session.execute(update(BatchItem).where(BatchItem.id.in_(item_ids)).values(lease_expires_at=past))
    session.commit()


def test_claims_take_queued_items_in_order_and_never_the_same_item_twice(session, factory, queued):
    first, second, third = claim(factory, "w1"), claim(factory, "w2"), claim(factory, "w3")
    assert [lease.item_id for lease in first] == queued[:2]
    assert [lease.item_id for lease in second] == queued[2:]
    assert third == []
    now = items(session)
    assert {now[i].worker for i in queued[:2]} == {"w1"} and {now[i].status for i in queued} == {"processing"}
    assert all(now[i].attempts == 1 and now[i].lease_expires_at > utcnow() for i in queued)


def test_an_expired_lease_is_claimed_again_and_the_late_worker_stores_nothing(session, factory, queued, tmp_path):
    late = claim(factory, "w1", limit=4)
    expire(session, queued[:2])
    taken = claim(factory, "w2", limit=4)
    assert [lease.item_id for lease in taken] == queued[:2]
    assert {lease.token for lease in taken}.isdisjoint({lease.token for lease in late})
    assert process(factory, "w1", late[:2], tmp_path) == 0  # its leases on these items are gone
    assert session.scalars(select(Prediction)).all() == []
    assert process(factory, "w2", taken, tmp_path) == 2
    assert process(factory, "w1", late[2:], tmp_path) == 2  # the leases it still holds are honoured
    now = items(session)
    assert {now[i].status for i in queued} == {ItemStatus.CLASSIFIED}
    assert [now[i].attempts for i in queued] == [2, 2, 1, 1]
    predictions = session.scalars(select(Prediction)).all()
    assert len(predictions) == 4 and {p.source for p in predictions} == {PredictionSource.BATCH}
    assert {p.accession_id for p in predictions} == {"S-LEASE"}
    actors = session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "prediction.create")).all()
    assert sorted(actors) == ["worker:w1", "worker:w1", "worker:w2", "worker:w2"]


def test_an_unexpired_lease_is_not_taken_over(session, factory, queued):
    claim(factory, "w1", limit=4)
    assert claim(factory, "w2", limit=4) == []


def test_an_item_that_used_up_its_attempts_fails(session, factory, queued):
    for _ in range(ATTEMPTS):
        assert claim(factory, "w1", limit=1)[0].item_id == queued[0]
        expire(session, [queued[0]])
    assert claim(factory, "w2", limit=1) == []  # this round fails the item instead of leasing it
    assert [lease.item_id for lease in claim(factory, "w2", limit=1)] == [queued[1]]
    failed = items(session)[queued[0]]
    assert failed.status == ItemStatus.FAILED and failed.error == f"not classified after {ATTEMPTS} attempts"
    assert failed.lease_token is None


def test_a_missing_image_fails_its_item_only(session, factory, queued, tmp_path):
    session.execute(ImageData.__table__.delete().where(ImageData.image_id == items(session)[queued[0]].image_id))
    session.commit()
    leases = claim(factory, "w1")
    assert process(factory, "w1", leases, tmp_path) == 2
    now = items(session)
    assert now[queued[0]].status == ItemStatus.FAILED and now[queued[0]].error == "the stored image is missing"
    assert now[queued[1]].status == ItemStatus.CLASSIFIED
