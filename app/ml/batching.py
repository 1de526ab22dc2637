"""Dynamic batching: single-cell requests that arrive together share one forward pass.

A forward pass over 32 cells costs far less than 32 passes over one, so under load the server
collects the images of simultaneous requests into one `predict` call, like TF Serving's batching:
a batch closes when it holds `max_batch_size` images or when its first image has waited
`batch_timeout_s`. Each caller gets its own result (or its own error) back. No HTTP, no database.
"""

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("papcad.batching")


class BatchPredictor(Protocol):
    """What the batcher drives: `Classifier` (list of images in, one result each out, in order)."""

    def predict(self, images: Sequence[Any]) -> list[Any]: ...


class BatcherStopped(RuntimeError):
    """The batcher was shut down before this image was classified."""


@dataclass
class _Job:
    image: Any
    future: "Future[Any]" = field(default_factory=Future)


class DynamicBatcher:
    """Runs `classifier.predict(list_of_images)` on one thread, over batches of concurrent
    callers' images, and hands each caller its result object unchanged."""

    def __init__(
        self,
        classifier: BatchPredictor,
        max_batch_size: int = 32,
        batch_timeout_s: float = 0.005,
        name: str = "papcad-batcher",
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = max(0.0, batch_timeout_s)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._stopped = False
        self.batches_run = 0  # forward calls made: observability and tests
        self.seconds_per_image: float | None = None  # moving average of the model's cost per image
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, image: Any) -> "Future[Any]":
        """Queue one image; the future resolves to its result or raises its own error."""
        job = _Job(image)
        with self._lock:
            if self._stopped:
                raise BatcherStopped("the classifier is shutting down")
            self._queue.put(job)
        return job.future

    def predict(self, image: Any, timeout: float | None = None) -> Any:
        """Classify one image with whatever else is waiting (blocks the calling thread)."""
        return self.submit(image).result(timeout)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 30) -> None:
        """Finish the batches already queued, then end the thread; later submits are refused."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._queue.put(None)
        self._thread.join(timeout)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus whatever joins before the batch is full or its wait is over."""
        jobs = [first]
        deadline = time.monotonic() + self.batch_timeout_s
        while len(jobs) < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            jobs, stopping = self._collect(first)
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if jobs:
                self._run_batch(jobs)

    def _run_batch(self, jobs: list[_Job]) -> None:
        self.batches_run += 1
        start = time.perf_counter()
        try:
            results = self.classifier.predict([job.image for job in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"predict returned {len(results)} results for {len(jobs)} images")
            self._observe((time.perf_counter() - start) / len(jobs))
        except BaseException as exc:  # noqa: BLE001 - isolate the failing image(s) from the others
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            log.info("batch of %d failed (%s); classifying one by one", len(jobs), type(exc).__name__)
            for job in jobs:
                self._run_alone(job)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)

    def _observe(self, seconds_per_image: float) -> None:
        """Keep a moving average, so admission control can tell clients when to come back."""
        previous = self.seconds_per_image
        self.seconds_per_image = seconds_per_image if previous is None else 0.7 * previous + 0.3 * seconds_per_image

    def _run_alone(self, job: _Job) -> None:
        self.batches_run += 1
        try:
            job.future.set_result(self.classifier.predict([job.image])[0])
        except BaseException as exc:  # noqa: BLE001 - the error belongs to this caller only
            job.future.set_exception(exc)
