"""The full-size site-adaptation run on a simulated second laboratory.

1. The site: every Herlev image of the base model's training and validation splits, under the fixed
   stain and scale shift of `app.ml.site_shift`, in accessions of about 8 cells (one Herlev cell group
   never on two accessions). The base model's Herlev test split stays out of the site entirely, so the
   forgetting check on it is clean.
2. Each cell goes in through `create_prediction` (the upload path of the API) and is reviewed as a
   pathologist with its true class (confirm or override), into a fresh SQLite database.
3. `papcad adapt --base <model> --out <out> --base-data <herlev>` runs as a subprocess on that database.
4. Extra, outside the card: the shifted Herlev *test* split (cells neither model saw in any form) is
   scored by the base and the adapted model.

    .venv/bin/python bench/site_adaptation.py --work /tmp/site_run [--epochs N] [--limit N] [--copies N]

`--copies 2` uploads every site cell twice (the second copy turned by 90 degrees, same accession): 1,466
reviewed cells, for timing `papcad adapt` at the size a laboratory reaches first. The copies are not new
cells, so that run's accuracy figures say less than the 733-cell run's.

Results: bench/results/site_adaptation.json and the adapted model in <work>/adapted (not in the repo).
"""

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH_DIR, HERLEV_DIR, REPO_ROOT, machine_info, write_json
from PIL import Image

from app.config import BUNDLED_MODEL, Settings
from app.db.migrate import upgrade_to_head
from app.db.session import make_engine, make_session_factory
from app.ml.batching import DynamicBatcher
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.data import discover, fixed_split
from app.ml.evaluation import compute_metrics
from app.ml.finetune import AdaptConfig
from app.ml.preprocessing import prepare_image
from app.ml.site_shift import DESCRIPTION, site_png
from app.services import accounts, reviews
from app.services import predictions as service
from app.services.actors import SYSTEM, Actor
from app.services.images import ImageStore

CELLS_PER_ACCESSION = 8


