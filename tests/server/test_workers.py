"""Two `papcad worker` processes on PostgreSQL; one is killed mid-batch; every cell ends up
classified exactly once."""

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from app.config import Settings
from app.context import AppContext
from app.services import batches
from app.services.actors import SYSTEM

pytestmark = [pytest.mark.slow, pytest.mark.workers, pytest.mark.cli]

CLASSES = ["normal_intermediate", "normal_columnar", "light_dysplastic", "moderate_dysplastic", "carcinoma_in_situ"]


def start_worker(name: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--name", name, "--batch-size", "2", "--lease-seconds", "8"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_worker_loses_nothing_and_nothing_is_classified_twice(
    postgres_url, bundled_classifier, herlev_image, tmp_path
):
    settings = Settings(data_dir=tmp_path, database_url=postgres_url, embedded_worker=False)
    context = AppContext.start(settings, classifier=bundled_classifier)
    files = [
        batches.IncomingFile(p.name, p.read_bytes()) for c in CLASSES for p in [herlev_image(c, i) for i in range(6)]
    ]
    with context.sessions() as session:
        batch = batches.create_batch(session, context.images, settings, SYSTEM, files, "kill test", "S26-KILL")

    # The workers share only the database with the server: their data folder is another, empty one.
    other = tmp_path / "worker-data"
    env = {**os.environ, "DATABASE_URL": postgres_url, "PAPCAD_DATA_DIR": str(other), "PAPCAD_EMBEDDED_WORKER": "0"}
    workers = {name: start_worker(name, env) for name in ("worker-a", "worker-b")}

    def rows(sql: str, **params) -> list:
        with context.engine.connect() as connection:
            return connection.execute(text(sql), {"b": batch.id, **params}).all()

    try:
        # Kill a worker in the middle of its work: freeze one that has stored results, and kill it
        # if it holds a live lease at that moment (else let it go on and look again).
        deadline = time.monotonic() + 300
        victim, orphaned = None, set()
        while not orphaned:
            assert time.monotonic() < deadline, "workers did not get going"
            for name, process in workers.items():
                assert process.poll() is None, f"{name} exited: {process.stderr.read()}"
            done_by = {w for (w,) in rows("SELECT worker FROM batch_items WHERE batch_id=:b AND status='classified'")}
            for name in done_by & set(workers):
                workers[name].send_signal(signal.SIGSTOP)
                held = rows(
                    "SELECT id FROM batch_items WHERE batch_id=:b AND worker=:w AND status='processing'", w=name
                )
                if held:
                    victim, orphaned = name, {i for (i,) in held}
                    workers[name].send_signal(signal.SIGKILL)
                    workers[name].wait(10)
                    break
                workers[name].send_signal(signal.SIGCONT)
            time.sleep(0.05)
        assert orphaned, "the killed worker held no lease"

        deadline = time.monotonic() + 300
        while rows("SELECT id FROM batch_items WHERE batch_id=:b AND status IN ('queued', 'processing')"):
            assert time.monotonic() < deadline, "the surviving worker did not finish the batch"
            time.sleep(0.5)
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.terminate()
                process.wait(30)

    items = rows("SELECT id, status, prediction_id, worker, attempts FROM batch_items WHERE batch_id=:b")
    assert len(items) == len(files)
    assert all(status == "classified" and prediction_id for _, status, prediction_id, _, _ in items)
    survivor = next(name for name in workers if name != victim)
    taken_over = [i for i in items if i[0] in orphaned]
    assert all(worker == survivor and attempts == 2 for _, _, _, worker, attempts in taken_over)
    predictions = rows(
        "SELECT p.id FROM predictions p JOIN batch_items i ON i.prediction_id = p.id WHERE i.batch_id=:b"
    )
    all_batch_predictions = rows("SELECT id FROM predictions WHERE source='batch'")
    assert len(predictions) == len(files) == len(all_batch_predictions)
    assert len({p for (p,) in predictions}) == len(files)
    with context.sessions() as session:
        assert batches.progress(session, batch.id).classified == len(files)
    context.stop()
