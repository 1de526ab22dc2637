"""What a running server holds: settings, database, classifier, its request batcher and image store."""

import gc
import logging
from dataclasses import dataclass

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.guards import refuse_nul_text
from app.db.migrate import upgrade_to_head
from app.db.models import User
from app.db.session import make_engine, make_probe_engine, make_session_factory
from app.db.startup import wait_for_database
from app.ml.batching import DynamicBatcher
from app.ml.classifier import Classifier
from app.services.calls import CallPolicy
from app.services.explanations import Heatmaps
from app.services.images import ImageStore
from app.services.registry import LiveModels, start_models
from app.worker import Worker

log = logging.getLogger("papcad")


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    classifier: Classifier
    images: ImageStore
    heatmaps: Heatmaps
    batcher: DynamicBatcher
    probe_engine: Engine  # health checks and metrics: never waits on the request pool
    worker: Worker | None = None
    models: LiveModels | None = None  # the registry's active model (and candidate), followed at run time

    @property
    def policy(self) -> CallPolicy:
        """The lab's call policy now: each prediction at its own model's cut-off, following the registry."""
        band, fixed = self.settings.uncertainty_band, self.settings.abnormal_threshold
        if self.models is None:
            if fixed is not None:
                return CallPolicy(fixed, band)
            cutoffs = {part.version: part.abnormal_threshold for part in self.classifier.parts}
            return CallPolicy(self.classifier.abnormal_threshold, band, cutoffs)
        return self.models.policy(band, fixed)

    @classmethod
    def start(cls, settings: Settings, classifier: Classifier | None = None) -> "AppContext":
        """Create folders, migrate the database to head, load (and verify) the model."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.effective_database_url
        wait_for_database(url, settings.db_startup_timeout_seconds)
        upgrade_to_head(url, settings.migration_database_url)
        engine = make_engine(url, settings.pool_size, settings.max_overflow, settings.pool_timeout)
        refuse_nul_text(engine)
        sessions = make_session_factory(engine)
        with sessions() as session:
            if not session.scalar(select(func.count()).select_from(User)):
                log.warning(
                    "No users yet. Create the first administrator: "
                    ".venv/bin/papcad user create --username admin --role admin"
                )
        # The registry's active model (PAPCAD_MODEL_DIR on a first start); followed per batch after that.
        models = start_models(sessions, settings, classifier)
        classifier = models.active()
        context = cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            classifier=classifier,
            images=ImageStore(),
            heatmaps=Heatmaps(models, settings.data_dir / "heatmaps"),
            batcher=DynamicBatcher(
                models, settings.inference_max_batch_size, settings.inference_batch_timeout_ms / 1000
            ),
            probe_engine=make_probe_engine(url),
            models=models,
        )
        if settings.runs_embedded_worker:
            context.worker = Worker(sessions, models, context.images, settings, name="embedded")
            context.worker.start_thread()
        # The model's half a million Python objects live as long as the process: freezing them keeps
        # the garbage collector's full passes (each a pause of every thread, the event loop and health
        # checks included, of about 0.5 s) from walking them again and again under load.
        gc.collect()
        gc.freeze()
        return context

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.batcher.stop()
        if self.models is not None:
            self.models.stop()
        self.engine.dispose()
        self.probe_engine.dispose()

    def work_arrived(self) -> None:
        """Wake the embedded worker (external workers poll the database)."""
        if self.worker is not None:
            self.worker.wake()
