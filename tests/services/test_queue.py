"""The review queue in SQL: filters, ranking, paging and a cell's neighbours, against the ranking
the queue has always had (suspicion: highest P(abnormal) first; uncertainty: nearest 0.5 first;
unclassified cells last; ties in submission order)."""

import pytest
from sqlalchemy.orm import Session

from app.db.models import BatchItem, Review
from app.domain import ItemStatus, QueueOrder
from app.errors import InputError, NotFoundError
from app.services import batches as service
from app.services.batches import QueueFilter
from tests.services.conftest import POLICY, add_batch, add_user

# Ties on purpose: 0.9 twice, 0.25 and 0.75 equally uncertain; a queued and a failed cell.
CELLS = [0.2, 0.9, None, 0.75, 0.9, 0.5, "failed", 0.25, 0.05, 0.62]


def ranked(items: list[BatchItem], order: str) -> list[int]:
    """The queue's order as the Python sort of old computed it: submission order, then a stable sort."""
    items = sorted(items, key=lambda i: (i.batch_id, i.position))
    if order == QueueOrder.SUSPICION:
        items.sort(key=lambda i: -i.prediction.abnormal_probability if i.prediction else 2.0)
    elif order == QueueOrder.UNCERTAINTY:
        items.sort(key=lambda i: -service.uncertainty(i) if i.prediction else 2.0)
    return [i.id for i in items]


@pytest.fixture
def queue(session: Session) -> tuple[int, list[BatchItem]]:
    batch, items = add_batch(session, CELLS)
    add_batch(session, [0.9, 0.1])  # another batch: never in the first one's queue
    return batch.id, items


@pytest.mark.parametrize("order", list(QueueOrder))
def test_order_matches_the_ranking_of_old_ties_by_submission(session, queue, order):
    batch_id, items = queue
    got = [i.id for i in service.queue_items(session, batch_id, QueueFilter(order=order))]
    assert got == ranked(items, order)
    if order == QueueOrder.SUSPICION:  # the tie at 0.9 in position order, unclassified last
        assert got[:2] == [items[1].id, items[4].id]
        assert set(got[-2:]) == {items[2].id, items[6].id}


def test_queue_of_all_batches_ranks_across_batches(session, queue):
    batch_id, items = queue
    everything = list(session.query(BatchItem))
    got = [i.id for i in service.queue_items(session, None, QueueFilter())]
    assert got == ranked(everything, QueueOrder.SUSPICION)
    assert len(got) == len(CELLS) + 2


@pytest.mark.parametrize(
    ("flt", "keep"),
    [
        (QueueFilter(min_abnormal=0.5), lambda p, i: p is not None and p >= 0.5),
        (QueueFilter(max_abnormal=0.25), lambda p, i: p is not None and p <= 0.25),
        (QueueFilter(min_abnormal=0.2, max_abnormal=0.75), lambda p, i: p is not None and 0.2 <= p <= 0.75),
        (QueueFilter(status=ItemStatus.QUEUED), lambda p, i: i.status == ItemStatus.QUEUED),
        (QueueFilter(status=ItemStatus.FAILED), lambda p, i: i.status == ItemStatus.FAILED),
        (QueueFilter(needs_review=True), lambda p, i: p is not None and 0.4 <= p <= 0.6),
    ],
)
def test_filters(session, queue, flt, keep):
    batch_id, items = queue
    expected = [i for i in items if keep(i.prediction.abnormal_probability if i.prediction else None, i)]
    got = [i.id for i in service.queue_items(session, batch_id, flt, POLICY)]
    assert got == ranked(expected, flt.order)
    assert got  # every filter here keeps something


