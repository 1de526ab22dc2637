"""Grad-CAM cost against the plain prediction, and proof that heatmaps stay off the prediction path.

One process, one machine, one run, on the same M Herlev images (spread over the 7 classes), with the model's
Keras network in float32 (Grad-CAM; the int8 network's class map is measured in bench_serving.py):
  1. Classifier.predict([bytes]) latency, after untimed warm-up calls ("before");
  2. app.ml.explain.heatmap_png(GradCam(model).heatmap, bytes, spec, class_index) for the model's own call, as
     GET /api/v1/predictions/{id}/heatmap computes it for a float32 model; the first call traces a tf.function
     and is reported on its own, the rest are timed after warm-up calls;
  3. Classifier.predict([bytes]) again, with nothing else running and no warm-up ("after"):
     prediction path slowdown = p50 after / p50 before (should be ~1.0), and the probabilities must not move;
  4. through the real server (create_app() on a temporary SQLite data dir, uvicorn in a thread on 127.0.0.1,
     API key, embedded worker off): POST /api/v1/predictions for each image, then GET .../heatmap for each
     (first: computed, the very first one also builds and traces the server's own GradCam), then again
     (cached PNG on disk).

    PAPCAD_MODEL_DIR=model_store/<version> .venv/bin/python bench/bench_heatmap.py [--images M] [--out FILE]

Results: a table on stdout and bench/results/heatmap.json (or --out) with the machine's details.
"""

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from common import (
    REPO_ROOT,
    Server,
    class_counts,
    herlev_cells,
    load_average,
    machine_info,
    repo_relative,
    stats,
    throwaway_settings,
    timed,
    write_json,
)

from app.config import get_settings
from app.ml.classifier import Classifier
from app.ml.explain import heatmap_png
from app.ml.inference import GradCam

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "heatmap.json"
WARMUP = 5
MAX_IMAGES = 917  # the Herlev images: every timed image is a different one
REQUEST_TIMEOUT_S = 300


def predict_latencies(classifier: Classifier, files: list[bytes], warmup: int) -> tuple[list[float], np.ndarray]:
    """Seconds per Classifier.predict([bytes]) call, one per file, after `warmup` untimed calls; and the
    probabilities, so that two runs can be compared."""
    for data in files[:warmup]:
        classifier.predict([data])
    seconds, probabilities = [], []
    for data in files:
        start = time.perf_counter()
        result = classifier.predict([data])[0]
        seconds.append(time.perf_counter() - start)
        probabilities.append([result.probabilities[c] for c in classifier.class_names])
    return seconds, np.array(probabilities)


def server_heatmaps(classifier: Classifier, model_dir: Path, paths: list[Path], files: list[bytes]) -> dict:
    """POST each image, then GET each prediction's heatmap twice (computed, then cached), timed client-side."""
    with tempfile.TemporaryDirectory(prefix="papcad-bench-") as tmp:
        # Nothing else runs in the server during the measurement.
        settings = throwaway_settings(Path(tmp), model_dir, embedded_worker=False)
        with Server(settings, classifier) as server:
            key = server.api_key()
            with httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT_S
            ) as client:
                ids = []
                for path, data in zip(paths, files, strict=True):
                    response = client.post("/api/v1/predictions", files={"image": (path.name, data, "image/bmp")})
                    if response.status_code != 201:
                        raise RuntimeError(f"POST /api/v1/predictions: {response.status_code} {response.text[:300]}")
                    ids.append(response.json()["id"])

                def get(prediction_id: int) -> tuple[float, bytes]:
                    start = time.perf_counter()
                    response = client.get(f"/api/v1/predictions/{prediction_id}/heatmap")
                    elapsed = time.perf_counter() - start
                    if response.status_code != 200 or response.headers["content-type"] != "image/png":
                        raise RuntimeError(f"GET heatmap {prediction_id}: {response.status_code} {response.text[:300]}")
                    return elapsed, response.content

                computed = [get(i) for i in ids]
                cached = [get(i) for i in ids]
            cache_files = len(list((settings.data_dir / "heatmaps").glob("*.png")))
    return {
        "predictions": len(ids),
        "first_get_fresh_server_s": computed[0][0],
        "computed_get": stats([s for s, _ in computed[1:]]),
        "cached_get": stats([s for s, _ in cached]),
        "cached_equals_computed": all(a == b for (_, a), (_, b) in zip(computed, cached, strict=True)),
        "png_bytes_mean": float(np.mean([len(png) for _, png in computed])),
        "cache_files": cache_files,
    }


