"""Load: N simultaneous uploads against a real server, against the bare batched classifier.

One machine, one run:
  * the server:  `python -m app.cli serve` in a child process (its own RSS), on 127.0.0.1, with the bundled
                 model and default load settings (pool, PAPCAD_MAX_IN_FLIGHT, dynamic batching), on a
                 temporary SQLite file (default) or --database-url (PostgreSQL; an empty database is best);
  * the clients: N uploads of different Herlev cells sent at once from this process (httpx async, API key);
                 `--pairs` of them are sent twice at once with the same Idempotency-Key. A 503 is retried
                 after its Retry-After; any other status is final.
  * throughout:  GET /readyz every 0.25 s (its latency and status), the server's RSS before and after;
  * the bare batched classifier (`Classifier.predict` on batches of 32 of the same images) in this process,
                 just before and just after the load while the server is idle: the load's throughput is
                 compared with their mean;
  * afterwards:  a database check (every 201 stored exactly once, one row per idempotent pair).

    .venv/bin/python bench/bench_load.py [--requests 200] [--pairs 20] [--database-url URL] [--out FILE]

Targets: no 5xx other than 503 with Retry-After; every 201 stored once; server throughput >= 90 % of the bare
batched classifier's; /readyz within 1 s throughout; RSS growth < 300 MB. Results: a table on stdout and
bench/results/load.json (or --out) with the machine's details.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
from common import REPO_ROOT, class_counts, herlev_cells, load_average, machine_info, stats, tta_views, write_json
from sqlalchemy import create_engine, text

from app.config import get_settings
from app.ml.classifier import Classifier

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "load.json"
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 300
READYZ_EVERY_S = 0.25
MAX_ATTEMPTS = 100  # per upload: bounded retries of 503s
BARE_BATCH = 32
MiB = 1024 * 1024


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> dict:
    """Current and peak resident set size of a process, from /proc (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss_mib": fields["VmRSS"] / MiB, "peak_rss_mib": fields["VmHWM"] / MiB}


class ServerProcess:
    """`papcad serve` in a child process, with the environment the operator would set."""

    def __init__(self, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def api_key(self) -> str:
        created = subprocess.run(
            [sys.executable, "-m", "app.cli", "apikey", "create", "--name", f"bench-load-{uuid.uuid4().hex[:8]}"],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return created.stdout.strip().splitlines()[-1]


async def upload(client: httpx.AsyncClient, path: Path, data: bytes, accession: str, key: str | None) -> dict:
    """One upload, retried after Retry-After while the server sheds load; every attempt's status is kept."""
    headers = {"Idempotency-Key": key} if key else {}
    attempts: list[int] = []
    start = time.perf_counter()
    while True:
        try:
            response = await client.post(
                "/api/v1/predictions",
                files={"image": (path.name, data, "image/bmp")},
                data={"accession_id": accession},
                headers=headers,
            )
        except httpx.HTTPError as exc:
            attempts.append(0)
            return {"status": 0, "error": type(exc).__name__, "attempts": attempts, "seconds": 0.0, "key": key}
        attempts.append(response.status_code)
        retry_after = response.headers.get("Retry-After")
        if response.status_code == 503 and retry_after is not None and len(attempts) < MAX_ATTEMPTS:
            await asyncio.sleep(float(retry_after))
            continue
        body = response.json() if response.headers.get("content-type", "").endswith("json") else {}
        return {
            "status": response.status_code,
            "seconds": time.perf_counter() - start,
            "attempts": attempts,
            "retry_after_missing": response.status_code == 503 and retry_after is None,
            "id": body.get("id") if response.status_code == 201 else None,
            "replayed": response.headers.get("Idempotent-Replayed") == "true",
            "key": key,
            "path": path.name,
        }


def poll_readyz(url: str, stop: threading.Event, samples: list[dict]) -> None:
    """GET /readyz every READYZ_EVERY_S from a thread of its own, so the uploads' event loop in this
    process does not delay (and inflate) the readiness timings."""
    began = time.perf_counter()
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                status = client.get("/readyz").status_code
            except httpx.HTTPError:
                status = 0
            samples.append({"status": status, "seconds": time.perf_counter() - start, "at_s": start - began})
            stop.wait(READYZ_EVERY_S)


async def load(url: str, api_key: str, cells: list[Path], pairs: int, accession: str) -> dict:
    payloads = [(path, path.read_bytes()) for path in cells]
    jobs = [(path, data, None) for path, data in payloads]
    run_id = uuid.uuid4().hex[:8]
    for i, (path, data) in enumerate(payloads[:pairs]):  # the first `pairs` cells go twice, with one key
        jobs[i] = (path, data, f"load-{run_id}-{i}")
        jobs.append((path, data, f"load-{run_id}-{i}"))
    limits = httpx.Limits(max_connections=len(jobs) + 10, max_keepalive_connections=len(jobs) + 10)
    headers = {"Authorization": f"Bearer {api_key}"}
    stop, readyz = threading.Event(), []
    poller = threading.Thread(target=poll_readyz, args=(url, stop, readyz), daemon=True)
    poller.start()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(upload(client, path, data, accession, key) for path, data, key in jobs))
        wall = time.perf_counter() - start
    stop.set()
    poller.join(30)
    return {"results": results, "wall_seconds": wall, "readyz": readyz}


def check_database(database_url: str, accession: str, results: list[dict]) -> dict:
    """Every 201 is one stored row; every idempotent pair made one row; nothing else was stored."""
    engine = create_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, idempotency_key FROM predictions WHERE accession_id = :a"), {"a": accession}
        ).all()
    engine.dispose()
    stored_ids = Counter(row[0] for row in rows)
    created_ids = {r["id"] for r in results if r["status"] == 201}
    by_key: dict[str, set] = {}
    for r in results:
        if r["key"] and r["status"] == 201:
            by_key.setdefault(r["key"], set()).add(r["id"])
    rows_per_key = Counter(row[1] for row in rows if row[1] is not None)
    return {
        "rows_stored": len(rows),
        "distinct_ids_answered_201": len(created_ids),
        "every_201_stored_once": all(stored_ids[i] == 1 for i in created_ids) and set(stored_ids) == created_ids,
        "idempotent_pairs": len(by_key),
        "pairs_with_one_row_and_one_id": sum(1 for k, ids in by_key.items() if len(ids) == 1 and rows_per_key[k] == 1),
    }


def bare_batched(classifier: Classifier, datas: list[bytes], rounds: int = 1) -> dict:
    """Classifier.predict over the same images in batches of 32: images/s of the best of `rounds` passes."""
    classifier.predict(datas[:BARE_BATCH])  # warm-up
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(datas), BARE_BATCH):
            classifier.predict(datas[i : i + BARE_BATCH])
        rates.append(len(datas) / (time.perf_counter() - start))
    return {"batch_size": BARE_BATCH, "images": len(datas), "images_per_s": max(rates), "rounds_images_per_s": rates}


