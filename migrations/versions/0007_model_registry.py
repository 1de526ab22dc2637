"""Model registry: versions, status and who changed it; shadow predictions.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.String(64), nullable=False, unique=True),
        sa.Column("directory", sa.String(1024), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("card", sa.JSON, nullable=True),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("changed_by", sa.String(96), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('candidate', 'active', 'retired')", name="ck_model_versions_status"),
    )
    op.create_table(
        "shadow_predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "prediction_id", sa.Integer, sa.ForeignKey("predictions.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("model_version", sa.String(64), nullable=False, index=True),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("predicted_class", sa.String(32), nullable=False),
        sa.Column("abnormal_probability", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("prediction_id", "weights_sha256", name="uq_shadow_predictions_model"),
    )


def downgrade() -> None:
    op.drop_table("shadow_predictions")
    op.drop_table("model_versions")