def run(n_images: int, model_dir: Path) -> dict:
    started = time.perf_counter()
    classifier = Classifier.load(model_dir, precision="float32")
    load_seconds = time.perf_counter() - started
    machine = machine_info()
    load_before = load_average()
    spec = classifier.spec
    paths = herlev_cells(n_images)
    files = [path.read_bytes() for path in paths]

    # 1. the plain prediction, before any Grad-CAM exists in this process
    before_s, before_p = predict_latencies(classifier, files, WARMUP)
    calls = [int(np.argmax(row)) for row in before_p]  # explain the model's own call, as the server does

    # 2. Grad-CAM: build, first call (traces), then timed calls after warm-up
    start = time.perf_counter()
    cam = GradCam(classifier.network)
    construct_s = time.perf_counter() - start
    start = time.perf_counter()
    heatmap_png(cam.heatmap, files[0], spec, calls[0])
    first_call_s = time.perf_counter() - start
    heatmap_s = timed(lambda i: heatmap_png(cam.heatmap, files[i], spec, calls[i]), list(range(n_images)))

    # 3. the plain prediction again, straight after, no warm-up: any lasting effect of the heatmaps shows here
    after_s, after_p = predict_latencies(classifier, files, 0)

    # 4. the same through the server
    served = server_heatmaps(classifier, model_dir, paths, files)

    before, after, heat = stats(before_s), stats(after_s), stats(heatmap_s)
    return {
        "benchmark": "Grad-CAM heatmap_png vs Classifier.predict([bytes]); GET /api/v1/predictions/{id}/heatmap",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "load_average_1_5_15": {"before": load_before, "after": load_average()},
        "model": {
            "dir": repo_relative(model_dir),
            "version": classifier.version,
            "input": spec.to_dict(),
            "tta": classifier.predictor.tta,
            "load_seconds": load_seconds,
        },
        "setup": {
            "images": n_images,
            "class_counts": class_counts(paths),
            "warmup_calls": WARMUP,
            "heatmap_class": "the model's call (argmax), as the server's default",
            "server": "uvicorn in a thread of this process, 127.0.0.1, httpx client, API key, embedded worker off",
            "database": "sqlite (temporary file)",
        },
        "predict_before_heatmaps": before,
        "heatmap_png": heat,
        "gradcam_construct_s": construct_s,
        "gradcam_first_call_s": first_call_s,
        "predict_after_heatmaps": after,
        "heatmap_over_predict_p50": heat["p50_ms"] / before["p50_ms"],
        "prediction_path_slowdown": after["p50_ms"] / before["p50_ms"],
        "prediction_path_slowdown_p99": after["p99_ms"] / before["p99_ms"],
        "max_abs_probability_diff_after_vs_before": float(np.abs(after_p - before_p).max()),
        "server": served,
    }


def table(result: dict) -> str:
    model, setup, machine, served = result["model"], result["setup"], result["machine"], result["server"]
    load = result["load_average_1_5_15"]
    lines = [
        f"model {model['version']} ({model['dir']}): input {model['input']['size']} px {model['input']['fit']}, "
        f"TTA {model['tta']} (Grad-CAM: one view, the network up to conv5_block3_out plus its gradient)",
        f"{machine['cpu_model']} x {machine['cpus_usable'] or machine['cpu_count']} · TensorFlow "
        f"{machine['tensorflow']} · load avg before/after {load['before']} / {load['after']}",
        f"{setup['images']} Herlev images ("
        + ", ".join(f"{c} {k}" for c, k in setup["class_counts"].items())
        + f"), {setup['warmup_calls']} warm-up calls before each timed series except the second predict",
        "",
        f"{'':50}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'max ms':>9}",
    ]
    for name, row in (
        ("Classifier.predict([bytes]), before heatmaps", result["predict_before_heatmaps"]),
        ("heatmap_png(GradCam(model).heatmap, bytes, ...)", result["heatmap_png"]),
        ("Classifier.predict([bytes]), after heatmaps", result["predict_after_heatmaps"]),
        ("GET .../heatmap, first for a prediction", served["computed_get"]),
        ("GET .../heatmap, again (cached PNG)", served["cached_get"]),
    ):
        lines.append(
            f"{name:50}{row['p50_ms']:9.1f}{row['p90_ms']:9.1f}{row['p99_ms']:9.1f}{row['mean_ms']:9.1f}"
            f"{row['max_ms']:9.1f}"
        )
    lines += [
        "",
        f"GradCam(model) construction {1000 * result['gradcam_construct_s']:.1f} ms; first heatmap_png call "
        f"(traces the tf.function) {result['gradcam_first_call_s']:.2f} s",
        f"first GET .../heatmap on a fresh server (builds and traces its own GradCam) "
        f"{served['first_get_fresh_server_s']:.2f} s",
        f"heatmap / predict, p50: {result['heatmap_over_predict_p50']:.2f}",
        f"prediction path slowdown (predict p50 after heatmaps / before): {result['prediction_path_slowdown']:.2f} "
        f"(p99: {result['prediction_path_slowdown_p99']:.2f}); probabilities after vs before max |diff| = "
        f"{result['max_abs_probability_diff_after_vs_before']:.2e}",
        f"server: {served['predictions']} predictions, {served['cache_files']} cached PNGs, cached bytes equal "
        f"computed: {served['cached_equals_computed']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=50, help="different Herlev images timed (default 50)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: PAPCAD_MODEL_DIR or the bundled model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not 2 <= args.images <= MAX_IMAGES:
        parser.error(f"--images must be between 2 and {MAX_IMAGES}")
    model_dir = args.model_dir or get_settings().model_dir
    if not (Path(model_dir) / "model_card.json").is_file():
        parser.error(f"no model at {model_dir} (no model_card.json); set PAPCAD_MODEL_DIR or pass --model-dir")

    result = run(args.images, Path(model_dir))
    print(table(result))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
