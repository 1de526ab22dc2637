"""Server overhead of POST /api/v1/predictions over the bare Classifier.predict call.

One process, one machine, one run: the model is loaded once and shared by
  * the bare call:  classifier.predict([image bytes])           (what the model costs), and
  * the server:     create_app() on a temporary SQLite data dir, served by uvicorn in a thread
                    on 127.0.0.1, called over HTTP by httpx with an API key; one multipart upload
                    of the same image per request, sequential, each one classified and stored.
The two are measured in alternating pairs after a warm-up, so both see the same machine load.
Overhead = server latency - bare latency (p50 and p99), and the ratio server / bare.

    .venv/bin/python bench/bench_api.py [--requests N] [--warmup W] [--image PATH]

The model comes from PAPCAD_MODEL_DIR (default: the bundled model). Results: a table on stdout and
bench/results/api.json with the machine's details.
"""

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from bench_classifier import repo_relative
from sqlalchemy import text

from app.config import Settings, get_settings
from app.main import create_app
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.services import accounts
from app.services.actors import SYSTEM

ROOT = Path(__file__).resolve().parents[1]
HERLEV = Path(os.environ.get("PAPCAD_HERLEV_DIR") or ROOT.parent / "shared" / "datasets" / "herlev")
DEFAULT_IMAGE = HERLEV / "moderate_dysplastic" / "148848523-148848559-002.BMP"
DEFAULT_OUT = ROOT / "bench" / "results" / "api.json"
MAX_REQUESTS = 10_000  # keeps every loop bounded whatever is passed
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 120


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
    }
    try:
        info["sched_affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
    except ImportError:
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000.0
    return {
        "n": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }


def throwaway_settings(folder: Path, model_dir: Path, **overrides) -> Settings:
    """Settings for a server whose SQLite file and stored images live in a temporary folder."""
    return Settings(
        data_dir=folder,
        database_url=f"sqlite:///{folder / 'papcad.db'}",
        model_dir=model_dir,
        **overrides,
    )


class Server:
    """uvicorn serving create_app() on a free loopback port, in a daemon thread of this process."""

    def __init__(self, settings: Settings, classifier: Classifier):
        self.app = create_app(settings, classifier=classifier)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def api_key(self) -> str:
        context = self.app.state.context
        with context.sessions() as session:
            _, key = accounts.create_api_client(session, SYSTEM, "bench-lis")
            session.commit()
        return key


def run(requests: int, warmup: int, image_path: Path, model_dir: Path) -> dict:
    data = image_path.read_bytes()
    classifier = Classifier.load(model_dir)
    load_before = load_average()

    with tempfile.TemporaryDirectory(prefix="papcad-bench-") as tmp:
        # No batch worker polling the database during the measurement.
        settings = throwaway_settings(Path(tmp), model_dir, embedded_worker=False)
        with Server(settings, classifier) as server:
            key = server.api_key()
            with httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT_S
            ) as client:

                def bare() -> tuple[float, dict]:
                    start = time.perf_counter()
                    result = classifier.predict([data])[0]
                    return time.perf_counter() - start, result.probabilities

                def served() -> tuple[float, dict]:
                    start = time.perf_counter()
                    response = client.post("/api/v1/predictions", files={"image": (image_path.name, data, "image/bmp")})
                    elapsed = time.perf_counter() - start
                    if response.status_code != 201:
                        raise RuntimeError(f"POST /api/v1/predictions: {response.status_code} {response.text[:300]}")
                    return elapsed, response.json()["probabilities"]

                for _ in range(warmup):
                    bare()
                    served()
                bare_s: list[float] = []
                served_s: list[float] = []
                first_bare = first_served = None
                for i in range(requests):
                    # Alternate which goes first, so drift in machine load hits both alike.
                    order = (bare, served) if i % 2 == 0 else (served, bare)
                    for call in order:
                        elapsed, probabilities = call()
                        if call is bare:
                            bare_s.append(elapsed)
                            first_bare = first_bare or probabilities
                        else:
                            served_s.append(elapsed)
                            first_served = first_served or probabilities
            with server.app.state.context.engine.connect() as connection:
                rows = connection.execute(text("SELECT COUNT(*) FROM predictions")).scalar_one()

    # Same numbers both ways: the server really ran the model on these bytes.
    max_abs_diff = max(abs(first_bare[c] - first_served[c]) for c in CLASS_NAMES)
    bare_stats, served_stats = stats(bare_s), stats(served_s)
    paired = stats([s - b for s, b in zip(served_s, bare_s, strict=True)])
    return {
        "benchmark": "POST /api/v1/predictions vs Classifier.predict([bytes])",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_1_5_15": {"before": load_before, "after": load_average()},
        "setup": {
            "model_version": classifier.version,
            "model_dir": repo_relative(model_dir),
            "tta": classifier.card.get("tta", "none"),
            "input_size": classifier.spec.size,
            "image": repo_relative(image_path),
            "image_bytes": len(data),
            "database": "sqlite (temporary file)",
            "server": "uvicorn in a thread of this process, 127.0.0.1, httpx client, API key",
            "requests": requests,
            "warmup_pairs": warmup,
            "sequential": True,
            "predictions_stored": rows,
            "max_abs_probability_diff_server_vs_bare": max_abs_diff,
        },
        "bare_predict": bare_stats,
        "server_post": served_stats,
        "overhead": {
            "p50_ms": served_stats["p50_ms"] - bare_stats["p50_ms"],
            "p99_ms": served_stats["p99_ms"] - bare_stats["p99_ms"],
            "p50_ratio": served_stats["p50_ms"] / bare_stats["p50_ms"],
            "p99_ratio": served_stats["p99_ms"] / bare_stats["p99_ms"],
            "paired_difference": paired,
        },
    }


