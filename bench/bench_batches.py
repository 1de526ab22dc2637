"""Batch throughput end to end: POST /api/v1/batches on the real server against bare Classifier.predict.

One process, one machine, one run: the model is loaded once and shared by
  * the server:  create_app() on a temporary SQLite data dir with its embedded batch worker (on by default
                 for SQLite), served by uvicorn in a thread on 127.0.0.1; one batch of N Herlev images
                 (spread over the 7 classes) sent as one multipart POST with an API key, then
                 GET /api/v1/batches/{id} every 0.1 s until its status is "done"; and
  * the bare call: Classifier.predict on the same N images' bytes in chunks of settings.worker_batch_size
                 (what the worker hands the model per round), once before and once after the server run.
cells/s = N / (time from just before the POST to the last item classified). The end is read two ways: when
polling first sees "done", and from the last item's prediction created_at (poll-independent).

    PAPCAD_MODEL_DIR=model_store/<version> .venv/bin/python bench/bench_batches.py [--images N] [--warmup W]

Results: a table on stdout and bench/results/batches.json (or --out) with the machine's details.
"""

import argparse
import math
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from common import (
    REPO_ROOT,
    Server,
    class_counts,
    herlev_cells,
    load_average,
    machine_info,
    repo_relative,
    throwaway_settings,
    tta_views,
    write_json,
)

from app.config import get_settings
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "batches.json"
POLL_S = 0.1
PAGE = 1000  # the items endpoint's largest page
REQUEST_TIMEOUT_S = 300


def submit_and_wait(
    client: httpx.Client, paths: list[Path], files: list[bytes], timeout_s: float, poll_s: float = POLL_S
) -> dict:
    """POST one batch, poll it every poll_s until done, then read its items' predictions back."""
    multipart = [("image", (path.name, data, "image/bmp")) for path, data in zip(paths, files, strict=True)]
    t0_wall = datetime.now(UTC)
    t0 = time.perf_counter()
    response = client.post("/api/v1/batches", files=multipart)
    accepted_s = time.perf_counter() - t0
    if response.status_code != 202:
        raise RuntimeError(f"POST /api/v1/batches: {response.status_code} {response.text[:300]}")
    batch = response.json()
    polls = 0
    tick = t0
    for _ in range(math.ceil(timeout_s / poll_s)):  # bounded: gives up after timeout_s
        if batch["status"] == "done":
            break
        tick += poll_s
        time.sleep(max(0.0, tick - time.perf_counter()))
        response = client.get(f"/api/v1/batches/{batch['id']}")
        polls += 1
        if response.status_code != 200:
            raise RuntimeError(f"GET /api/v1/batches/{batch['id']}: {response.status_code} {response.text[:300]}")
        batch = response.json()
    else:
        raise RuntimeError(f"batch {batch['id']} not done after {timeout_s:.0f} s: {batch['counts']}")
    done_seen_s = time.perf_counter() - t0

    items: list[dict] = []
    for offset in range(0, len(files), PAGE):
        page = client.get(
            f"/api/v1/batches/{batch['id']}/items", params={"order": "position", "limit": PAGE, "offset": offset}
        )
        page.raise_for_status()
        items += page.json()["items"]
    created = {i["position"]: datetime.fromisoformat(i["prediction"]["created_at"]) for i in items if i["prediction"]}
    times = list(created.values())
    return {
        "batch_id": batch["id"],
        "counts": batch["counts"],
        "accepted_s": accepted_s,
        "first_prediction_s": (min(times) - t0_wall).total_seconds() if times else None,
        "last_prediction_s": (max(times) - t0_wall).total_seconds() if times else None,
        "done_seen_s": done_seen_s,
        "polls": polls,
        "probabilities": {i["position"]: i["prediction"]["probabilities"] for i in items if i["prediction"]},
        "created_at": created,
    }