def run(requests: int, pairs: int, database_url: str | None, model_dir: Path) -> dict:
    cells = herlev_cells(requests)
    warmup_cells = herlev_cells(get_settings().max_in_flight, skip=requests)
    accession = f"LOAD-{uuid.uuid4().hex[:8]}"
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="papcad-load-") as tmp:
        url = database_url or f"sqlite:///{Path(tmp) / 'papcad.db'}"
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "PAPCAD_DATA_DIR": tmp,
            "PAPCAD_MODEL_DIR": str(model_dir),
            "PAPCAD_EMBEDDED_WORKER": "false",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        classifier = Classifier.load(model_dir)
        datas = [path.read_bytes() for path in cells]
        with ServerProcess(env) as server:
            key = server.api_key()
            # Warm up with PAPCAD_MAX_IN_FLIGHT other cells at once: threads, pool and the largest forward
            # pass are set up before the RSS is taken.
            warm = asyncio.run(load(server.url, key, warmup_cells, 0, f"{accession}-WARM"))
            if any(r["status"] != 201 for r in warm["results"]):
                raise RuntimeError(f"warm-up failed: {warm['results']}")
            # The bare classifier just before and just after the load (the server idle), so that both
            # see the machine as the load did; the load is compared with their mean.
            bare_before = bare_batched(classifier, datas)
            rss_before = rss_bytes(server.process.pid)
            outcome = asyncio.run(load(server.url, key, cells, pairs, accession))
            rss_after = rss_bytes(server.process.pid)
            bare_after = bare_batched(classifier, datas)
            settings_seen = httpx.get(f"{server.url}/readyz", timeout=5).json()
        database = check_database(url, accession, outcome["results"])

    bare = {
        "batch_size": BARE_BATCH,
        "images": len(datas),
        "before_load_images_per_s": bare_before["images_per_s"],
        "after_load_images_per_s": bare_after["images_per_s"],
        "images_per_s": (bare_before["images_per_s"] + bare_after["images_per_s"]) / 2,
    }
    results = outcome["results"]
    final = Counter(r["status"] for r in results)
    attempts = Counter(status for r in results for status in r["attempts"])
    # Requests answered per second: each answered upload (pairs included) was one image through the model,
    # as each image is for the bare classifier.
    answered = sum(1 for r in results if r["status"] == 201)
    throughput = answered / outcome["wall_seconds"]
    readyz = outcome["readyz"]
    five_xx = {s: n for s, n in attempts.items() if s >= 500 and s != 503}
    return {
        "benchmark": "N simultaneous POST /api/v1/predictions vs bare batched Classifier.predict",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_1_5_15": {"before": load_before, "after": load_average()},
        "setup": {
            "model_version": classifier.version,
            "tta_views": tta_views(classifier),
            "database": "postgresql" if (database_url or "").startswith("postgresql") else "sqlite (temp file)",
            "server": "python -m app.cli serve (uvicorn, 1 process) in a child process, 127.0.0.1",
            "server_settings": {
                name: getattr(get_settings(), name)
                for name in (
                    "pool_size",
                    "max_overflow",
                    "pool_timeout",
                    "max_in_flight",
                    "retry_after_seconds",
                    "inference_max_batch_size",
                    "inference_batch_timeout_ms",
                )
            },
            "uploads": requests,
            "idempotent_pairs": pairs,
            "requests_sent": len(results),
            "cells_by_class": class_counts(cells),
            "readyz_model_version": settings_seen.get("model_version"),
        },
        "final_status": {str(k): v for k, v in sorted(final.items())},
        "attempt_status": {str(k): v for k, v in sorted(attempts.items())},
        "retries": sum(len(r["attempts"]) - 1 for r in results),
        "latency_including_retries": stats([r["seconds"] for r in results if r["status"] == 201]),
        "wall_seconds": outcome["wall_seconds"],
        "server_answered_201_per_s": throughput,
        "server_stored_rows_per_s": database["rows_stored"] / outcome["wall_seconds"],
        "bare_batched_classifier": bare,
        "throughput_ratio": throughput / bare["images_per_s"],
        "readyz": {
            "polls": len(readyz),
            "status": {str(k): v for k, v in Counter(s["status"] for s in readyz).items()},
            **{k: v for k, v in stats([s["seconds"] for s in readyz]).items() if k != "n"},
            "over_1s": [
                {"at_s": round(s["at_s"], 1), "ms": round(s["seconds"] * 1000)} for s in readyz if s["seconds"] >= 1
            ],
        },
        "server_rss": {
            "before": rss_before,
            "after": rss_after,
            "growth_mib": rss_after["rss_mib"] - rss_before["rss_mib"],
        },
        "database_check": database,
        "targets": {
            "no_5xx_but_503_with_retry_after": not five_xx and not any(r.get("retry_after_missing") for r in results),
            "every_201_stored_once": database["every_201_stored_once"],
            "every_pair_one_row": database["pairs_with_one_row_and_one_id"] == pairs,
            "throughput_at_least_90_percent_of_bare": throughput >= 0.9 * bare["images_per_s"],
            "readyz_always_200_within_1s": all(s["status"] == 200 and s["seconds"] < 1 for s in readyz),
            "rss_growth_under_300_mib": rss_after["rss_mib"] - rss_before["rss_mib"] < 300,
        },
    }