def table(result: dict) -> str:
    bare, served, over = result["bare_predict"], result["server_post"], result["overhead"]
    setup, machine = result["setup"], result["machine"]
    lines = [
        f"model {setup['model_version']} (input {setup['input_size']} px, tta {setup['tta']}), "
        f"image {Path(setup['image']).name} ({setup['image_bytes']:,} bytes)",
        f"{machine['cpu_model']} x {machine['cpu_count']} · {machine['platform']} · "
        f"load avg before/after {result['load_average_1_5_15']['before']} / {result['load_average_1_5_15']['after']}",
        f"{setup['requests']} sequential pairs after {setup['warmup_pairs']} warm-up pairs",
        "",
        f"{'':32}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'max ms':>10}",
    ]
    for name, row in (
        ("Classifier.predict([bytes])", bare),
        ("POST /api/v1/predictions", served),
        ("per-pair difference", over["paired_difference"]),
    ):
        lines.append(
            f"{name:32}{row['p50_ms']:10.1f}{row['p90_ms']:10.1f}{row['p99_ms']:10.1f}"
            f"{row['mean_ms']:10.1f}{row['max_ms']:10.1f}"
        )
    lines += [
        "",
        f"server overhead  p50: +{over['p50_ms']:.1f} ms (x{over['p50_ratio']:.2f})   "
        f"p99: +{over['p99_ms']:.1f} ms (x{over['p99_ratio']:.2f})",
        f"server vs bare probabilities: max |diff| = {setup['max_abs_probability_diff_server_vs_bare']:.2e}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=200, help="measured request pairs (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured pairs first (default 10)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the cell image to send")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: PAPCAD_MODEL_DIR or the bundled model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be between 1 and {MAX_REQUESTS}")
    if not 0 <= args.warmup <= MAX_REQUESTS:
        parser.error(f"--warmup must be between 0 and {MAX_REQUESTS}")
    if not args.image.is_file():
        parser.error(f"image not found: {args.image} (set PAPCAD_HERLEV_DIR or pass --image)")
    model_dir = args.model_dir or get_settings().model_dir

    result = run(args.requests, args.warmup, args.image, model_dir)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