def store_ms_per_item(created: dict[int, datetime], chunk: int) -> float | None:
    """Median over worker rounds of the gap between consecutive stored predictions of one round.

    The worker classifies a round's items in one call, then stores them one by one (prediction row,
    lease check, audit row, commit), stamping created_at as each row is written; so within a round the
    spacing of created_at is the cost of storing one item. Rounds are taken as positions
    [k * chunk, (k + 1) * chunk), which holds when nothing else is queued (the warm-up batch is done).
    """
    gaps = []
    for start in range(0, max(created, default=-1) + 1, chunk):
        stamps = sorted(created[p] for p in range(start, start + chunk) if p in created)
        if len(stamps) > 1:
            gaps.append((stamps[-1] - stamps[0]).total_seconds() * 1000 / (len(stamps) - 1))
    return float(sorted(gaps)[len(gaps) // 2]) if gaps else None


def bare_run(classifier: Classifier, files: list[bytes], chunk: int) -> tuple[float, list]:
    """Seconds for Classifier.predict over all files, `chunk` at a time (as the worker claims them)."""
    start = time.perf_counter()
    results = []
    for i in range(0, len(files), chunk):
        results += classifier.predict(files[i : i + chunk])
    return time.perf_counter() - start, results


def run(n_images: int, n_warmup: int, model_dir: Path, timeout_s: float, poll_s: float = POLL_S) -> dict:
    started = time.perf_counter()
    classifier = Classifier.load(model_dir)
    load_seconds = time.perf_counter() - started
    machine = machine_info()
    load_before = load_average()
    paths = herlev_cells(n_images)
    files = [path.read_bytes() for path in paths]
    warm_paths = herlev_cells(n_warmup, skip=n_images)  # other images, so the timed ones are new to the store
    warm_files = [path.read_bytes() for path in warm_paths]

    with tempfile.TemporaryDirectory(prefix="papcad-bench-") as tmp:
        settings = throwaway_settings(Path(tmp), model_dir)
        if not settings.runs_embedded_worker:
            raise RuntimeError("the embedded worker is off (PAPCAD_EMBEDDED_WORKER?); this benchmark needs it")
        chunk = settings.worker_batch_size

        classifier.predict(files[:chunk])  # traces the compiled forward pass once, for both sides
        bare_before_s, bare_results = bare_run(classifier, files, chunk)
        with Server(settings, classifier) as server:
            key = server.api_key()
            with httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT_S
            ) as client:
                if warm_files:
                    submit_and_wait(client, warm_paths, warm_files, timeout_s, poll_s)
                served = submit_and_wait(client, paths, files, timeout_s, poll_s)
        bare_after_s, _ = bare_run(classifier, files, chunk)

    probabilities = served.pop("probabilities")
    served["store_ms_per_item"] = store_ms_per_item(served.pop("created_at"), chunk)
    diffs = [abs(bare_results[pos].probabilities[c] - p[c]) for pos, p in probabilities.items() for c in CLASS_NAMES]
    max_abs_diff = max(diffs, default=None)
    bare_cells_per_s = 2 * n_images / (bare_before_s + bare_after_s)
    served["cells_per_s_poll"] = n_images / served["done_seen_s"]
    last = served["last_prediction_s"]
    served["cells_per_s_created_at"] = n_images / last if last else None
    return {
        "benchmark": "POST /api/v1/batches (embedded worker) vs Classifier.predict in worker-size chunks",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "load_average_1_5_15": {"before": load_before, "after": load_average()},
        "model": {
            "dir": repo_relative(model_dir),
            "version": classifier.version,
            "input": classifier.spec.to_dict(),
            "tta": classifier.predictor.tta,
            "tta_views": tta_views(classifier),
            "predictor_batch_size": classifier.predictor.batch_size,
            "load_seconds": load_seconds,
        },
        "setup": {
            "images": n_images,
            "class_counts": class_counts(paths),
            "image_bytes_total": sum(map(len, files)),
            "warmup_batch_images": n_warmup,
            "worker_batch_size": chunk,
            "embedded_worker": True,
            "database": "sqlite (temporary file)",
            "server": "uvicorn in a thread of this process, 127.0.0.1, httpx client, API key",
            "poll_interval_s": poll_s,
            "predictions_checked_against_bare": len(probabilities),
            "max_abs_probability_diff_server_vs_bare": max_abs_diff,
        },
        "server": served,
        "bare": {
            "chunk": chunk,
            "chunks": math.ceil(n_images / chunk),
            "before_server_s": bare_before_s,
            "after_server_s": bare_after_s,
            "cells_per_s_before": n_images / bare_before_s,
            "cells_per_s_after": n_images / bare_after_s,
            "cells_per_s": bare_cells_per_s,
        },
        # Time per cell, server over bare (1.0 = the server adds nothing); and the inverse as a share.
        "time_ratio_poll": bare_cells_per_s / served["cells_per_s_poll"],
        "time_ratio_created_at": bare_cells_per_s / served["cells_per_s_created_at"] if last else None,
        "server_share_of_bare_throughput_poll": served["cells_per_s_poll"] / bare_cells_per_s,
    }


def table(result: dict) -> str:
    model, setup, machine = result["model"], result["setup"], result["machine"]
    served, bare = result["server"], result["bare"]
    n = setup["images"]
    load = result["load_average_1_5_15"]

    def row(name: str, seconds: float | None, rate: float | None = None) -> str:
        sec = f"{seconds:10.2f}" if seconds is not None else f"{'-':>10}"
        return f"{name:48}{sec}" + (f"{rate:12.1f}" if rate is not None else "")

    store = f"{served['store_ms_per_item']:.1f}" if served["store_ms_per_item"] is not None else "-"
    lines = [
        f"model {model['version']} ({model['dir']}): input {model['input']['size']} px {model['input']['fit']}, "
        f"TTA {model['tta']} = {model['tta_views']} view(s) per image; worker_batch_size {setup['worker_batch_size']}",
        f"{machine['cpu_model']} x {machine['cpus_usable'] or machine['cpu_count']} · TensorFlow "
        f"{machine['tensorflow']} · load avg before/after {load['before']} / {load['after']}",
        f"one batch of {n} Herlev images ({setup['image_bytes_total'] / 2**20:.1f} MiB; "
        + ", ".join(f"{c} {k}" for c, k in setup["class_counts"].items())
        + f") after a warm-up batch of {setup['warmup_batch_images']}",
        "",
        f"{'':48}{'seconds':>10}{'cells/s':>12}",
        row("POST /api/v1/batches answered 202", served["accepted_s"]),
        row("first prediction stored (its created_at)", served["first_prediction_s"]),
        row("last prediction stored (its created_at)", served["last_prediction_s"], served["cells_per_s_created_at"]),
        row(
            f'status "done" seen (polling every {setup["poll_interval_s"]} s)',
            served["done_seen_s"],
            served["cells_per_s_poll"],
        ),  # fmt: skip
        row(
            f"bare Classifier.predict x{bare['chunks']} chunks, before",
            bare["before_server_s"],
            bare["cells_per_s_before"],
        ),  # fmt: skip
        row(
            f"bare Classifier.predict x{bare['chunks']} chunks, after",
            bare["after_server_s"],
            bare["cells_per_s_after"],
        ),  # fmt: skip
        row("bare, both runs", None, bare["cells_per_s"]),
        "",
        f"time ratio per cell, server / bare: {result['time_ratio_poll']:.2f} (polled end)"
        + (f", {result['time_ratio_created_at']:.2f} (created_at end)" if result["time_ratio_created_at"] else "")
        + f"; the server reaches {100 * result['server_share_of_bare_throughput_poll']:.0f}% of bare throughput",
        "storing one classified item (prediction + audit rows, commit), from the created_at spacing in a worker "
        f"round: {store} ms",
        f"items: {served['counts']['classified']} classified, {served['counts']['failed']} failed; "
        f"{served['polls']} polls; server vs bare probabilities max |diff| = "
        + (
            f"{setup['max_abs_probability_diff_server_vs_bare']:.2e}"
            if setup["max_abs_probability_diff_server_vs_bare"] is not None
            else "-"
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=128, help="images in the timed batch (default 128)")
    parser.add_argument("--warmup", type=int, default=4, help="images in an untimed batch sent first (default 4)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: PAPCAD_MODEL_DIR or the bundled model")
    parser.add_argument(
        "--poll-interval", type=float, default=POLL_S, help=f"seconds between status polls (default {POLL_S})"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="give up on a batch after this many seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    limit = get_settings().max_batch_items
    if not 1 <= args.images <= limit:
        parser.error(f"--images must be between 1 and {limit} (max_batch_items)")
    if not 0 <= args.warmup <= limit:
        parser.error(f"--warmup must be between 0 and {limit}")
    if not 0 < args.timeout <= 24 * 3600:
        parser.error("--timeout must be between 0 and 86400 seconds")
    if not 0.01 <= args.poll_interval <= 60:
        parser.error("--poll-interval must be between 0.01 and 60 seconds")
    model_dir = args.model_dir or get_settings().model_dir
    if not (Path(model_dir) / "model_card.json").is_file():
        parser.error(f"no model at {model_dir} (no model_card.json); set PAPCAD_MODEL_DIR or pass --model-dir")

    result = run(args.images, args.warmup, Path(model_dir), args.timeout, args.poll_interval)
    print(table(result))
    write_json(result, args.out)
    failed = result["server"]["counts"]["failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
