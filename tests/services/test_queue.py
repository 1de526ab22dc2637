"""The review queue in SQL: filters, ranking, paging and a cell's neighbours, against the same ranking
done in Python (suspicion: highest P(abnormal) first; uncertainty: nearest the cut-off of the model that
made the call first; unclassified cells last; ties in submission order)."""

import pytest
from sqlalchemy.orm import Session

from app.db.models import BatchItem, Review
from app.domain import ItemStatus, QueueOrder
from app.errors import InputError, NotFoundError
from app.services import batches as service
from app.services.batches import QueueFilter
from app.services.calls import CallPolicy, uncertainty_at
from tests.services.conftest import MODEL_VERSION, add_batch, add_user

# A cut-off away from 0.5, as the bundled model's is (about 0.74).
POLICY = CallPolicy(abnormal_threshold=0.8, uncertainty_band=0.1)
# Ties on purpose: 0.9 twice; 0.4 and 0.9 equally uncertain at the cut-off 0.8 (0.5 each), from either
# side; a queued and a failed cell.
CELLS = [0.2, 0.9, None, 0.75, 0.9, 0.5, "failed", 0.25, 0.05, 0.62, 0.4]


def ranked(items: list[BatchItem], order: str, policy: CallPolicy = POLICY) -> list[int]:
    """The queue's order as a Python sort: submission order, then a stable sort on the rank."""
    items = sorted(items, key=lambda i: (i.batch_id, i.position))
    if order == QueueOrder.SUSPICION:
        items.sort(key=lambda i: -i.prediction.abnormal_probability if i.prediction else 2.0)
    elif order == QueueOrder.UNCERTAINTY:
        items.sort(key=lambda i: -service.uncertainty(i, policy) if i.prediction else 2.0)
    return [i.id for i in items]


def by_uncertainty(session: Session, batch_id: int, policy: CallPolicy) -> list[BatchItem]:
    return service.queue_items(session, batch_id, QueueFilter(order=QueueOrder.UNCERTAINTY), policy)


def assert_neighbours_follow(session: Session, walk: list[int], batch_id: int, flt: QueueFilter, policy: CallPolicy):
    """Walking previous/next from every classified cell visits the cells in exactly the order given."""
    for at, item_id in enumerate(walk):
        near = service.neighbours(session, item_id, batch_id, flt, policy)
        assert near.previous == (walk[at - 1] if at > 0 else None)  # the first cell has none
        assert near.following == (walk[at + 1] if at + 1 < len(walk) else None)  # nor has the last
        assert (near.position, near.count) == (at + 1, len(walk))


@pytest.fixture
def queue(session: Session) -> tuple[int, list[BatchItem]]:
    batch, items = add_batch(session, CELLS)
    add_batch(session, [0.9, 0.1])  # another batch: never in the first one's queue
    return batch.id, items


@pytest.mark.parametrize("order", list(QueueOrder))
def test_order_matches_the_ranking_of_old_ties_by_submission(session, queue, order):
    batch_id, items = queue
    got = [i.id for i in service.queue_items(session, batch_id, QueueFilter(order=order), POLICY)]
    assert got == ranked(items, order)
    if order == QueueOrder.SUSPICION:  # the tie at 0.9 in position order, unclassified last
        assert got[:2] == [items[1].id, items[4].id]
        assert set(got[-2:]) == {items[2].id, items[6].id}
    if order == QueueOrder.UNCERTAINTY:  # 0.75 nearest the cut-off; 0.9, 0.9 and 0.4 tie in position order
        p = [session.get(BatchItem, i).prediction for i in got[:6]]
        assert [x.abnormal_probability for x in p] == [0.75, 0.62, 0.5, 0.9, 0.9, 0.4]


def test_queue_of_all_batches_ranks_across_batches(session, queue):
    batch_id, items = queue
    everything = list(session.query(BatchItem))
    got = [i.id for i in service.queue_items(session, None, QueueFilter(), POLICY)]
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
        (QueueFilter(needs_review=True), lambda p, i: p is not None and POLICY.needs_review(i.prediction)),
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
    ids = lambda flt: [i.id for i in service.queue_items(session, batch.id, flt, POLICY)]  # noqa: E731
    assert ids(QueueFilter(predicted_class="severe_dysplastic")) == [items[1].id]
    assert ids(QueueFilter(unreviewed=True)) == [items[1].id, items[3].id, items[2].id]
    assert ids(QueueFilter(qc_only=True)) == [items[2].id]


@pytest.mark.parametrize("order", list(QueueOrder))
def test_pages_are_slices_of_the_ranked_queue(session, queue, order):
    batch_id, items = queue
    whole = ranked(items, order)
    for limit, offset in [(3, 0), (3, 3), (4, 8), (5, 20), (100, 0)]:
        page, total = service.queue_page(session, batch_id, QueueFilter(order=order), POLICY, limit, offset)
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
            service.queue_page(session, batch_id, flt, POLICY)


@pytest.mark.parametrize("order", list(QueueOrder))
@pytest.mark.parametrize("flt", [QueueFilter(), QueueFilter(min_abnormal=0.2), QueueFilter(max_abnormal=0.75)])
def test_neighbours_walk_the_classified_cells_in_queue_order(session, queue, order, flt):
    batch_id, items = queue
    flt = QueueFilter(order=order, min_abnormal=flt.min_abnormal, max_abnormal=flt.max_abnormal)
    walk = [i for i in ranked(items, order) if session.get(BatchItem, i).prediction_id is not None]
    walk = [i for i in walk if i in {x.id for x in service.queue_items(session, batch_id, flt, POLICY)}]
    assert len(walk) >= 5
    assert_neighbours_follow(session, walk, batch_id, flt, POLICY)


