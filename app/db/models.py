"""SQLAlchemy 2 ORM models. The schema itself is owned by the Alembic history in migrations/."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores them without a zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: store UTC-aware datetimes only")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(32))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiClient(Base):
    """A system (typically the LIS) calling the REST API with a key. Only the key's hash is kept."""

    __tablename__ = "api_clients"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class UserSession(Base):
    """A signed-in browser. The cookie holds a random token; only its SHA-256 is kept here, so
    sign-out or an administrator can end the session at once."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(lazy="joined")


class LoginFailure(Base):
    """A failed sign-in, counted per account and per client address to throttle guessing."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    address: Mapped[str] = mapped_column(String(64), index=True)


class StoredImage(Base):
    """An uploaded image, stored once by content hash; its bytes are in ImageData."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    byte_size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ImageData(Base):
    """The bytes of a stored image, in the database so that every server and worker reads them
    with DATABASE_URL alone. A table of its own, so listing predictions never loads image bytes."""

    __tablename__ = "image_data"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Prediction(Base):
    """The model's output for one image. Never updated: reviews are separate rows."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("api_client_id", "idempotency_key", name="uq_predictions_idempotency"),
        UniqueConstraint("user_id", "idempotency_key", name="uq_predictions_user_idempotency"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    accession_id: Mapped[str | None] = mapped_column(String(64), index=True)
    original_filename: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(16))  # app.domain.PredictionSource
    predicted_class: Mapped[str] = mapped_column(String(32))
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    abnormal_probability: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    api_client_id: Mapped[int | None] = mapped_column(ForeignKey("api_clients.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    # Out-of-distribution score (<= 1 typical; None without an OOD model) and what the input checks found
    # (SQL NULL when nothing, so the review queue can filter on it in any database).
    in_distribution: Mapped[bool | None] = mapped_column(Boolean)
    ood_score: Mapped[float | None] = mapped_column(Float)
    input_flags: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    image: Mapped[StoredImage] = relationship(lazy="joined")
    user: Mapped[User | None] = relationship(lazy="joined")
    api_client: Mapped[ApiClient | None] = relationship(lazy="joined")
    reviews: Mapped[list["Review"]] = relationship(order_by="Review.id", lazy="selectin")


class Review(Base):
    """A person's confirmation or override of a prediction."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(16))  # confirm | override
    label: Mapped[str] = mapped_column(String(32))
    comment: Mapped[str | None] = mapped_column(Text)
    # A review of an already reviewed cell amends the one before it, and says why.
    amends_review_id: Mapped[int | None] = mapped_column(ForeignKey("reviews.id"))
    amend_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    reviewer: Mapped[User] = relationship(lazy="joined")


class AuditEvent(Base):
    """Append-only trail (database triggers refuse UPDATE and DELETE)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(96))  # "<ActorKind>:<name>", e.g. "user:dr.x", "worker:host:42"
    action: Mapped[str] = mapped_column(String(64))
    entity_type: Mapped[str | None] = mapped_column(String(32))
    entity_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Batch(Base):
    """Many cells submitted together (e.g. one slide), classified in the background."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128))
    accession_id: Mapped[str | None] = mapped_column(String(64), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    api_client_id: Mapped[int | None] = mapped_column(ForeignKey("api_clients.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    user: Mapped[User | None] = relationship(lazy="joined")
    api_client: Mapped[ApiClient | None] = relationship(lazy="joined")


class BatchItem(Base):
    """One cell of a batch: queued -> processing (leased to a worker) -> classified | failed."""

    __tablename__ = "batch_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(255))
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"))
    status: Mapped[str] = mapped_column(String(16), index=True)  # app.domain.ItemStatus
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"), unique=True)
    qc_sample: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    image: Mapped[StoredImage | None] = relationship(lazy="joined")
    prediction: Mapped[Prediction | None] = relationship(lazy="joined")


class Case(Base):
    """A specimen (LIS accession): all its cells, from single uploads and batches. The row exists once
    someone acts on the case (referral, sign-out); the cells are found by their accession id."""

    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(primary_key=True)
    accession_id: Mapped[str] = mapped_column(String(64), unique=True)
    referred_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    referred_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    referral_note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    referred_by: Mapped[User | None] = relationship(lazy="joined")
    reports: Mapped[list["CaseReport"]] = relationship(order_by="CaseReport.sequence", lazy="selectin")


class CaseReport(Base):
    """A sign-out (sequence 1) or an amendment of it (2, 3, ...). Never updated: an amendment is a new
    row beside the original."""

    __tablename__ = "case_reports"
    __table_args__ = (UniqueConstraint("case_id", "sequence", name="uq_case_reports_sequence"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # sign_out | amendment
    interpretation: Mapped[str] = mapped_column(String(32))
    suggested: Mapped[str] = mapped_column(String(32))  # the rule's suggestion when it was written
    comment: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)  # why it was amended
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    author: Mapped[User] = relationship(lazy="joined")


class ModelVersion(Base):
    """A model directory the server knows: candidate (registered, scored in shadow), active (serving) or
    retired. Every change of status is also on the audit trail."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    directory: Mapped[str] = mapped_column(String(1024))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)  # app.domain.ModelStatus
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the model card as registered, for the admin page
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    changed_by: Mapped[str] = mapped_column(String(96))
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ShadowPrediction(Base):
    """A candidate model's silent call on a cell that the active model classified; never shown to a
    reviewer, only compared with the final label on the monitoring page."""

    __tablename__ = "shadow_predictions"
    __table_args__ = (UniqueConstraint("prediction_id", "weights_sha256", name="uq_shadow_predictions_model"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    predicted_class: Mapped[str] = mapped_column(String(32))
    abnormal_probability: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
