"""Uploaded images: checked once, stored once by SHA-256 under the configured directory."""

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import StoredImage
from app.errors import ImageTooLargeError, InvalidImageError
from app.ml.preprocessing import decode_image

ALLOWED_FORMATS = {"BMP", "PNG", "JPEG", "TIFF"}


@dataclass(frozen=True)
class CheckedImage:
    """Bytes that decoded completely as an allowed image format."""

    data: bytes
    sha256: str
    format: str
    image: Image.Image


def check_image(data: bytes, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Raise InvalidImageError (or ImageTooLargeError) unless the bytes are a whole, sane image."""
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the file is {len(data):,} bytes; the limit is {max_bytes:,}")
    image = decode_image(data, max_pixels=max_pixels)
    with Image.open(io.BytesIO(data)) as probe:
        image_format = probe.format or ""
    if image_format not in ALLOWED_FORMATS:
        raise InvalidImageError(f"{image_format or 'this'} images are not accepted; use BMP, PNG, JPEG or TIFF")
    return CheckedImage(data, hashlib.sha256(data).hexdigest(), image_format, image)


class ImageStore:
    """Content-addressed files: <root>/<first two hex digits>/<sha256>.<ext>."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, relative: str) -> Path:
        return self.root / relative

    def put(self, session: Session, checked: CheckedImage) -> tuple[StoredImage, Path | None]:
        """The row for these bytes, adding file and row if new.

        Returns the path of a newly written file (None if it existed) so a failed transaction
        can remove it and leave nothing half-stored.
        """
        existing = session.scalar(select(StoredImage).where(StoredImage.sha256 == checked.sha256))
        if existing is not None:
            return existing, None
        relative = f"{checked.sha256[:2]}/{checked.sha256}.{checked.format.lower()}"
        target = self.root / relative
        written = None
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
                handle.write(checked.data)
            os.replace(handle.name, target)
            written = target
        row = StoredImage(
            sha256=checked.sha256,
            format=checked.format,
            width=checked.image.width,
            height=checked.image.height,
            byte_size=len(checked.data),
            storage_path=relative,
        )
        session.add(row)
        return row, written
