"""Who is acting: a signed-in person, an API client (LIS), a batch worker, or the system itself."""

from dataclasses import dataclass

from app.db.models import ApiClient, User
from app.domain import ActorKind
from app.roles import ADMIN_ROLES, REVIEWER_ROLES


@dataclass(frozen=True)
class Actor:
    kind: ActorKind
    id: int | None
    name: str
    role: str | None = None

    @classmethod
    def of_user(cls, user: User) -> "Actor":
        return cls(ActorKind.USER, user.id, user.username, user.role)

    @classmethod
    def of_client(cls, client: ApiClient) -> "Actor":
        return cls(ActorKind.APIKEY, client.id, client.name, None)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def can_review(self) -> bool:
        return self.kind == ActorKind.USER and self.role in REVIEWER_ROLES

    @property
    def is_admin(self) -> bool:
        return self.kind == ActorKind.USER and self.role in ADMIN_ROLES


SYSTEM = Actor(ActorKind.SYSTEM, None, "papcad")
ANONYMOUS = Actor(ActorKind.ANONYMOUS, None, "?")


def worker_actor(name: str) -> Actor:
    """A batch worker process: it stores predictions on behalf of the batch's submitter."""
    return Actor(ActorKind.WORKER, None, name)
