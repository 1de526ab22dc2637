"""Reviews of single cells: confirm, override, amend with a reason, undo within the minute, and
the lock on the cells of a signed-out case."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import AuditEvent, Case, CaseReport, Review
from app.errors import ConflictError, InputError, NotFoundError, PermissionDeniedError
from app.services import reviews
from app.services.predictions import final_label
from tests.services.conftest import add_user, fake_prediction

NORMAL, ABNORMAL = "normal_intermediate", "severe_dysplastic"


@pytest.fixture
def cell(session: Session):
    prediction = fake_prediction(session, 0.1, accession_id="S-REV", predicted_class=NORMAL)
    session.commit()
    return prediction


@pytest.fixture
def reviewer(session: Session):
    return add_user(session, "ct.one", "cytotechnologist")


def actions(session: Session) -> list[str]:
    return list(session.scalars(select(AuditEvent.action).where(AuditEvent.action.like("review.%"))))


def test_confirm_override_and_amend(session, cell, reviewer):
    confirmed = reviews.add_review(session, reviewer, cell.id, "confirm", None, "looks normal")
    assert confirmed.label == NORMAL and final_label(cell) == NORMAL
    with pytest.raises(InputError, match="give a reason"):
        reviews.add_review(session, reviewer, cell.id, "override", ABNORMAL, None)
    session.rollback()
    amended = reviews.add_review(session, reviewer, cell.id, "override", ABNORMAL, None, reason="second look")
    assert amended.amends_review_id == confirmed.id and final_label(cell) == ABNORMAL
    assert actions(session) == ["review.confirm", "review.override"]


@pytest.mark.parametrize(
    ("action", "label", "reason", "error"),
    [
        ("confirm", ABNORMAL, None, InputError),  # a confirmation keeps the model's class
        ("override", NORMAL, None, InputError),  # the override equals the call
        ("override", "unicorn", None, InputError),
        ("approve", None, None, InputError),
        ("confirm", None, "no earlier review", InputError),
    ],
)
def test_bad_reviews_are_refused_and_store_nothing(session, cell, reviewer, action, label, reason, error):
    with pytest.raises(error):
        reviews.add_review(session, reviewer, cell.id, action, label, None, reason)
    session.rollback()
    assert session.scalars(select(Review)).all() == [] and actions(session) == []


def test_only_reviewers_review(session, cell):
    admin = add_user(session, "admin.one", "admin")
    with pytest.raises(PermissionDeniedError):
        reviews.add_review(session, admin, cell.id, "confirm", None, None)
    with pytest.raises(NotFoundError):
        reviews.add_review(session, add_user(session, "dr.x"), cell.id + 1000, "confirm", None, None)


def test_undo_within_the_minute_by_the_reviewer_only(session, cell, reviewer):
    review = reviews.add_review(session, reviewer, cell.id, "confirm", None, None)
    assert reviews.undoable(session, reviewer).id == review.id
    colleague = add_user(session, "ct.two", "cytotechnologist")
    assert reviews.undoable(session, colleague) is None
    with pytest.raises(PermissionDeniedError):
        reviews.undo_review(session, colleague, cell.id, review.id)
    reviews.undo_review(session, reviewer, cell.id, review.id)
    assert cell.reviews == [] and final_label(cell) is None
    assert actions(session) == ["review.confirm", "review.undo"]
    with pytest.raises(NotFoundError):
        reviews.undo_review(session, reviewer, cell.id, review.id)


def test_undo_only_the_latest_review_and_not_after_the_minute(session, cell, reviewer):
    first = reviews.add_review(session, reviewer, cell.id, "confirm", None, None)
    second = reviews.add_review(session, reviewer, cell.id, "override", ABNORMAL, None, reason="on reflection")
    with pytest.raises(ConflictError, match="latest"):
        reviews.undo_review(session, reviewer, cell.id, first.id)
    old = datetime.now(UTC) - timedelta(seconds=reviews.UNDO_SECONDS + 1)
    session.execute(update(Review).where(Review.id == second.id).values(created_at=old))
    session.commit()
    session.expire_all()
    assert reviews.undoable(session, reviewer) is None
    with pytest.raises(ConflictError, match="seconds"):
        reviews.undo_review(session, reviewer, cell.id, second.id)
    assert final_label(cell) == ABNORMAL


def test_cells_of_a_signed_out_case_are_locked(session, cell, reviewer):
    review = reviews.add_review(session, reviewer, cell.id, "confirm", None, None)
    pathologist = add_user(session, "dr.sign", "pathologist")
    case = Case(accession_id="S-REV")
    session.add(case)
    session.flush()
    session.add(CaseReport(case_id=case.id, sequence=1, kind="sign_out", interpretation="NILM", suggested="NILM",
                           author_id=pathologist.id))  # fmt: skip
    session.commit()
    assert reviews.undoable(session, reviewer) is None
    with pytest.raises(ConflictError, match="signed out"):
        reviews.undo_review(session, reviewer, cell.id, review.id)
    session.rollback()
    with pytest.raises(ConflictError, match="signed out"):
        reviews.add_review(session, pathologist, cell.id, "override", ABNORMAL, None, reason="late change")
    session.rollback()
    other = fake_prediction(session, 0.2, accession_id="S-OTHER", predicted_class=NORMAL)
    session.commit()
    assert reviews.add_review(session, reviewer, other.id, "confirm", None, None).label == NORMAL