def accessions(groups: list[str]) -> dict[str, str]:
    """Herlev cell group -> accession, in a fixed pseudo-random order, about 8 cells each."""
    ordered = sorted(set(groups), key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    sizes = {g: groups.count(g) for g in ordered}
    out, current, filled = {}, 0, 0
    for group in ordered:
        if filled >= CELLS_PER_ACCESSION:
            current, filled = current + 1, 0
        out[group] = f"SITE-{current:04d}"
        filled += sizes[group]
    return out


def turned(png: bytes, quarter_turns: int) -> bytes:
    """The same PNG turned by quarter_turns x 90 degrees (a cell has no orientation)."""
    if quarter_turns % 4 == 0:
        return png
    with Image.open(io.BytesIO(png)) as image:
        rotated = image.rotate(90 * quarter_turns, expand=True)
    buffer = io.BytesIO()
    rotated.save(buffer, format="PNG")
    return buffer.getvalue()


def populate(database_url: str, data_dir: Path, model_dir: Path, limit: int | None, copies: int = 1) -> dict:
    dataset = discover(HERLEV_DIR)
    card_split = Classifier.load(model_dir).card["data"]["split"]
    split = fixed_split(dataset, card_split["seed"], val_folds=card_split["val_folds"])
    site = sorted(list(split.train) + list(split.val))
    if limit is not None:  # every k-th image, so a small site still has every class
        site = site[:: max(1, len(site) // limit)][:limit]
    samples = [dataset.samples[i] for i in site]
    slide_of = accessions([s.group for s in samples])
    settings = Settings(data_dir=data_dir, database_url=database_url, model_dir=model_dir)
    upgrade_to_head(database_url)
    factory = make_session_factory(make_engine(database_url))
    with factory() as session:
        accounts.create_api_client(session, SYSTEM, "site-lis")
        pathologist = accounts.create_user(session, SYSTEM, "site-pathologist", "correct-horse-battery", "pathologist")
        session.commit()
        reviewer = Actor.of_user(pathologist)
    classifier = Classifier.load(model_dir)
    batcher = DynamicBatcher(classifier)
    store = ImageStore()
    lis = Actor("apikey", 1, "site-lis")
    started = time.monotonic()
    uploads = [(sample, copy) for copy in range(copies) for sample in samples]
    for n, (sample, copy) in enumerate(uploads, 1):
        submission = service.Submission(
            turned(site_png(sample.path.read_bytes()), copy), "api", slide_of[sample.group], sample.path.name
        )
        with factory() as session:
            prediction, _ = service.create_prediction(session, batcher, store, settings, lis, submission)
        label = CLASS_NAMES[sample.label]
        action = "confirm" if label == prediction.predicted_class else "override"
        with factory() as session:
            reviews.add_review(session, reviewer, prediction.id, action, label if action == "override" else None, None)
        if n % 100 == 0:
            print(f"{n}/{len(uploads)} cells uploaded and reviewed", flush=True)
    batcher.stop()
    return {
        "cells": len(uploads),
        "copies_per_cell": copies,
        "accessions": len(set(slide_of.values())),
        "minutes": round((time.monotonic() - started) / 60, 1),
        "test_split": [int(i) for i in split.test],
    }


def clean_site_test(base_dir: Path, adapted_dir: Path, test: list[int]) -> dict:
    """Base and adapted model on the shifted Herlev test split: cells neither model saw in any form."""
    import numpy as np

    dataset = discover(HERLEV_DIR)
    samples = [dataset.samples[i] for i in test]
    out = {"n": len(samples)}
    labels = np.array([s.label for s in samples])
    for name, folder in (("base", base_dir), ("adapted", adapted_dir)):
        classifier = Classifier.load(folder)
        pixels = np.stack([prepare_image(site_png(s.path.read_bytes()), classifier.spec) for s in samples])
        metrics = compute_metrics(labels, classifier.predict_pixels(pixels))
        out[name] = {
            "accuracy_7class": metrics["multiclass"]["accuracy"],
            "binary_accuracy": metrics["binary"]["accuracy"],
            "binary_roc_auc": metrics["binary"]["roc_auc"],
            "binary_sensitivity": metrics["binary"]["sensitivity"],
            "binary_specificity": metrics["binary"]["specificity"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="Empty folder for the database and the model.")
    parser.add_argument("--model", type=Path, default=REPO_ROOT / BUNDLED_MODEL)
    parser.add_argument("--epochs", type=int, default=AdaptConfig.epochs)
    parser.add_argument("--learning-rate", type=float, default=AdaptConfig.learning_rate)
    parser.add_argument("--out", type=Path, default=None, help="Adapted model directory; default: <work>/adapted.")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N site cells.")
    parser.add_argument("--copies", type=int, default=1, help="Upload every site cell this many times (turned).")
    parser.add_argument("--populate-only", action="store_true", help="Build the site database, do not adapt.")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results" / "site_adaptation.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data_dir = args.work / "data"
    database_url = f"sqlite:///{(data_dir / 'papcad.db').as_posix()}"
    data_dir.mkdir(exist_ok=True)
    result = {"machine": machine_info(), "site_shift": DESCRIPTION, "base_model": args.model.name}
    site_file = args.work / "site.json"
    if not site_file.is_file():  # populate once; later runs adapt the same site again
        site_file.write_text(json.dumps(populate(database_url, data_dir, args.model, args.limit, args.copies)))
    result["site"] = json.loads(site_file.read_text())
    print(f"site ready: {result['site']['cells']} cells in {result['site']['accessions']} accessions", flush=True)
    if args.populate_only:
        return
    out = args.out or args.work / "adapted"
    command = [
        sys.executable, "-m", "app.cli", "adapt", "--base", str(args.model), "--out", str(out),
        "--base-data", str(HERLEV_DIR), "--epochs", str(args.epochs),
        "--learning-rate", str(args.learning_rate),
    ]  # fmt: skip
    env = {**os.environ, "DATABASE_URL": database_url, "PAPCAD_DATA_DIR": str(data_dir)}
    started = time.monotonic()
    subprocess.run(command, env=env, cwd=REPO_ROOT, check=True)
    result["adapt_minutes"] = round((time.monotonic() - started) / 60, 1)
    result["command"] = (
        f"papcad adapt --base <model> --out <out> --base-data <herlev> --epochs {args.epochs} "
        f"--learning-rate {args.learning_rate}"
    )
    card = json.loads((out / "model_card.json").read_text())
    keys = ("site_data", "site_metrics", "base_test_metrics", "minutes", "minutes_by_phase")
    result["card"] = {k: card["adaptation"][k] for k in keys}
    result["card"]["routing"] = card.get("routing")
    result["shifted_herlev_test"] = clean_site_test(args.model, out, result["site"].pop("test_split"))
    write_json(result, args.results)
    print(json.dumps({k: result[k] for k in ("adapt_minutes", "shifted_herlev_test")}, indent=2))


if __name__ == "__main__":
    main()
