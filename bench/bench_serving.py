"""Lean serving, measured in one run against the bare Keras forward pass.

  memory      fresh interpreters: RSS after import, after loading, peak after a batch of 32 cells, for the
              bare Keras network (no TTA), the serving path in float32, bfloat16, int8 (LiteRT) and, for a
              model whose int8 network failed its check, float16 weights (LiteRT), the float32
              serving path with the views unchunked (every view of the batch through the network at once), and
              a whole server (create_app() started by a TestClient, SQLite) with PAPCAD_INFERENCE_PRECISION
              auto (the card's LiteRT network for an exported model) and float32: RSS once /readyz answers,
              peak after its classifier classifies a batch of 32; and whether TensorFlow was imported
  throughput  images/s of the compiled Keras network in float32 and bfloat16 (bare, no TTA, batch of 32) and of
              the serving predictor in each precision with each TTA setting, in alternating rounds
              (best round kept), so load from other processes touches every contender alike
  accuracy    7-class accuracy, ROC AUC and sensitivity at the card's cut-off on the model's grouped test split,
              float32 vs bfloat16 vs int8 (vs float16), card's TTA; calls changed against float32
  heatmap     peak memory of one heatmap PNG (classifier.heatmap: Grad-CAM in float32, the class map in int8)
              for a 5000 x 5000 upload, against a 500 x 500 one

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

from app.ml.artifact import read_card
from app.ml.runtime import (
    DEFAULT_MAX_IMAGES_PER_PASS,
    LITE_PRECISIONS,
    PRECISION_ENV,
    cpu_has_bf16,
    resolve_precision,
)

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "serving.json"
BATCH = 32
ROUND_SECONDS = 6.0
ROUNDS = 3
PRECISIONS = ("float32", "bfloat16", "int8", "float16")
# The bars: loaded RSS and peak after a batch of 32 (MiB); reduced precision: speed-up at accuracy lost.
MAX_LOADED_MIB, MAX_PEAK_MIB = 600, 900
MIN_SPEEDUP, MAX_POINTS_LOST = 1.8, 0.5

# Shared by the probes below, which each run in a fresh interpreter so that nothing else this process holds counts.
PROBE_HELPERS = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
from pathlib import Path

def status(field):
    with open("/proc/self/status") as handle:
        return next(int(l.split()[1]) / 1024 for l in handle if l.startswith(field + ":"))

def rss():
    return status("VmRSS")

def peak():
    # VmHWM, not getrusage's ru_maxrss: that survives exec, so it would start at the parent's RSS.
    return status("VmHWM")

def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        handle.write("5")

def private():
    with open("/proc/self/smaps_rollup") as handle:
        fields = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in handle.read().splitlines()[1:]}
    return {
        "private_mib": fields["Private_Clean"] + fields["Private_Dirty"],
        "shared_clean_mib": fields["Shared_Clean"],
    }

def batch_peaks(work, images):
    # One batch: RSS after it, the process's peak so far, and the peak while the batch ran.
    before = peak()
    reset_peak()
    work()
    during = peak()
    return {"rss_mib": rss(), "peak_rss_mib": max(before, during), "batch_peak_rss_mib": during, **private(),
            "images": images}

def imported():
    names = ("tensorflow", "keras", "ai_edge_litert", "matplotlib", "sklearn", "scipy", "skimage")
    return {name: name in sys.modules for name in names}

def two_batches(out, predict, files):
    # The batch of cells twice: the peak of the first, RSS after the second, and what was imported by then.
    data = [Path(f).read_bytes() for f in files]
    out["after_batch"] = batch_peaks(lambda: predict(data), len(data))
    predict(data)
    out["after_second_batch"] = {"rss_mib": rss(), "peak_rss_mib": peak()}
    out["imported"] = imported()
"""

MEMORY_CHILD = (
    PROBE_HELPERS
    + r"""
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
    model = build_model(spec.size, 7, dropout=card["recipe"]["dropout"],
                        normalization=card["input"].get("normalization", "caffe"))
    load_weights(model, model_dir / card["weights_file"])
    forward = tf.function(lambda x: model(x, training=False))
    run = lambda data: forward(tf.constant(prepare_batch(data, spec), tf.float32)).numpy()
    out["precision"] = "float32"
else:
    from app.ml.classifier import Classifier
    out["after_import"] = {"rss_mib": rss(), "peak_rss_mib": peak()}
    precision, per_pass = mode.split(":")
    classifier = Classifier.load(model_dir, precision=precision, max_images_per_pass=int(per_pass))
    run = classifier.predict
    out["precision"] = classifier.predictor.precision
out["after_load"] = {"rss_mib": rss(), "peak_rss_mib": peak(), **private()}
two_batches(out, run, files)
print("RESULT " + json.dumps(out))
"""
)

