"""Secrets: password policy and hashing (argon2), API keys and session tokens (random, stored as
SHA-256), CSRF tokens."""

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from zxcvbn import zxcvbn

_hasher = PasswordHasher()

API_KEY_PREFIX = "pcad"
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 256  # argon2 takes any length; this only bounds the work per attempt
MIN_PASSWORD_SCORE = 3  # zxcvbn: 0 (guessable) .. 4 (very unguessable)


def password_problem(password: str, username: str = "") -> str | None:
    """Why this password is refused, in words for the person choosing it, or None if it is fine."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"password must have at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"password must have at most {MAX_PASSWORD_LENGTH} characters"
    if not password.strip():
        return "password must not be only spaces"
    if password.strip().isdigit():
        return "password must not be only digits"
    name = username.strip().casefold()
    if name and (password.strip().casefold() == name or (len(name) >= 4 and name in password.casefold())):
        return "password must not be or contain the username"
    # zxcvbn's cost grows with length; scoring the first 100 characters is plenty.
    result = zxcvbn(password[:100], user_inputs=[username, "papcad", "pap", "cytology", "herlev"])
    if result["score"] < MIN_PASSWORD_SCORE:
        hint = result["feedback"].get("warning") or " ".join(result["feedback"].get("suggestions", []))
        return "password is too easy to guess" + (f": {hint}" if hint else "; use a longer, less common phrase")
    return None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


# A fixed hash to verify against when the user does not exist, so timing does not reveal names.
DUMMY_PASSWORD_HASH = hash_password("not-a-real-password")


def new_api_key() -> tuple[str, str, str]:
    """(full key, lookup prefix, SHA-256 hash). The full key is shown once and never stored.

    API keys are 256-bit random, so a fast hash is safe here, unlike passwords.
    """
    lookup = secrets.token_hex(6)
    key = f"{API_KEY_PREFIX}_{lookup}_{secrets.token_urlsafe(32)}"
    return key, lookup, hash_api_key(key)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_lookup(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or len(parts[1]) != 12:
        return None
    return parts[1]


def api_key_matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_api_key(key), stored_hash)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    if not expected or not given:
        return False
    return hmac.compare_digest(expected, given)


def new_session_token() -> tuple[str, str]:
    """(token for the cookie, SHA-256 hash for the database): 256 random bits, never stored in clear."""
    token = secrets.token_urlsafe(32)
    return token, hash_session_token(token)


def hash_session_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
