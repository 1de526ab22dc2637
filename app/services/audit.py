"""The append-only audit trail: who did what to which record, reads (lists and reports included)
and refused credentials."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import AuditEvent
from app.services.actors import Actor


def record(
    session: Session,
    actor: Actor,
    action: str,
    entity_type: str | None = None,
    entity_id: object = None,
    **detail: object,
) -> None:
    """Add an event to the caller's transaction: it is stored only if the action itself is."""
    session.add(
        AuditEvent(
            actor=actor.label,
            action=action,
            entity_type=entity_type,
            entity_id=None if entity_id is None else str(entity_id),
            detail=detail or None,
        )
    )


def record_apart(
    session: Session,
    actor: Actor,
    action: str,
    entity_type: str | None = None,
    entity_id: object = None,
    **detail: object,
) -> None:
    """Store an event at once in its own short transaction, whatever becomes of the caller's:
    failed sign-ins and refused credentials end in an error, yet must stay on the trail."""
    with Session(session.get_bind()) as separate:
        record(separate, actor, action, entity_type, entity_id, **detail)
        separate.commit()


def record_read(
    session: Session,
    actor: Actor,
    action: str,
    entity_type: str | None = None,
    entity_id: object = None,
    **detail: object,
) -> None:
    """Store a read (a list, a gallery, a report) that changes nothing else: record and commit."""
    record(session, actor, action, entity_type, entity_id, **detail)
    session.commit()


def events_for(session: Session, entity_type: str, entity_id: object) -> list[AuditEvent]:
    query = (
        select(AuditEvent)
        .where(AuditEvent.entity_type == entity_type, AuditEvent.entity_id == str(entity_id))
        .order_by(AuditEvent.id)
    )
    return list(session.scalars(query))
