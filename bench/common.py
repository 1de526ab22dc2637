"""Helpers shared by the benchmarks in this folder.

Most of them live in the two first benchmarks and are re-exported from here, so that every script
reports the machine, the load and the latencies the same way:

  * from bench_classifier: `machine_info` (platform, CPUs, GPUs, TensorFlow/Keras/NumPy, load at start)
    and `timed` (seconds per call after untimed warm-up calls);
  * from bench_api: `Server` (create_app() served by uvicorn in a thread on 127.0.0.1, with `api_key()`),
    `stats` (n, p50/p90/p99, mean, min, max in ms) and `load_average`.

New here: `herlev_cells` (distinct Herlev images taken round-robin over the 7 classes), `class_counts`,
`tta_views` and `write_json`.
"""

import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for folder in (REPO_ROOT, BENCH_DIR):  # run from a checkout without installing the package
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported (by bench_api)

from bench_api import Server, load_average, stats, throwaway_settings  # noqa: E402
from bench_classifier import HERLEV_DIR, machine_info, repo_relative, timed  # noqa: E402

__all__ = [
    "HERLEV_DIR",
    "REPO_ROOT",
    "Server",
    "class_counts",
    "herlev_cells",
    "load_average",
    "machine_info",
    "repo_relative",
    "stats",
    "timed",
    "throwaway_settings",
    "tta_views",
    "write_json",
]


def herlev_cells(count: int, skip: int = 0) -> list[Path]:
    """`count` Herlev images taken in turn from each class (one of each class, then the next round).

    The sequence holds every image of the dataset once, so images `skip` .. `skip + count` are all
    different as long as skip + count does not exceed the dataset (917 images); beyond that it wraps.
    """
    manifest = HERLEV_DIR / "manifest.csv"
    if not manifest.is_file():
        sys.exit(f"error: Herlev dataset not found at {HERLEV_DIR} (set PAPCAD_HERLEV_DIR)")
    by_class: dict[str, list[Path]] = {}
    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            by_class.setdefault(row["class"], []).append(HERLEV_DIR / row["path"])
    order: list[Path] = []
    for rank in range(max(len(paths) for paths in by_class.values())):
        order += [paths[rank] for paths in by_class.values() if rank < len(paths)]
    return [order[(skip + i) % len(order)] for i in range(count)]


def class_counts(paths: list[Path]) -> dict[str, int]:
    """Images per class (the class is the image's folder)."""
    return dict(Counter(path.parent.name for path in paths))


def tta_views(classifier) -> int:
    """How many test-time-augmentation views the classifier's network sees per image."""
    import tensorflow as tf

    from app.ml.inference import views

    return len(views(tf.zeros([1, classifier.spec.size, classifier.spec.size, 3]), classifier.predictor.tta))


def write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
