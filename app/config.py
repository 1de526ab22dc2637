"""Settings from environment variables (`PAPCAD_*`, `DATABASE_URL`) or a `.env` file."""

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = PROJECT_ROOT / "model_store" / "resnet50-herlev-r128-v2"


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

    # Calls
    abnormal_threshold: float | None = Field(
        default=None, ge=0, le=1, description="P(abnormal) cut-off; default: the model card's validation choice."
    )
    uncertainty_band: float = Field(
        default=0.1, ge=0, le=0.5, description="Cells with |P(abnormal) - threshold| within this need review."
    )

    # Batches
    max_batch_items: int = 5000
    max_archive_expanded_bytes: int = 1024 * 1024 * 1024
    embedded_worker: bool | None = Field(
        default=None, description="Classify batches inside the server; default: on for SQLite, off otherwise."
    )
    worker_batch_size: int = 32
    worker_lease_seconds: int = 120
    worker_max_attempts: int = 3
    qc_share: float = Field(default=0.05, ge=0, le=1, description="Share of confident normal calls sent to QC.")
    qc_max_abnormal_probability: float = Field(default=0.1, ge=0, le=1)

    @property
    def runs_embedded_worker(self) -> bool:
        if self.embedded_worker is not None:
            return self.embedded_worker
        return self.effective_database_url.startswith("sqlite")

    @property
    def image_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'papcad.db').as_posix()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
