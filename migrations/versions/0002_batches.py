"""Batches of cells and their items, claimed by workers with a lease.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128)),
        sa.Column("accession_id", sa.String(64), index=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id")),
        sa.Column("api_client_id", sa.Integer, sa.ForeignKey("api_clients.id")),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "batch_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("batch_id", sa.Integer, sa.ForeignKey("batches.id"), nullable=False, index=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id")),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("error", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(128)),
        sa.Column("lease_token", sa.String(36)),
        sa.Column("lease_expires_at", TS),
        sa.Column("prediction_id", sa.Integer, sa.ForeignKey("predictions.id"), unique=True),
        sa.Column("qc_sample", sa.Boolean, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("batch_items")
    op.drop_table("batches")