def table(result: dict) -> str:
    lat, ready, rss = result["latency_including_retries"], result["readyz"], result["server_rss"]
    bare = result["bare_batched_classifier"]
    machine = result["machine"]
    return "\n".join(
        [
            f"{result['setup']['model_version']} on {machine['cpu_model']} x {machine['cpu_count']}, "
            f"{result['setup']['database']}; load avg {result['load_average_1_5_15']}",
            f"{result['setup']['requests_sent']} requests ({result['setup']['uploads']} uploads, "
            f"{result['setup']['idempotent_pairs']} sent twice) in {result['wall_seconds']:.1f} s",
            f"final status {result['final_status']}; every attempt {result['attempt_status']}",
            f"latency incl. retries  p50 {lat['p50_ms']:.0f}  p90 {lat['p90_ms']:.0f}  p99 {lat['p99_ms']:.0f}  "
            f"max {lat['max_ms']:.0f} ms",
            f"throughput  server {result['server_answered_201_per_s']:.2f} answered/s vs bare batched "
            f"{bare['images_per_s']:.2f}/s  ({result['throughput_ratio']:.0%})",
            f"/readyz  {ready['polls']} polls {ready['status']}  p50 {ready['p50_ms']:.1f}  "
            f"max {ready['max_ms']:.1f} ms",
            f"server RSS  {rss['before']['rss_mib']:.0f} -> {rss['after']['rss_mib']:.0f} MiB "
            f"(+{rss['growth_mib']:.0f}; peak {rss['after']['peak_rss_mib']:.0f})",
            f"database  {result['database_check']}",
            f"targets  {result['targets']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=200, help="simultaneous uploads (default 200)")
    parser.add_argument("--pairs", type=int, default=20, help="of which sent twice with one Idempotency-Key")
    parser.add_argument("--database-url", default=None, help="PostgreSQL URL (default: a temporary SQLite file)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: PAPCAD_MODEL_DIR or the bundled model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 5000:
        parser.error("--requests must be between 1 and 5000")
    if not 0 <= args.pairs <= args.requests:
        parser.error("--pairs must be between 0 and --requests")
    result = run(args.requests, args.pairs, args.database_url, args.model_dir or get_settings().model_dir)
    print(table(result))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
