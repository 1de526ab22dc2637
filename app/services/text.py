"""Free text from clients, made safe to store: no control characters (PostgreSQL refuses NUL)."""

import re

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def strip_control_characters(text: str | None) -> str | None:
    """The text without control characters (for file names, which are shown but never parsed)."""
    if text is None:
        return None
    return CONTROL_CHARACTERS.sub("", text)


def has_control_characters(text: str | None, allow_newlines: bool = False) -> bool:
    """True if the text holds a control character (tab and line breaks allowed when asked)."""
    if not text:
        return False
    if allow_newlines:
        text = text.replace("\t", "").replace("\n", "").replace("\r", "")
    return CONTROL_CHARACTERS.search(text) is not None
