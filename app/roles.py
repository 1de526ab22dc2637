"""Roles and what each may do."""

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    PATHOLOGIST = "pathologist"
    CYTOTECHNOLOGIST = "cytotechnologist"


REVIEWER_ROLES = frozenset({Role.PATHOLOGIST, Role.CYTOTECHNOLOGIST})
ADMIN_ROLES = frozenset({Role.ADMIN})
