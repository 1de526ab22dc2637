"""What a running server holds: settings, database, classifier and image store."""

import logging
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.migrate import upgrade_to_head
from app.db.models import User
from app.db.session import make_engine, make_session_factory
from app.ml.classifier import Classifier
from app.services.explanations import Heatmaps
from app.services.images import ImageStore
from app.services.predictions import CallPolicy
from app.worker import Worker

log = logging.getLogger("papcad")


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    classifier: Classifier
    images: ImageStore
    policy: CallPolicy
    heatmaps: Heatmaps
    worker: Worker | None = None

    @classmethod
    def start(cls, settings: Settings, classifier: Classifier | None = None) -> "AppContext":
        """Create folders, migrate the database to head, load (and verify) the model."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.image_dir.mkdir(parents=True, exist_ok=True)
        url = settings.effective_database_url
        upgrade_to_head(url)
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        with sessions() as session:
            if not session.scalar(select(func.count()).select_from(User)):
                log.warning(
                    "No users yet. Create the first administrator: papcad user create --username admin --role admin"
                )
        classifier = classifier or Classifier.load(settings.model_dir)
        threshold = settings.abnormal_threshold
        context = cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            classifier=classifier,
            images=ImageStore(settings.image_dir),
            policy=CallPolicy(
                classifier.abnormal_threshold if threshold is None else threshold, settings.uncertainty_band
            ),
            heatmaps=Heatmaps(classifier, settings.data_dir / "heatmaps"),
        )
        if settings.runs_embedded_worker:
            context.worker = Worker(sessions, context.classifier, context.images, settings, name="embedded")
            context.worker.start_thread()
        return context

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.engine.dispose()

    def work_arrived(self) -> None:
        """Wake the embedded worker (external workers poll the database)."""
        if self.worker is not None:
            self.worker.wake()


def session_secret(settings: Settings) -> str:
    """The configured secret, or one generated once and kept (mode 600) in the data directory."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.data_dir / "secret_key"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()
