"""Images kept in the database (any worker reads them); idempotency for signed-in users too.

Image bytes move from files under PAPCAD_DATA_DIR/images into the `image_data` table, so a server
or worker needs only DATABASE_URL (and the model). A file that is missing is skipped with a
warning: its image row stays, without bytes. The downgrade writes the bytes back to files.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import logging
import os
import tempfile
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

images = sa.table(
    "images",
    sa.column("id", sa.Integer),
    sa.column("sha256", sa.String),
    sa.column("format", sa.String),
    sa.column("storage_path", sa.String),
)
image_data = sa.table("image_data", sa.column("image_id", sa.Integer), sa.column("data", sa.LargeBinary))


def _image_dir() -> Path:
    """Where the file store kept images: PAPCAD_DATA_DIR/images, as the settings read it."""
    from app.config import Settings

    return Settings().image_dir


def upgrade() -> None:
    op.create_table(
        "image_data",
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(images.c.id, images.c.storage_path).order_by(images.c.id)).all()
    if rows:
        root = _image_dir()
        missing = 0
        for image_id, storage_path in rows:  # one file in memory at a time
            try:
                data = (root / storage_path).read_bytes()
            except OSError:
                missing += 1
                log.warning("image %s: file %s is missing; its row is kept without bytes", image_id, storage_path)
                continue
            connection.execute(image_data.insert().values(image_id=image_id, data=data))
        log.info("moved %d image files from %s into the database (%d missing)", len(rows) - missing, root, missing)
    with op.batch_alter_table("images") as batch:
        batch.drop_column("storage_path")

    # Pairs stored twice by the old race keep the key on their first row only.
    op.execute(
        "UPDATE predictions SET idempotency_key = NULL WHERE user_id IS NOT NULL AND idempotency_key IS NOT NULL "
        "AND id > (SELECT MIN(p2.id) FROM predictions p2 "
        "WHERE p2.user_id = predictions.user_id AND p2.idempotency_key = predictions.idempotency_key)"
    )
    with op.batch_alter_table("predictions") as batch:
        batch.create_unique_constraint("uq_predictions_user_idempotency", ["user_id", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_constraint("uq_predictions_user_idempotency", type_="unique")
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("storage_path", sa.String(255), nullable=True))
    connection = op.get_bind()
    rows = connection.execute(sa.select(images.c.id, images.c.sha256, images.c.format)).all()
    root = _image_dir() if rows else None
    for image_id, sha256, image_format in rows:
        relative = f"{sha256[:2]}/{sha256}.{image_format.lower()}"
        data = connection.execute(sa.select(image_data.c.data).where(image_data.c.image_id == image_id)).scalar()
        if data is not None:
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
                handle.write(data)
            os.replace(handle.name, target)
        connection.execute(images.update().where(images.c.id == image_id).values(storage_path=relative))
    with op.batch_alter_table("images") as batch:
        batch.alter_column("storage_path", existing_type=sa.String(255), nullable=False)
    op.drop_table("image_data")