# A whole server: the app's own start-up (migrations, registry, model), then its own classifier on a batch.
SERVER_CHILD = (
    PROBE_HELPERS
    + r"""
data_dir, files = Path(sys.argv[1]), sys.argv[2:]
from fastapi.testclient import TestClient
from app.config import Settings
from app.main import create_app
out = {"after_import": {"rss_mib": rss(), "peak_rss_mib": peak()}}
settings = Settings(data_dir=data_dir, database_url=None)
with TestClient(create_app(settings)) as client:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    out["readyz"] = response.json()
    out["after_ready"] = {"rss_mib": rss(), "peak_rss_mib": peak(), **private()}
    out["imported_at_ready"] = imported()
    context = client.app.state.context
    classifier = context.models.held() if context.models is not None else context.classifier
    two_batches(out, classifier.predict, files)
print("RESULT " + json.dumps(out))
"""
)

HEATMAP_CHILD = (
    PROBE_HELPERS
    + r"""
import io
from PIL import Image

precision, side, model_dir, cell = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
from app.ml.classifier import Classifier
from app.ml.explain import heatmap_png
classifier = Classifier.load(model_dir, precision=precision)
heatmap_png(classifier.heatmap, cell.read_bytes(), classifier.spec, 0)  # builds and compiles; a small image
buffer = io.BytesIO()
Image.open(cell).convert("RGB").resize((side, side), Image.Resampling.BILINEAR).save(buffer, format="PNG")
upload = buffer.getvalue()
del buffer
reset_peak()
before_rss = rss()
png = heatmap_png(classifier.heatmap, upload, classifier.spec, 0)
during = peak()
print("RESULT " + json.dumps({
    "precision": classifier.predictor.precision,
    "upload_side_px": side, "upload_bytes": len(upload), "png_size": Image.open(io.BytesIO(png)).size,
    "rss_before_mib": before_rss, "peak_during_mib": during,
    "heatmap_peak_increase_mib": max(0.0, during - before_rss),
    "decoded_rgb_mib": side * side * 3 / 2**20,
    "imported": imported(),
}))
"""
)


