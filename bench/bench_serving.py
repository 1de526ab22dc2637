"""Lean serving, measured in one run against the bare Keras forward pass.

  memory      fresh interpreters: RSS after import, after loading, peak after a batch of 32 cells, for the
              bare Keras network (no TTA), the serving path in float32 and bfloat16, and the serving path
              with the views unchunked (every view of the batch through the network at once, as before)
  throughput  images/s of the compiled network in float32 and bfloat16 (bare, no TTA, batch of 32) and of the
              serving predictor with each TTA setting, in alternating rounds (best round kept), so load from
              other processes touches both sides alike
  accuracy    7-class accuracy and ROC AUC on the model's grouped test split, float32 vs bfloat16, card's TTA
  heatmap     peak memory of one Grad-CAM PNG for a 5000 x 5000 upload, against a 500 x 500 one

Usage: .venv/bin/python bench/bench_serving.py [--model DIR] [--out bench/results/serving.json]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from common import HERLEV_DIR, REPO_ROOT, herlev_cells, load_average, machine_info, repo_relative, write_json

from app.ml.inference import DEFAULT_MAX_IMAGES_PER_PASS, cpu_has_bf16, resolve_precision

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "serving.json"
BATCH = 32
ROUND_SECONDS = 6.0
ROUNDS = 3

# Runs in a fresh interpreter per configuration, so that nothing else this process holds counts.
MEMORY_CHILD = r"""
import json, os, resource, sys
sys.path.insert(0, os.getcwd())
from pathlib import Path

def rss():
    with open("/proc/self/status") as handle:
        return next(int(l.split()[1]) / 1024 for l in handle if l.startswith("VmRSS"))

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def private():
    with open("/proc/self/smaps_rollup") as handle:
        fields = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in handle.read().splitlines()[1:]}
    return {
        "private_mib": fields["Private_Clean"] + fields["Private_Dirty"],
        "shared_clean_mib": fields["Shared_Clean"],
    }

mode, model_dir, files = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
out = {}
import numpy as np
if mode == "bare":
    import tensorflow as tf
    from app.ml.artifact import read_card
    from app.ml.model import build_model, load_weights
    from app.ml.preprocessing import InputSpec, prepare_batch
    out["after_import"] = {"rss_mib": rss(), "peak_rss_mib": peak()}
    card = read_card(model_dir)
    spec = InputSpec.from_dict(card["input"])
    model = build_model(spec.size, 7, dropout=card["recipe"]["dropout"])
    load_weights(model, model_dir / card["weights_file"])
    forward = tf.function(lambda x: model(x, training=False))
    run = lambda data: forward(tf.constant(prepare_batch(data, spec), tf.float32)).numpy()
else:
    from app.ml.classifier import Classifier
    out["after_import"] = {"rss_mib": rss(), "peak_rss_mib": peak()}
    precision, per_pass = mode.split(":")
    classifier = Classifier.load(model_dir, precision=precision, max_images_per_pass=int(per_pass))
    run = classifier.predict
out["after_load"] = {"rss_mib": rss(), "peak_rss_mib": peak(), **private()}
data = [Path(f).read_bytes() for f in files]
run(data)
out["after_batch"] = {"rss_mib": rss(), "peak_rss_mib": peak(), **private(), "images": len(data)}
run(data)
out["after_second_batch"] = {"rss_mib": rss(), "peak_rss_mib": peak()}
out["imported"] = {name: name in sys.modules for name in ("matplotlib", "sklearn", "scipy", "skimage")}
print("RESULT " + json.dumps(out))
"""

HEATMAP_CHILD = r"""
import io, json, os, resource, sys
sys.path.insert(0, os.getcwd())
from pathlib import Path
from PIL import Image

def rss():
    with open("/proc/self/status") as handle:
        return next(int(l.split()[1]) / 1024 for l in handle if l.startswith("VmRSS"))

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

