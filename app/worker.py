"""The batch worker loop: inside the server (embedded, for SQLite) or as `papcad worker` processes."""

import logging
import os
import socket
import threading

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.services import work_queue
from app.services.images import ImageStore
from app.services.work_queue import BatchClassifier

log = logging.getLogger("papcad.worker")


class Worker:
    """Claims, classifies and stores batch items until stopped; sleeps while the queue is empty.

    It holds a sessionmaker, not a Session: each round opens its own short sessions (see
    app.services.work_queue), so no connection is held while the model runs."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        classifier: BatchClassifier,
        images: ImageStore,
        settings: Settings,
        name: str | None = None,
        idle_seconds: float = 2.0,
    ) -> None:
        self.sessions = sessions
        self.classifier = classifier
        self.images = images
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"
        self.idle_seconds = idle_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """One claim-classify-store round; returns the number of items completed."""
        leases = work_queue.claim(
            self.sessions,
            self.name,
            self.settings.worker_batch_size,
            self.settings.worker_lease_seconds,
            self.settings.worker_max_attempts,
        )
        if not leases:
            return 0
        done = work_queue.process(self.sessions, self.classifier, self.images, self.settings, self.name, leases)
        log.info("%s: %d of %d items done", self.name, done, len(leases))
        return done

    def run_forever(self) -> None:
        log.info("worker %s started", self.name)
        while not self._stop.is_set():
            try:
                busy = self.run_once() > 0
            except Exception:  # keep serving: a database hiccup must not end the worker
                log.exception("worker round failed; retrying")
                busy = False
            if not busy:
                self._wake.wait(self.idle_seconds)
                self._wake.clear()
        log.info("worker %s stopped", self.name)

    def wake(self) -> None:
        """New work arrived: skip the idle wait."""
        self._wake.set()

    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="papcad-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
