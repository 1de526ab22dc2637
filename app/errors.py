"""Domain errors: raised by services and the ML core, turned into HTTP problems or CLI messages."""


class PapcadError(Exception):
    """Base class: the message is written for the person who sent the input."""


class InvalidImageError(PapcadError):
    """The bytes are not a usable cell image (not an image, truncated, empty, too big)."""


class DatasetError(PapcadError):
    """A training/evaluation folder does not have the expected layout or content."""


class ModelIntegrityError(PapcadError):
    """A model directory is incomplete or its weights do not match the model card."""


class ChecksumError(PapcadError):
    """A downloaded or local file does not have the expected checksum."""


class ImageTooLargeError(InvalidImageError):
    """The upload is over the configured byte limit."""


class InputError(PapcadError):
    """A field has a value the domain does not accept."""


class NotFoundError(PapcadError):
    """The record does not exist (or is not visible to the caller)."""


class PermissionDeniedError(PapcadError):
    """The caller is known but its role may not do this."""


class AuthenticationError(PapcadError):
    """No valid credentials."""


class ConflictError(PapcadError):
    """The request conflicts with stored state (e.g. an idempotency key reused for other data)."""
