"""Cases (accessions): referral, sign-out and amendments; review amendments.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("accession_id", sa.String(64), nullable=False, unique=True),
        sa.Column("referred_at", TS),
        sa.Column("referred_by_id", sa.Integer, sa.ForeignKey("users.id")),
        sa.Column("referral_note", sa.Text),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "case_reports",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False, index=True),
        sa.Column("sequence", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("interpretation", sa.String(32), nullable=False),
        sa.Column("suggested", sa.String(32), nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("author_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("case_id", "sequence", name="uq_case_reports_sequence"),
    )
    # Nothing references reviews, so SQLite may copy the table to add the foreign key.
    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("amends_review_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("amend_reason", sa.Text, nullable=True))
        batch.create_foreign_key("fk_reviews_amends_review_id", "reviews", ["amends_review_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.drop_constraint("fk_reviews_amends_review_id", type_="foreignkey")
        batch.drop_column("amend_reason")
        batch.drop_column("amends_review_id")
    op.drop_table("case_reports")
    op.drop_table("cases")
