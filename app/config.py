"""Settings from environment variables (`PAPCAD_*`, `DATABASE_URL`) or a `.env` file."""

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = PROJECT_ROOT / "model_store" / "resnet50-herlev-r128-v1"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAPCAD_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Stored images and the SQLite file.")
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "PAPCAD_DATABASE_URL"),
        description="SQLAlchemy URL; default: SQLite file in data_dir.",
    )
    model_dir: Path = DEFAULT_MODEL_DIR
    secret_key: str | None = Field(
        default=None, description="Signs session cookies; default: a random key kept in data_dir/secret_key."
    )
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    cookie_secure: bool = Field(default=False, description="Send the session cookie over HTTPS only.")
    session_max_age_seconds: int = 8 * 3600

    @property
    def image_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'papcad.db').as_posix()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