def child(script: str, args: list[str], extra_env: dict[str, str] | None = None) -> dict:
    """Run a probe in a fresh interpreter (from the repository root) and return its RESULT line.

    PAPCAD_INFERENCE_PRECISION is unset in the probe ("auto") unless extra_env sets it.
    """
    env = {k: v for k, v in os.environ.items() if k != PRECISION_ENV} | (extra_env or {})
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False, env=env
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    if result.returncode != 0 or line is None:
        sys.exit(f"probe {args[:1]} failed:\n{result.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def precisions(card: dict) -> list[str]:
    """The precisions this model can serve: the Keras ones and the LiteRT files its card names."""
    serving = card.get("serving") or {}
    return [p for p in PRECISIONS if p not in LITE_PRECISIONS or serving.get(p)]


def memory(model_dir: Path, files: list[Path]) -> dict:
    names = [str(path) for path in files]
    views = 8
    per_pass = DEFAULT_MAX_IMAGES_PER_PASS
    configs = {"bare_keras_float32_no_tta": "bare"}
    configs |= {
        f"serving_{p} ({per_pass} images per pass)": f"{p}:{per_pass}" for p in precisions(read_card(model_dir))
    }
    configs[f"serving_float32_unchunked ({BATCH * views} images per pass)"] = f"float32:{BATCH * views}"
    return {name: child(MEMORY_CHILD, [mode, str(model_dir), *names]) for name, mode in configs.items()}


def server_memory(model_dir: Path, files: list[Path], tmp: Path) -> dict:
    """The server process, with the precision setting left to auto and forced to float32."""
    from app.config import DEFAULT_MODEL_DIR

    names = [str(path) for path in files]
    # The bundled model is the server's default; another is named as an operator would.
    env = {} if model_dir == DEFAULT_MODEL_DIR.resolve() else {"PAPCAD_MODEL_DIR": str(model_dir)}
    return {
        f"server_{setting}": child(
            SERVER_CHILD,
            [str(tmp / f"server-{setting}"), *names],
            env if setting == "auto" else env | {PRECISION_ENV: setting},
        )
        for setting in ("auto", "float32")
    }


def heatmap_memory(model_dir: Path, cell: Path) -> dict:
    return {
        f"{precision} {side}x{side}": child(HEATMAP_CHILD, [precision, str(side), str(model_dir), str(cell)])
        for precision in ("float32", "int8")
        for side in (500, 5000)
    }


def images_per_second(run, pixels, seconds: float = ROUND_SECONDS) -> float:
    """Calls of run(pixels) for at least `seconds` (at least one call); images per second."""
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        run(pixels)
        count += len(pixels)
    return count / (time.perf_counter() - start)


def throughput(model_dir: Path, pixels) -> dict:
    """Alternating rounds over every contender, after one untimed call each; the best round of each is kept."""
    import tensorflow as tf

    from app.ml.classifier import Classifier
    from app.ml.inference import Predictor
    from app.ml.lite import LitePredictor
    from app.ml.runtime import VIEW_INDICES

    contenders = {}
    for precision in ("float32", "bfloat16"):
        model = Classifier.load(model_dir, precision=precision).network
        bare = tf.function(lambda x, model=model: model(x, training=False))
        contenders[f"bare_keras_{precision}_no_tta"] = lambda p, bare=bare: bare(tf.constant(p, tf.float32)).numpy()
        for tta in VIEW_INDICES:
            contenders[f"serving_{precision}_{tta}"] = Predictor(model, tta, precision=precision)
    card = read_card(model_dir)
    lite = [p for p in precisions(card) if p in LITE_PRECISIONS]
    for precision in lite:
        section = card["serving"][precision]
        for tta in VIEW_INDICES:
            contenders[f"serving_{precision}_{tta}"] = LitePredictor(
                model_dir / section["file"], tta, tuple(section["feature_dims"]), precision=precision
            )
    for run in contenders.values():
        run(pixels)
    rounds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, run in contenders.items():
            rounds[name].append(images_per_second(run, pixels))
    best = {name: max(values) for name, values in rounds.items()}
    return {
        "images_per_s": best,
        "rounds": rounds,
        "card_tta": card["tta"],
        "bf16_over_float32_bare": best["bare_keras_bfloat16_no_tta"] / best["bare_keras_float32_no_tta"],
        "bf16_over_float32_serving": {
            tta: best[f"serving_bfloat16_{tta}"] / best[f"serving_float32_{tta}"] for tta in VIEW_INDICES
        },
        **{
            f"{precision}_over_float32_serving": {
                tta: best[f"serving_{precision}_{tta}"] / best[f"serving_float32_{tta}"] for tta in VIEW_INDICES
            }
            for precision in lite
        },
        "int8_none_over_bare_keras_float32": best["serving_int8_none"] / best["bare_keras_float32_no_tta"],
        "serving_over_bare_float32_none": best["serving_float32_none"] / best["bare_keras_float32_no_tta"],
        "tta_relative_cost": {
            precision: {
                tta: best[f"serving_{precision}_none"] / best[f"serving_{precision}_{tta}"] for tta in VIEW_INDICES
            }
            for precision in precisions(card)
        },
    }


def accuracy(model_dir: Path) -> dict:
    """float32 vs bfloat16 vs int8 (vs float16) on the grouped test split, with the card's TTA, calibration and
    cut-off."""
    import numpy as np

    from app.ml.classifier import Classifier
    from app.ml.data import discover, fixed_split, load_arrays
    from app.ml.evaluation import compute_metrics

    card = read_card(model_dir)
    dataset = discover(HERLEV_DIR)
    split = fixed_split(dataset, card["data"]["split"]["seed"], val_folds=card["data"]["split"]["val_folds"])
    reference = Classifier.load(model_dir, precision="float32")
    x, y = load_arrays(dataset.subset(split.test), reference.spec, False)
    abnormal = reference.abnormal_mask[y]
    cut = reference.abnormal_threshold
    result: dict = {"n": int(len(y)), "tta": card["tta"], "abnormal_cutoff": cut}
    result["fingerprint_matches"] = dataset.fingerprint() == card["data"]["fingerprint_sha256"]
    probs, p_abn = {}, {}
    for precision in precisions(card):
        classifier = reference if precision == "float32" else Classifier.load(model_dir, precision=precision)
        started = time.perf_counter()
        probs[precision] = classifier.predict_pixels(x)
        seconds = (time.perf_counter() - started) / len(x)
        p_abn[precision] = probs[precision][:, classifier.abnormal_mask].sum(axis=1)
        metrics = compute_metrics(y, probs[precision])
        result[precision] = {
            "accuracy_7class": metrics["multiclass"]["accuracy"],
            "roc_auc": metrics["binary"]["roc_auc"],
            "cutoff_sensitivity": float(np.mean(p_abn[precision][abnormal] >= cut)),
            "seconds_per_cell": seconds,
        }
    for precision in precisions(card)[1:]:
        ours, base = result[precision], result["float32"]
        result[f"{precision}_vs_float32"] = {
            "accuracy_points_lost": 100 * (base["accuracy_7class"] - ours["accuracy_7class"]),
            "sensitivity_points_lost": 100 * (base["cutoff_sensitivity"] - ours["cutoff_sensitivity"]),
            "calls_changed": int((probs["float32"].argmax(1) != probs[precision].argmax(1)).sum()),
            "cutoff_verdicts_changed": int(((p_abn["float32"] >= cut) != (p_abn[precision] >= cut)).sum()),
            "max_abs_p_abnormal_diff": float(np.abs(p_abn["float32"] - p_abn[precision]).max()),
        }
    return result


def bars(result: dict) -> dict:
    """The issue's bars, read off this run."""
    mem, server, thr, acc = result["memory"], result["server_memory"], result["throughput"], result["accuracy"]
    int8_row = next(row for name, row in mem.items() if name.startswith("serving_int8"))
    tta = thr["card_tta"]

    def memory_bar(loaded: float, peak: float) -> dict:
        return {
            "loaded_rss_mib": loaded,
            "peak_after_batch_mib": peak,
            "passed": loaded <= MAX_LOADED_MIB and peak <= MAX_PEAK_MIB,
        }

    return {
        "memory": f"loaded RSS <= {MAX_LOADED_MIB} MiB and peak <= {MAX_PEAK_MIB} MiB after a batch of {BATCH}",
        "serving_int8": memory_bar(int8_row["after_load"]["rss_mib"], int8_row["after_batch"]["peak_rss_mib"]),
        "server_auto": memory_bar(
            server["server_auto"]["after_ready"]["rss_mib"], server["server_auto"]["after_batch"]["peak_rss_mib"]
        ),
        "reduced_precision": f">= {MIN_SPEEDUP}x throughput at <= {MAX_POINTS_LOST} points of accuracy lost",
        "int8": {
            f"speedup_serving_{tta}": thr["int8_over_float32_serving"][tta],
            "accuracy_points_lost": acc["int8_vs_float32"]["accuracy_points_lost"],
            "passed": thr["int8_over_float32_serving"][tta] >= MIN_SPEEDUP
            and acc["int8_vs_float32"]["accuracy_points_lost"] <= MAX_POINTS_LOST,
        },
        "auto_chosen_and_stated": server["server_auto"]["readyz"].get("inference_precision"),
    }


def table(result: dict) -> str:
    mem, thr, acc, heat = result["memory"], result["throughput"], result["accuracy"], result["heatmap_memory"]
    server, machine = result["server_memory"], result["machine"]
    lines = [
        f"{machine['cpu_model']} x {machine['cpus_usable']} · TF {machine['tensorflow']} · load avg before/after "
        f"{result['load_average_1_5_15']['before']} / {result['load_average_1_5_15']['after']}",
        "",
        f"{'memory (MiB, fresh process)':50}{'import':>8}{'loaded':>8}{'peak b32':>9}{'private':>9}{'TF':>6}",
    ]
    for name, row in mem.items():
        lines.append(
            f"{name:50}{row['after_import']['rss_mib']:8.0f}{row['after_load']['rss_mib']:8.0f}"
            f"{row['after_batch']['peak_rss_mib']:9.0f}{row['after_load']['private_mib']:9.0f}"
            f"{'yes' if row['imported']['tensorflow'] else 'no':>6}"
        )
    for name, row in server.items():
        label = f"{name} (runs {row['readyz']['inference_precision']}; loaded = at /readyz)"
        lines.append(
            f"{label:50}{row['after_import']['rss_mib']:8.0f}{row['after_ready']['rss_mib']:8.0f}"
            f"{row['after_batch']['peak_rss_mib']:9.0f}{row['after_ready']['private_mib']:9.0f}"
            f"{'yes' if row['imported']['tensorflow'] else 'no':>6}"
        )
    lines += ["", "throughput (images/s, batch of 32, best of rounds)"]
    lines += [f"  {name:40}{value:8.1f}" for name, value in thr["images_per_s"].items()]
    lines += [
        f"  {precision} / float32, serving: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in thr[f"{precision}_over_float32_serving"].items())
        for precision in LITE_PRECISIONS
        if f"{precision}_over_float32_serving" in thr
    ]
    lines += [
        "  bf16 / float32, serving: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in thr["bf16_over_float32_serving"].items())
        + f"; bare {thr['bf16_over_float32_bare']:.2f}x",
        f"  int8 none / bare Keras float32: {thr['int8_none_over_bare_keras_float32']:.2f}x",
    ]
    for precision, costs in thr["tta_relative_cost"].items():
        lines.append(
            f"  TTA cost ({precision}, time per image relative to none): "
            + ", ".join(f"{k} {v:.2f}x" for k, v in costs.items())
        )
    lines += [
        "",
        f"accuracy on the grouped test split (n={acc['n']}, TTA {acc['tta']}, cut-off {acc['abnormal_cutoff']:.3f})",
    ]
    for precision in [p for p in PRECISIONS if p in acc]:
        row = acc[precision]
        line = (
            f"  {precision:9} accuracy {row['accuracy_7class']:.4f}  AUC {row['roc_auc']:.4f}  sensitivity "
            f"{row['cutoff_sensitivity']:.4f}  {row['seconds_per_cell']:.3f} s/cell"
        )
        if precision != "float32":
            diff = acc[f"{precision}_vs_float32"]
            line += (
                f"  | {diff['accuracy_points_lost']:+.2f} points lost, {diff['calls_changed']} calls changed, "
                f"max |dP(abnormal)| {diff['max_abs_p_abnormal_diff']:.4f}"
            )
        lines.append(line)
    lines.append("")
    for name, row in heat.items():
        lines.append(
            f"heatmap ({name} upload): peak +{row['heatmap_peak_increase_mib']:.0f} MiB "
            f"(decoded RGB alone {row['decoded_rgb_mib']:.0f} MiB), PNG {row['png_size']}"
        )
    lines += ["", "bars: " + json.dumps(result["bars"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=None, help="default: PAPCAD_MODEL_DIR or the bundled model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import tempfile

    from app.config import get_settings

    model_dir = (args.model or get_settings().model_dir).resolve()
    card = read_card(model_dir)
    if not (card.get("serving") or {}).get("int8"):
        sys.exit(f"error: {model_dir} has no int8 serving network; run papcad export --model {model_dir} first")
    load_before = load_average()
    files = herlev_cells(BATCH)
    result: dict = {
        "benchmark": "lean serving: memory (classifier and server), float32 vs bfloat16 vs int8, TTA cost, heatmaps",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "note": "the CPU was shared with other work (long model runs); compare ratios within this run",
        "model": repo_relative(model_dir),
        "cpu_flags_bf16": cpu_has_bf16(),
        "auto_precision": resolve_precision("auto", card),
        "int8_export_check": card["serving"].get("check"),
    }
    result["memory"] = memory(model_dir, files)
    with tempfile.TemporaryDirectory(prefix="papcad-bench-") as tmp:
        result["server_memory"] = server_memory(model_dir, files, Path(tmp))
    result["heatmap_memory"] = heatmap_memory(model_dir, files[0])
    from app.ml.preprocessing import InputSpec, prepare_batch

    pixels = prepare_batch([Path(f).read_bytes() for f in files], InputSpec.from_dict(card["input"]))
    result["throughput"] = throughput(model_dir, pixels)
    result["accuracy"] = accuracy(model_dir)
    result["load_average_1_5_15"] = {"before": load_before, "after": load_average()}
    result["bars"] = bars(result)
    print(table(result))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
