"""Benchmark the serving path (`Classifier`) against a bare Keras forward pass of the same network.

    .venv/bin/python bench/bench_classifier.py [--model DIR] [--images N] [--batches B] [--out FILE]

In one run, on one machine:
  (a) single-image latency: Classifier.predict([file bytes]) vs model(x, training=False) on one
      already-prepared image (no decoding, no TTA); p50/p99 over N calls after a warm-up;
  (b) batch throughput: Classifier.predict on 32 file bytes vs model.predict_on_batch on the same 32
      prepared images, in images per second;
  (c) memory: resident set size of a fresh process after importing, loading the classifier and
      classifying one batch.
The classifier runs its Keras network in float32 (the int8 LiteRT serving path is measured by bench_serving.py).
A table goes to stdout and everything to JSON (default bench/results/classifier.json).
See bench/README.md for what each number means.
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package


def repo_relative(path: Path) -> str:
    """A path as seen from the repository root, so results name no folder of the measuring machine."""
    return os.path.relpath(Path(path).resolve(), REPO_ROOT)


HERLEV_DIR = Path(os.environ.get("PAPCAD_HERLEV_DIR") or REPO_ROOT.parent / "shared" / "datasets" / "herlev")
BATCH = 32
WARMUP = 5

# Runs in a fresh interpreter, so that nothing this process already holds counts.
MEMORY_PROBE = r"""
import json, resource, sys

def current_mib():
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    return None

def peak_mib():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024