def test_a_cell_outside_the_filter_leads_to_the_first_cell(session, queue):
    batch_id, items = queue
    flt = QueueFilter(min_abnormal=0.5)
    near = service.neighbours(session, items[0].id, batch_id, flt, POLICY)  # P = 0.2: filtered out
    first = service.queue_items(session, batch_id, flt, POLICY)[0]
    assert (near.previous, near.following, near.position) == (None, first.id, None)
    assert near.count == sum(1 for c in CELLS if isinstance(c, float) and c >= 0.5)
    # A queued cell is never a neighbour, even where the filter keeps it.
    assert service.neighbours(session, items[2].id, batch_id, QueueFilter(), POLICY).position is None


def test_neighbours_of_an_empty_queue(session, queue):
    batch_id, items = queue
    near = service.neighbours(session, items[1].id, batch_id, QueueFilter(min_abnormal=0.99), POLICY)
    assert (near.previous, near.following, near.position, near.count) == (None, None, None, 0)


def test_most_uncertain_means_nearest_the_cut_off_not_nearest_one_half(session):
    """At a cut-off of 0.8 a cell at 0.78 is the closest call; one at 0.5 is a confident normal one."""
    batch, items = add_batch(session, [0.5, 0.95, 0.78, 0.1])
    got = by_uncertainty(session, batch.id, POLICY)
    assert [i.prediction.abnormal_probability for i in got] == [0.78, 0.5, 0.95, 0.1]
    assert [service.uncertainty(i, POLICY) for i in got] == pytest.approx([0.975, 0.625, 0.25, 0.125])
    flt = QueueFilter(order=QueueOrder.UNCERTAINTY)
    assert_neighbours_follow(session, [i.id for i in got], batch.id, flt, POLICY)
    page, total = service.queue_page(session, batch.id, flt, POLICY, 2, 1)
    assert [i.id for i in page] == [got[1].id, got[2].id] and total == 4


def test_each_model_version_ranks_at_its_own_cut_off(session):
    """Cells of two model versions (and of one the registry no longer knows) in one queue."""
    policy = CallPolicy(abnormal_threshold=0.5, uncertainty_band=0.1, cutoffs={"v-low": 0.3, "v-high": 0.9})
    cells = [0.05, 0.5, 0.85, 0.99, 0.5, 0.32, 0.5]
    versions = ["v-low", "v-high", "v-high", "v-high", "v-low", "v-low", MODEL_VERSION]
    batch, items = add_batch(session, cells)
    for item, version in zip(items, versions, strict=True):
        item.prediction.model_version = version
    session.commit()
    got = by_uncertainty(session, batch.id, policy)
    # 0.5 at the fallback 0.5 (1), 0.32 at 0.3 (0.97), 0.85 at 0.9 (0.94), 0.5 at 0.3 (0.71), 0.5 at 0.9 (0.56),
    # 0.05 at 0.3 (0.17), 0.99 at 0.9 (0.1)
    assert [i.position for i in got] == [6, 5, 2, 4, 1, 0, 3]
    assert [i.id for i in got] == ranked(items, QueueOrder.UNCERTAINTY, policy)
    scores = [service.uncertainty(i, policy) for i in got]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0
    assert_neighbours_follow(session, [i.id for i in got], batch.id, QueueFilter(order=QueueOrder.UNCERTAINTY), policy)
    # The same cells at one cut-off for all rank otherwise: the order follows the policy, not the rows alone.
    single = by_uncertainty(session, batch.id, CallPolicy(abnormal_threshold=0.5, uncertainty_band=0.1))
    assert [i.position for i in single][:3] == [1, 4, 6]


@pytest.mark.parametrize("cutoff", [0.0, 1.0])
def test_a_cut_off_at_either_end_ranks_without_dividing_by_zero(session, cutoff):
    policy = CallPolicy(abnormal_threshold=cutoff, uncertainty_band=0.1)
    batch, items = add_batch(session, [0.0, 0.5, 1.0, 0.25, 0.75, None])
    got = [i.id for i in by_uncertainty(session, batch.id, policy)]
    assert got == ranked(items, QueueOrder.UNCERTAINTY, policy)
    assert got[0] == items[0 if cutoff == 0.0 else 2].id and got[-1] == items[5].id
    classified = [i for i in got if i != items[5].id]
    assert_neighbours_follow(session, classified, batch.id, QueueFilter(order=QueueOrder.UNCERTAINTY), policy)


@pytest.mark.parametrize(
    ("p", "cutoff", "score"),
    [
        (0.8, 0.8, 1.0), (0.0, 0.8, 0.0), (1.0, 0.8, 0.0), (0.4, 0.8, 0.5), (0.9, 0.8, 0.5),
        (0.5, 0.5, 1.0), (0.25, 0.5, 0.5), (0.0, 0.0, 1.0), (0.5, 0.0, 0.5), (1.0, 1.0, 1.0), (0.5, 1.0, 0.5),
    ],
)  # fmt: skip
def test_uncertainty_is_one_at_the_cut_off_and_zero_at_either_end(p, cutoff, score):
    assert uncertainty_at(p, cutoff) == pytest.approx(score)
