"""Who is acting: a signed-in person, an API client (LIS), or the system itself."""

from dataclasses import dataclass

from app.db.models import ApiClient, User
from app.roles import ADMIN_ROLES, REVIEWER_ROLES


@dataclass(frozen=True)
class Actor:
    kind: str  # user | apikey | system
    id: int | None
    name: str
    role: str | None = None

    @classmethod
    def of_user(cls, user: User) -> "Actor":
        return cls("user", user.id, user.username, user.role)

    @classmethod
    def of_client(cls, client: ApiClient) -> "Actor":
        return cls("apikey", client.id, client.name, None)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def can_review(self) -> bool:
        return self.kind == "user" and self.role in REVIEWER_ROLES

    @property
    def is_admin(self) -> bool:
        return self.kind == "user" and self.role in ADMIN_ROLES


SYSTEM = Actor("system", None, "papcad")
