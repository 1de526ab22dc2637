"""Out-of-distribution score and input flags stored with each prediction.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows from before this revision (and models without an OOD model) have no score.
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("in_distribution", sa.Boolean, nullable=True))
        batch.add_column(sa.Column("ood_score", sa.Float, nullable=True))
        batch.add_column(sa.Column("input_flags", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35 and PostgreSQL): copying the table would trip the foreign keys
    # that reviews and batch items hold on it.
    with op.batch_alter_table("predictions", recreate="never") as batch:
        batch.drop_column("input_flags")
        batch.drop_column("ood_score")
        batch.drop_column("in_distribution")
