"""Reading uploads out of a request: the multipart batch form and the files it carries.

The bytes themselves are read by the services (from the spooled file), on the worker thread that
also checks and stores them, so the event loop never waits on a large file.
"""

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile as ParsedFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import Settings
from app.errors import InputError
from app.services import batches as service

BATCH_FORM_FIELDS = 20  # the text fields of the batch forms, with room to spare


@dataclass
class BatchForm:
    images: list[ParsedFile]
    archive: ParsedFile | None
    fields: dict[str, str]

    def text(self, key: str) -> str | None:
        return self.fields.get(key) or None


@asynccontextmanager
async def batch_form(request: Request, settings: Settings, image_field: str) -> AsyncIterator[BatchForm]:
    """The multipart batch form, parsed with room for PAPCAD_MAX_BATCH_ITEMS files.

    Starlette's parser allows 1,000 files unless told otherwise, and FastAPI's own form parsing
    cannot be told, so the batch routes read their form here. Spooled files are closed on exit.
    """
    try:
        # +1: a browser sends the empty file input it was not given (images or archive) as a part too.
        form = await request.form(max_files=settings.max_batch_items + 1, max_fields=BATCH_FORM_FIELDS)
    except StarletteHTTPException as exc:  # the parser's refusal: too many files or fields, bad multipart
        if "Too many files" in str(exc.detail):
            raise InputError(f"a batch may hold at most {settings.max_batch_items} images") from exc
        raise InputError(f"the form cannot be read: {exc.detail}") from exc
    try:
        uploads = {key: [v for v in form.getlist(key) if isinstance(v, ParsedFile) and v.filename] for key in form}
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        archives = uploads.get("archive", [])
        if len(archives) > 1:
            raise InputError("send one 'archive' zip file")
        yield BatchForm(uploads.get(image_field, []), archives[0] if archives else None, fields)
    finally:
        await form.close()


def incoming_files(
    settings: Settings, images: list[ParsedFile], archive: ParsedFile | None
) -> Iterable[service.IncomingFile]:
    """The submitted files: several image files, or one zip archive (not both), read lazily in create_batch."""
    if bool(images) == bool(archive):
        raise InputError("send either one or more 'image' files or one 'archive' zip file")
    if archive is not None:
        return service.files_from_zip(archive.file, settings)
    if len(images) > settings.max_batch_items:
        raise InputError(f"a batch may hold at most {settings.max_batch_items} images")
    return service.files_from_uploads([(upload.filename, upload.file) for upload in images], settings)
