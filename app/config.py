"""Settings from environment variables (`PAPCAD_*`, `DATABASE_URL`) or a `.env` file."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# A checkout, an editable install and the test suite keep migrations/ and model_store/ beside the package; a
# non-editable install (the Docker image) does not, and names their folder in PAPCAD_RESOURCE_DIR instead.
BESIDE_PACKAGE = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = Path("model_store") / "resnet50-herlev-r128-v4"
DEFAULT_MODEL_DIR = BESIDE_PACKAGE / BUNDLED_MODEL


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAPCAD_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="The SQLite file and the heatmap cache.")
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "PAPCAD_DATABASE_URL"),
        description="SQLAlchemy URL; default: SQLite file in data_dir.",
    )
    resource_dir: Path = Field(
        default=BESIDE_PACKAGE, description="The folder with migrations/ and model_store/; default: beside the package."
    )
    # Derived from resource_dir unless set: a derived model_dir is not "set explicitly" for the registry.
    model_dir: Path = Field(
        default_factory=lambda data: data["resource_dir"] / BUNDLED_MODEL,
        description="The model a first start registers and serves; default: the bundled one.",
    )
    migrations_dir: Path = Field(
        default_factory=lambda data: data["resource_dir"] / "migrations",
        description="The Alembic migrations (env.py and versions/) that start-up applies.",
    )
    max_upload_bytes: int = 20 * 1024 * 1024
    max_batch_upload_bytes: int = Field(
        default=512 * 1024 * 1024, description="Largest batch request body (many images or one zip)."
    )
    max_request_bytes: int = Field(default=1024 * 1024, description="Largest body of any other request (JSON, forms).")
    db_startup_timeout_seconds: float = Field(
        default=30, ge=0, description="How long start-up retries an unreachable database before giving up."
    )
    max_image_pixels: int = 25_000_000
    cookie_secure: bool = Field(default=False, description="Send the session cookie over HTTPS only.")
    session_max_age_seconds: int = Field(
        default=8 * 3600, ge=60, description="A browser session ends this long after sign-in, however active."
    )
    session_idle_seconds: int = Field(
        default=30 * 60, ge=60, description="A browser session ends after this long without a request."
    )
    migration_database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PAPCAD_MIGRATION_DATABASE_URL", "migration_database_url"),
        description="URL of the role that owns the schema, for migrations; default: DATABASE_URL.",
    )
    login_max_failures_per_account: int = Field(
        default=5, ge=1, description="Failed sign-ins of one account within the window before it is throttled."
    )
    login_max_failures_per_address: int = Field(
        default=20, ge=1, description="Failed sign-ins from one client address within the window before throttling."
    )
    login_failure_window_seconds: int = Field(default=15 * 60, ge=1, description="The sign-in throttling window.")

    # Calls
    abnormal_threshold: float | None = Field(
        default=None, ge=0, le=1, description="P(abnormal) cut-off; default: the model card's validation choice."
    )
    uncertainty_band: float = Field(
        default=0.1, ge=0, le=0.5, description="Cells with |P(abnormal) - threshold| within this need review."
    )

    # Batches
    max_batch_items: int = 5000
    max_archive_expanded_bytes: int = 512 * 1024 * 1024
    embedded_worker: bool | None = Field(
        default=None, description="Classify batches inside the server; default: on for SQLite, off otherwise."
    )
    worker_batch_size: int = 32
    worker_lease_seconds: int = 120
    worker_max_attempts: int = 3
    qc_share: float = Field(default=0.05, ge=0, le=1, description="Share of confident normal calls sent to QC.")
    qc_max_abnormal_probability: float = Field(default=0.1, ge=0, le=1)

    # Load: database pool, admission control, dynamic batching of single-cell requests
    pool_size: int = Field(default=10, ge=1, description="Database connections kept open per process.")
    max_overflow: int = Field(default=10, ge=0, description="Extra connections opened under load.")
    pool_timeout: float = Field(
        default=10, gt=0, description="Seconds a request waits for a free connection before a 503 with Retry-After."
    )
    max_in_flight: int = Field(
        default=64, ge=1, description="Classifying requests served at once; more get a 503 with Retry-After at once."
    )
    retry_after_seconds: int = Field(default=1, ge=1, description="Retry-After sent with load-shedding 503s.")
    inference_max_batch_size: int = Field(
        default=32, ge=1, description="Simultaneous single-cell requests classified in one forward pass."
    )
    inference_batch_timeout_ms: float = Field(
        default=5, ge=0, description="How long the first request of a batch waits for others to join it."
    )
    # Read from the environment by app.ml.runtime when a model is loaded (server, workers, registry reloads);
    # declared here so that a wrong value stops start-up with a clear message.
    inference_precision: Literal["auto", "float32", "bfloat16", "int8", "float16"] = Field(
        default="auto",
        description="Network arithmetic: auto = the model card's choice (on LiteRT: int8 weights when their check "
        "passed, else float16 weights when theirs did), else float32.",
    )
    inference_max_images_per_pass: int = Field(
        default=8, ge=1, description="Network inputs (cells x test-time views) per forward call; bounds peak memory."
    )

    # Model registry
    registry_poll_seconds: float = Field(
        default=5, gt=0, description="How often a server or worker checks the registry for a promoted model."
    )

    @property
    def runs_embedded_worker(self) -> bool:
        if self.embedded_worker is not None:
            return self.embedded_worker
        return self.effective_database_url.startswith("sqlite")

    @property
    def image_dir(self) -> Path:
        """Where images were kept as files before they moved into the database (read by migration 0003)."""
        return self.data_dir / "images"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'papcad.db').as_posix()}"

    @property
    def effective_migration_database_url(self) -> str:
        return self.migration_database_url or self.effective_database_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