out = {}
from app.ml.classifier import Classifier
out["after_import"] = {"rss_mib": current_mib(), "peak_rss_mib": peak_mib()}
classifier = Classifier.load(sys.argv[1], precision="float32")
out["after_load"] = {"rss_mib": current_mib(), "peak_rss_mib": peak_mib()}
images = [open(path, "rb").read() for path in sys.argv[2:]]
classifier.predict(images)
out["after_first_batch"] = {"rss_mib": current_mib(), "peak_rss_mib": peak_mib(), "images": len(images)}
print(json.dumps(out))
"""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def herlev_images(count: int) -> list[Path]:
    """`count` real Herlev images spread over all classes (cycled if more are asked for than exist)."""
    manifest = HERLEV_DIR / "manifest.csv"
    if not manifest.is_file():
        sys.exit(f"error: Herlev dataset not found at {HERLEV_DIR} (set PAPCAD_HERLEV_DIR)")
    with open(manifest, newline="") as handle:
        paths = [HERLEV_DIR / row["path"] for row in csv.DictReader(handle)]
    step = max(1, len(paths) // count)
    spread = paths[::step]
    return [spread[i % len(spread)] for i in range(count)]


def timed(call, inputs: list) -> list[float]:
    """Seconds per call, one call per input, after WARMUP untimed calls."""
    for item in inputs[:WARMUP]:
        call(item)
    seconds = []
    for item in inputs:
        start = time.perf_counter()
        call(item)
        seconds.append(time.perf_counter() - start)
    return seconds


def latency(seconds: list[float]) -> dict:
    import numpy as np

    ms = np.array(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "runs": len(ms),
    }


def measure_memory(model_dir: Path, images: list[Path]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(model_dir), *map(str, images)],
        cwd=REPO_ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:] or ["memory probe failed"]}
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    memory["method"] = "fresh subprocess; peak = resource.getrusage(RUSAGE_SELF).ru_maxrss, current = VmRSS or psutil"
    memory["classifier_load_mib"] = memory["after_load"]["rss_mib"] - memory["after_import"]["rss_mib"]
    return memory


def run(model_dir: Path, n_images: int, n_batches: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from app.ml.classifier import Classifier
    from app.ml.inference import views
    from app.ml.preprocessing import prepare_batch, prepare_image

    machine = machine_info()
    started = time.perf_counter()
    classifier = Classifier.load(model_dir, precision="float32")  # the Keras network (int8: bench_serving.py)
    load_seconds = time.perf_counter() - started
    model = classifier.network
    spec = classifier.spec
    n_views = len(views(tf.zeros([1, spec.size, spec.size, 3]), classifier.predictor.tta))

    paths = herlev_images(max(n_images, BATCH))
    files = [path.read_bytes() for path in paths]
    pixels = prepare_batch(files, spec)
    floats = pixels.astype(np.float32)

    # (a) one image at a time
    singles = files[:n_images]
    full = timed(lambda data: classifier.predict([data]), singles)
    prep = timed(lambda data: prepare_image(data, spec), singles)
    network = timed(lambda i: classifier.predict_pixels(pixels[i : i + 1]), list(range(n_images)))
    bare = timed(lambda i: model(floats[i : i + 1], training=False).numpy(), list(range(n_images)))
    compiled_forward = tf.function(
        lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, spec.size, spec.size, 3])]
    )
    compiled = timed(lambda i: compiled_forward(floats[i : i + 1]).numpy(), list(range(n_images)))
    single = {
        "classifier_predict": latency(full),
        "bare_keras_call": latency(bare),
        "bare_keras_call_compiled": latency(compiled),
        "parts_of_classifier_predict": {
            "prepare_image": latency(prep),
            "predictor_on_prepared_pixels": latency(network),
        },
    }
    # Time ratios: how many bare forward passes one Classifier call costs (1.0 = no overhead).
    p50 = single["classifier_predict"]["p50_ms"]
    single["time_ratio_p50"] = p50 / single["bare_keras_call"]["p50_ms"]
    single["time_ratio_p50_per_view"] = single["time_ratio_p50"] / n_views
    single["time_ratio_p50_vs_compiled"] = p50 / single["bare_keras_call_compiled"]["p50_ms"]
    single["time_ratio_p50_vs_compiled_per_view"] = single["time_ratio_p50_vs_compiled"] / n_views

    # (b) batches of 32
    batch_files = [files[(b * BATCH + i) % len(files)] for b in range(n_batches) for i in range(BATCH)]
    batches = [batch_files[b * BATCH : (b + 1) * BATCH] for b in range(n_batches)]
    batch_floats = [floats[[(b * BATCH + i) % len(files) for i in range(BATCH)]] for b in range(n_batches)]
    full_batches = timed(classifier.predict, batches)
    bare_batches = timed(model.predict_on_batch, batch_floats)
    batch = {
        "batch_size": BATCH,
        "batches": n_batches,
        "classifier_predict_images_per_s": BATCH * n_batches / sum(full_batches),
        "bare_predict_on_batch_images_per_s": BATCH * n_batches / sum(bare_batches),
    }
    # Time per image, Classifier over bare (the inverse of the throughput ratio; 1.0 = no overhead).
    batch["time_ratio"] = batch["bare_predict_on_batch_images_per_s"] / batch["classifier_predict_images_per_s"]
    batch["time_ratio_per_view"] = batch["time_ratio"] / n_views

    memory = measure_memory(model_dir, paths[:BATCH])
    machine["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "dir": repo_relative(model_dir),
            "version": classifier.version,
            "input": spec.to_dict(),
            "tta": classifier.predictor.tta,
            "tta_views": n_views,
            "precision": classifier.predictor.precision,
            "load_seconds": load_seconds,
        },
        "machine": machine,
        "settings": {"single_image_runs": n_images, "warmup_calls": WARMUP, "batch_size": BATCH},
        "single_image": single,
        "batch": batch,
        "memory": memory,
    }


def print_table(result: dict) -> None:
    model, machine, single, batch = result["model"], result["machine"], result["single_image"], result["batch"]
    parts = single["parts_of_classifier_predict"]
    print(
        f"model {model['version']} ({model['dir']}): input {model['input']['size']} px {model['input']['fit']}, "
        f"TTA {model['tta']} = {model['tta_views']} view(s) per image"
    )
    print(
        f"machine: {machine['cpu_model']}, {machine['cpus_usable'] or machine['cpu_count']} CPUs, "
        f"TensorFlow {machine['tensorflow']}, load average {machine['load_average_1min_at_start']:.1f} -> "
        f"{machine['load_average_1min_at_end']:.1f}"
    )
    rows = [
        ("single image", "Classifier.predict([bytes])", single["classifier_predict"]),
        ("", "  of which prepare_image", parts["prepare_image"]),
        ("", "  of which network + TTA", parts["predictor_on_prepared_pixels"]),
        ("", "bare model(x, training=False)", single["bare_keras_call"]),
        ("", "same, in a tf.function", single["bare_keras_call_compiled"]),
    ]
    print(f"\n{'':<14}{'':<32}{'p50 ms':>10}{'p99 ms':>10}")
    for group, name, stats in rows:
        print(f"{group:<14}{name:<32}{stats['p50_ms']:>10.1f}{stats['p99_ms']:>10.1f}")
    print(
        f"{'':<14}{'time ratio vs bare call':<32}{single['time_ratio_p50']:>10.2f}"
        f"   per view {single['time_ratio_p50_per_view']:.2f}"
    )
    print(
        f"{'':<14}{'time ratio vs tf.function':<32}{single['time_ratio_p50_vs_compiled']:>10.2f}"
        f"   per view {single['time_ratio_p50_vs_compiled_per_view']:.2f}"
    )
    print(f"\n{'batch of 32':<14}{'':<32}{'images/s':>10}")
    print(f"{'':<14}{'Classifier.predict':<32}{batch['classifier_predict_images_per_s']:>10.1f}")
    print(f"{'':<14}{'bare predict_on_batch':<32}{batch['bare_predict_on_batch_images_per_s']:>10.1f}")
    print(
        f"{'':<14}{'time ratio per image':<32}{batch['time_ratio']:>10.2f}"
        f"   per view {batch['time_ratio_per_view']:.2f}"
    )
    memory = result["memory"]
    if "error" in memory:
        print(f"\nmemory: probe failed: {memory['error']}")
    else:
        print(
            f"\nmemory (fresh process, MiB): after import {memory['after_import']['rss_mib']:.0f}, "
            f"after Classifier.load {memory['after_load']['rss_mib']:.0f}, "
            f"peak after one batch of {memory['after_first_batch']['images']} "
            f"{memory['after_first_batch']['peak_rss_mib']:.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the configured model_dir)")
    parser.add_argument("--images", type=int, default=100, help="timed single-image calls (default 100)")
    parser.add_argument("--batches", type=int, default=5, help="timed batches of 32 (default 5)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "classifier.json")
    args = parser.parse_args()
    if args.images < 1 or args.batches < 1:
        parser.error("--images and --batches must be at least 1")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from app.config import get_settings

    model_dir = args.model or get_settings().model_dir
    if not (Path(model_dir) / "model_card.json").is_file():
        sys.exit(f"error: no model at {model_dir} (no model_card.json); pass --model DIR")
    result = run(Path(model_dir), args.images, args.batches)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
