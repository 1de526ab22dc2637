"""Uploaded images: checked once, stored once by SHA-256 in the database."""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from PIL import Image
from sqlalchemy import insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db.models import ImageData, StoredImage, utcnow
from app.errors import ImageTooLargeError, InvalidImageError, NotFoundError
from app.ml.preprocessing import open_image

ALLOWED_FORMATS = {"BMP", "PNG", "JPEG", "TIFF"}
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class CheckedImage:
    """Bytes that decoded completely as an allowed image format.

    `image` is the decoded picture as sent (its own mode and bit depth, which the model's input checks
    look at); width and height are those of the upright RGB picture the model and the heatmap see.
    """

    data: bytes
    sha256: str
    format: str
    image: Image.Image
    width: int
    height: int


def read_capped(stream: IO[bytes], cap: int) -> bytes:
    """At most cap + 1 bytes, read in chunks: enough to tell an over-size file without holding all of it."""
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = stream.read(min(READ_CHUNK, cap + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def check_image(data: bytes, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Raise InvalidImageError (or ImageTooLargeError) unless the bytes are a whole, sane image.

    The bytes are decoded once, here; the model is given the decoded picture, not the file again.
    """
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the file is {len(data):,} bytes; the limit is {max_bytes:,}")
    image = open_image(data, max_pixels)
    image_format = image.format or ""
    if image_format not in ALLOWED_FORMATS:
        raise InvalidImageError(f"{image_format or 'this'} images are not accepted; use BMP, PNG, JPEG or TIFF")
    width, height = image.size  # upright, as the model sees it
    return CheckedImage(data, hashlib.sha256(data).hexdigest(), image_format, image, width, height)


class ImageStore:
    """Images kept once by SHA-256 in the database (row in `images`, bytes in `image_data`), so any
    server or worker reads them with DATABASE_URL alone."""

    def put(self, session: Session, checked: CheckedImage) -> StoredImage:
        """The row for these bytes, added in the caller's transaction if new.

        Safe when the same new image arrives many times at once: INSERT ... ON CONFLICT DO NOTHING
        on the unique sha256 lets one transaction add it; the others wait for it and read its row.
        """
        existing = session.scalar(select(StoredImage).where(StoredImage.sha256 == checked.sha256))
        if existing is not None:
            return existing
        upsert = _insert_for(session)(StoredImage.__table__).values(
            sha256=checked.sha256,
            format=checked.format,
            width=checked.width,
            height=checked.height,
            byte_size=len(checked.data),
            created_at=utcnow(),
        )
        new_id = session.execute(
            upsert.on_conflict_do_nothing(index_elements=["sha256"]).returning(StoredImage.__table__.c.id)
        ).scalar()
        if new_id is not None:
            session.execute(insert(ImageData).values(image_id=new_id, data=checked.data))
        return session.scalars(
            select(StoredImage).where(StoredImage.sha256 == checked.sha256).execution_options(populate_existing=True)
        ).one()

    def read(self, session: Session, stored: StoredImage | int) -> bytes:
        """The image's bytes as uploaded; NotFoundError if an image kept before the move to the
        database had lost its file."""
        image_id = stored if isinstance(stored, int) else stored.id
        data = session.scalar(select(ImageData.data).where(ImageData.image_id == image_id))
        if data is None:
            raise NotFoundError(f"the bytes of image {image_id} are not stored")
        return data

    def read_many(self, session: Session, image_ids: list[int]) -> dict[int, bytes]:
        """Bytes of several images in one query (missing ones are left out)."""
        if not image_ids:
            return {}
        rows = session.execute(select(ImageData.image_id, ImageData.data).where(ImageData.image_id.in_(image_ids)))
        return {image_id: data for image_id, data in rows}


def _insert_for(session: Session) -> Callable[..., postgresql.Insert | sqlite.Insert]:
    """The dialect's INSERT with ON CONFLICT (PostgreSQL and SQLite spell it the same way)."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
