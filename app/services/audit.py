"""The append-only audit trail: who did what to which record, reads of predictions included."""

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


def events_for(session: Session, entity_type: str, entity_id: object) -> list[AuditEvent]:
    query = (
        select(AuditEvent)
        .where(AuditEvent.entity_type == entity_type, AuditEvent.entity_id == str(entity_id))
        .order_by(AuditEvent.id)
    )
    return list(session.scalars(query))