side, model_dir, cell = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
from app.ml.classifier import Classifier
from app.ml.explain import GradCam, heatmap_png
classifier = Classifier.load(model_dir, precision="float32")
cam = GradCam(classifier.predictor.model)
heatmap_png(cam, cell.read_bytes(), classifier.spec, 0)  # compiles; a small image
buffer = io.BytesIO()
Image.open(cell).convert("RGB").resize((side, side), Image.Resampling.BILINEAR).save(buffer, format="PNG")
upload = buffer.getvalue()
del buffer
before_rss, before_peak = rss(), peak()
png = heatmap_png(cam, upload, classifier.spec, 0)
print("RESULT " + json.dumps({
    "upload_side_px": side, "upload_bytes": len(upload), "png_size": Image.open(io.BytesIO(png)).size,
    "rss_before_mib": before_rss, "peak_before_mib": before_peak, "peak_after_mib": peak(),
    "heatmap_peak_increase_mib": max(0.0, peak() - max(before_rss, before_peak)),
    "decoded_rgb_mib": side * side * 3 / 2**20,
}))
"""


def child(script: str, args: list[str]) -> dict:
    """Run a probe in a fresh interpreter (from the repository root) and return its RESULT line."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    if result.returncode != 0 or line is None:
        sys.exit(f"probe {args[:1]} failed:\n{result.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def memory(model_dir: Path, files: list[Path]) -> dict:
    names = [str(path) for path in files]
    views = 8
    configs = {
        "bare_keras_float32_no_tta": "bare",
        f"serving_float32 ({DEFAULT_MAX_IMAGES_PER_PASS} images per pass)": f"float32:{DEFAULT_MAX_IMAGES_PER_PASS}",
        f"serving_bfloat16 ({DEFAULT_MAX_IMAGES_PER_PASS} images per pass)": f"bfloat16:{DEFAULT_MAX_IMAGES_PER_PASS}",
        f"serving_float32_unchunked ({BATCH * views} images per pass)": f"float32:{BATCH * views}",
    }
    return {name: child(MEMORY_CHILD, [mode, str(model_dir), *names]) for name, mode in configs.items()}


def heatmap_memory(model_dir: Path, cell: Path) -> dict:
    return {f"{side}x{side}": child(HEATMAP_CHILD, [str(side), str(model_dir), str(cell)]) for side in (500, 5000)}


def images_per_second(run, pixels, seconds: float = ROUND_SECONDS) -> float:
    """Calls of run(pixels) for about `seconds`, after one untimed call; images per second."""
    run(pixels)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(pixels)
        count += len(pixels)
    return count / (time.perf_counter() - start)


def throughput(model_dir: Path, pixels) -> dict:
    """Alternating rounds over every contender; the best round of each is kept."""
    import tensorflow as tf

    from app.ml.classifier import Classifier
    from app.ml.inference import VIEW_INDICES, Predictor

    contenders = {}
    for precision in ("float32", "bfloat16"):
        classifier = Classifier.load(model_dir, precision=precision)
        model = classifier.predictor.model
        bare = tf.function(lambda x, model=model: model(x, training=False))
        contenders[f"bare_keras_{precision}_no_tta"] = lambda p, bare=bare: bare(tf.constant(p, tf.float32)).numpy()
        for tta in VIEW_INDICES:
            contenders[f"serving_{precision}_{tta}"] = Predictor(model, tta, precision=precision)
    rounds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, run in contenders.items():
            rounds[name].append(images_per_second(run, pixels))
    best = {name: max(values) for name, values in rounds.items()}
    return {
        "images_per_s": best,
        "rounds": rounds,
        "bf16_over_float32_bare": best["bare_keras_bfloat16_no_tta"] / best["bare_keras_float32_no_tta"],
        "bf16_over_float32_serving_dihedral8": best["serving_bfloat16_dihedral8"] / best["serving_float32_dihedral8"],
        "serving_over_bare_float32_none": best["serving_float32_none"] / best["bare_keras_float32_no_tta"],
        "tta_relative_cost_float32": {
            tta: best["serving_float32_none"] / best[f"serving_float32_{tta}"] for tta in VIEW_INDICES
        },
    }


def accuracy(model_dir: Path) -> dict:
    """float32 vs bfloat16 on the grouped test split, with the card's TTA."""
    import numpy as np

    from app.ml.artifact import read_card
    from app.ml.classifier import Classifier
    from app.ml.data import discover, fixed_split, load_arrays
    from app.ml.evaluation import ABNORMAL_MASK, compute_metrics

    card = read_card(model_dir)
    dataset = discover(HERLEV_DIR)
    split = fixed_split(dataset, card["data"]["split"]["seed"], val_folds=card["data"]["split"]["val_folds"])
    x, y = load_arrays(dataset.subset(split.test), Classifier.load(model_dir, precision="float32").spec, False)
    probs = {}
    result: dict = {"n": int(len(y)), "tta": card["tta"], "fingerprint_matches": None}
    result["fingerprint_matches"] = dataset.fingerprint() == card["data"]["fingerprint_sha256"]
    for precision in ("float32", "bfloat16"):
        probs[precision] = Classifier.load(model_dir, precision=precision).predict_pixels(x)
        metrics = compute_metrics(y, probs[precision])
        result[precision] = {
            "accuracy_7class": metrics["multiclass"]["accuracy"],
            "roc_auc": metrics["binary"]["roc_auc"],
        }
    p_abn = {k: v[:, ABNORMAL_MASK].sum(axis=1) for k, v in probs.items()}
    lost = result["float32"]["accuracy_7class"] - result["bfloat16"]["accuracy_7class"]
    result["accuracy_points_lost"] = 100 * lost
    result["calls_changed"] = int((probs["float32"].argmax(1) != probs["bfloat16"].argmax(1)).sum())
    result["max_abs_p_abnormal_diff"] = float(np.abs(p_abn["float32"] - p_abn["bfloat16"]).max())
    return result


def table(result: dict) -> str:
    mem, thr, acc, heat = result["memory"], result["throughput"], result["accuracy"], result["heatmap_memory"]
    machine = result["machine"]
    lines = [
        f"{machine['cpu_model']} x {machine['cpus_usable']} · TF {machine['tensorflow']} · load avg before/after "
        f"{result['load_average_1_5_15']['before']} / {result['load_average_1_5_15']['after']}",
        "",
        f"{'memory (MiB, fresh process)':58}{'import':>8}{'loaded':>8}{'peak b32':>9}{'private':>9}",
    ]
    for name, row in mem.items():
        lines.append(
            f"{name:58}{row['after_import']['rss_mib']:8.0f}{row['after_load']['rss_mib']:8.0f}"
            f"{row['after_batch']['peak_rss_mib']:9.0f}{row['after_load']['private_mib']:9.0f}"
        )
    lines += ["", "throughput (images/s, best of rounds)"]
    lines += [f"  {name:40}{value:8.1f}" for name, value in thr["images_per_s"].items()]
    lines += [
        f"  bf16 / float32: bare {thr['bf16_over_float32_bare']:.2f}x, serving dihedral8 "
        f"{thr['bf16_over_float32_serving_dihedral8']:.2f}x",
        "  TTA cost (float32, time per image relative to none): "
        + ", ".join(f"{k} {v:.2f}x" for k, v in thr["tta_relative_cost_float32"].items()),
        "",
        f"accuracy on the grouped test split (n={acc['n']}, TTA {acc['tta']}): float32 "
        f"{acc['float32']['accuracy_7class']:.4f} / AUC {acc['float32']['roc_auc']:.4f}; bfloat16 "
        f"{acc['bfloat16']['accuracy_7class']:.4f} / AUC {acc['bfloat16']['roc_auc']:.4f}; "
        f"{acc['accuracy_points_lost']:+.2f} points lost, {acc['calls_changed']} calls changed, max |dP(abnormal)| "
        f"{acc['max_abs_p_abnormal_diff']:.4f}",
        "",
    ]
    for name, row in heat.items():
        lines.append(
            f"heatmap of a {name} upload: peak +{row['heatmap_peak_increase_mib']:.0f} MiB "
            f"(decoded RGB alone {row['decoded_rgb_mib']:.0f} MiB), PNG {row['png_size']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=None, help="default: PAPCAD_MODEL_DIR or the bundled model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from app.config import get_settings

    model_dir = (args.model or get_settings().model_dir).resolve()
    load_before = load_average()
    files = herlev_cells(BATCH)
    result: dict = {
        "benchmark": "lean serving: memory, float32 vs bfloat16, TTA cost, heatmap memory",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "note": "the CPU was shared with other work (a training run); compare ratios within this run",
        "model": repo_relative(model_dir),
        "cpu_flags_bf16": cpu_has_bf16(),
        "auto_precision": resolve_precision("auto"),
    }
    result["memory"] = memory(model_dir, files)
    result["heatmap_memory"] = heatmap_memory(model_dir, files[0])
    from app.ml.preprocessing import InputSpec, prepare_batch

    spec = InputSpec.from_dict(json.loads((model_dir / "model_card.json").read_text())["input"])
    pixels = prepare_batch([Path(f).read_bytes() for f in files], spec)
    result["throughput"] = throughput(model_dir, pixels)
    result["accuracy"] = accuracy(model_dir)
    result["load_average_1_5_15"] = {"before": load_before, "after": load_average()}
    print(table(result))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
