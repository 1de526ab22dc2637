"""The fixed vocabularies of the domain, as StrEnums.

Each member is its stored string (columns stay plain strings, so no migration), and compares equal to
it: `ItemStatus.QUEUED == "queued"`. Code, API schemas and templates use the members; rows read back
from the database hold the plain strings, which compare equal.
"""

from enum import StrEnum


class ItemStatus(StrEnum):
    """A batch item: queued -> processing (leased to a worker) -> classified | failed."""

    QUEUED = "queued"
    PROCESSING = "processing"
    CLASSIFIED = "classified"
    FAILED = "failed"


PENDING_ITEM_STATUSES = (ItemStatus.QUEUED, ItemStatus.PROCESSING)


class BatchStatus(StrEnum):
    """A batch as a whole: processing while any item is queued or processing, then done."""

    PROCESSING = "processing"
    DONE = "done"


class CaseStatus(StrEnum):
    """open (nothing reviewed) -> in review -> [referred] -> signed out."""

    OPEN = "open"
    IN_REVIEW = "in_review"
    REFERRED = "referred"
    SIGNED_OUT = "signed_out"


class ActorKind(StrEnum):
    """Who acts: a signed-in person, an API client (LIS), a batch worker process, PapCAD itself, or an
    unidentified caller (a refused credential or sign-in, on the audit trail only)."""

    USER = "user"
    APIKEY = "apikey"
    WORKER = "worker"
    SYSTEM = "system"
    ANONYMOUS = "anonymous"


class PredictionSource(StrEnum):
    """The path a cell came in by: the upload page, the REST API, or a batch."""

    WEB = "web"
    API = "api"
    BATCH = "batch"


class ModelStatus(StrEnum):
    """A registered model version: scored in shadow, serving, or retired."""

    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


class QueueOrder(StrEnum):
    """How the review queue is ranked."""

    SUSPICION = "suspicion"  # highest P(abnormal) first
    UNCERTAINTY = "uncertainty"  # P(abnormal) nearest the cut-off of the model that made the call first
    POSITION = "position"  # submission order