def test_class_unreviewed_and_qc_filters(session):
    batch, items = add_batch(session, [0.9, 0.8, 0.1, 0.3], p1="severe_dysplastic")
    reviewer = add_user(session, "dr.q")
    session.add(Review(prediction_id=items[0].prediction_id, reviewer_id=reviewer.id, action="confirm",
                       label=items[0].prediction.predicted_class))  # fmt: skip
    items[2].qc_sample = True
    session.commit()
    ids = lambda flt: [i.id for i in service.queue_items(session, batch.id, flt)]  # noqa: E731
    assert ids(QueueFilter(predicted_class="severe_dysplastic")) == [items[1].id]
    assert ids(QueueFilter(unreviewed=True)) == [items[1].id, items[3].id, items[2].id]
    assert ids(QueueFilter(qc_only=True)) == [items[2].id]


@pytest.mark.parametrize("order", list(QueueOrder))
def test_pages_are_slices_of_the_ranked_queue(session, queue, order):
    batch_id, items = queue
    whole = ranked(items, order)
    for limit, offset in [(3, 0), (3, 3), (4, 8), (5, 20), (100, 0)]:
        page, total = service.queue_page(session, batch_id, QueueFilter(order=order), None, limit, offset)
        assert [i.id for i in page] == whole[offset : offset + limit]
        assert total == len(CELLS)


def test_read_queue_page_audits_the_items_shown(session, queue):
    batch_id, items = queue
    actor = add_user(session, "dr.page")
    page, total = service.read_queue_page(session, actor, batch_id, QueueFilter(), POLICY, 2, 1)
    assert total == len(CELLS) and [i.id for i in page] == ranked(items, QueueOrder.SUSPICION)[1:3]
    from app.services.audit import events_for

    (event,) = events_for(session, "batch", batch_id)
    assert event.action == "batch.items.read" and event.detail["item_ids"] == [i.id for i in page]
    with pytest.raises(NotFoundError):
        service.read_queue_page(session, actor, batch_id + 100, QueueFilter(), POLICY, 2, 0)


def test_bad_filters_are_refused(session, queue):
    batch_id, _ = queue
    for flt in (QueueFilter(order="random"), QueueFilter(status="lost"), QueueFilter(min_abnormal=2.0),
                QueueFilter(predicted_class="unicorn")):  # fmt: skip
        with pytest.raises(InputError):
            service.queue_page(session, batch_id, flt)


@pytest.mark.parametrize("order", list(QueueOrder))
@pytest.mark.parametrize("flt", [QueueFilter(), QueueFilter(min_abnormal=0.2), QueueFilter(max_abnormal=0.75)])
def test_neighbours_walk_the_classified_cells_in_queue_order(session, queue, order, flt):
    batch_id, items = queue
    flt = QueueFilter(order=order, min_abnormal=flt.min_abnormal, max_abnormal=flt.max_abnormal)
    walk = [i for i in ranked(items, order) if session.get(BatchItem, i).prediction_id is not None]
    walk = [i for i in walk if i in {x.id for x in service.queue_items(session, batch_id, flt)}]
    assert len(walk) >= 5
    for at, item_id in enumerate(walk):
        near = service.neighbours(session, item_id, batch_id, flt)
        assert near.previous == (walk[at - 1] if at > 0 else None)  # the first cell has none
        assert near.following == (walk[at + 1] if at + 1 < len(walk) else None)  # nor has the last
        assert (near.position, near.count) == (at + 1, len(walk))


def test_a_cell_outside_the_filter_leads_to_the_first_cell(session, queue):
    batch_id, items = queue
    flt = QueueFilter(min_abnormal=0.5)
    near = service.neighbours(session, items[0].id, batch_id, flt)  # P = 0.2: filtered out
    first = service.queue_items(session, batch_id, flt)[0]
    assert (near.previous, near.following, near.position) == (None, first.id, None)
    assert near.count == sum(1 for c in CELLS if isinstance(c, float) and c >= 0.5)
    # A queued cell is never a neighbour, even where the filter keeps it.
    assert service.neighbours(session, items[2].id, batch_id, QueueFilter()).position is None


def test_neighbours_of_an_empty_queue(session, queue):
    batch_id, items = queue
    near = service.neighbours(session, items[1].id, batch_id, QueueFilter(min_abnormal=0.99))
    assert (near.previous, near.following, near.position, near.count) == (None, None, None, 0)
