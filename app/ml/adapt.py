"""Adapt a model to one laboratory from the cells its own reviewers labelled.

    site cells --(grouped by accession)--> train | validation | held-out test
    base model's network --fine-tune on site train--> site network
    site validation --> early stopping, temperature and abnormal cut-off
    site train vs the general model's training images --> routing gate (`app.ml.routing`)
    held-out site + the general model's test split --> before / after, as served

With the base model's training data (`--base-data`) the adapted model routes: the site network answers for the
cells that look like the site's, the general model (a copy of the base, unchanged) for every other cell. One
network cannot learn a lab's stain and framing well and keep all its other calls (the forgetting check counted
about 15 of Herlev's 184 test calls changing, both ways, under a recipe made not to forget), so the site network
is fine-tuned for the site alone (`app.ml.finetune`):
  * BatchNorm statistics re-estimated on the site's cells first, then frozen (a stain and scale change moves
    every layer's inputs; new statistics re-centre them at once);
  * a small learning rate with a one-epoch warm-up and cosine decay, the early stages slowest, a light L2-SP
    pull towards the base weights, label smoothing;
  * the epoch kept is the one with the best 7-class accuracy on the site's validation accessions.
Each call keeps the version, weights and cut-off of the network that made it (the site network's cut-off is
refitted on the site's validation accessions). Without base data there is no gate: the site network serves
every cell, and nothing measures what it forgot.
The site network gets its own typical-cell (OOD) model (`app.ml.ood_fit.fit_from_features`); the general
model keeps its own. No database, no HTTP: the caller hands over the site cells (see `app.services.site_data`).
"""

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from app.errors import DatasetError, InputError, InvalidImageError
from app.ml import calibration as cal
from app.ml.artifact import WEIGHTS_FILE, read_card, sha256_file, write_card
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier, Routing
from app.ml.data import Dataset, discover, fixed_split, load_arrays
from app.ml.evaluation import ABNORMAL_MASK, compute_metrics, write_report
from app.ml.export import export_lite, score
from app.ml.finetune import AdaptConfig as AdaptConfig  # adapt()'s recipe argument
from app.ml.finetune import fine_tune, validation_judge
from app.ml.input_checks import as_sent, input_flags
from app.ml.model import save_weights
from app.ml.ood_fit import every_kth, fit_from_features, pixel_features
from app.ml.preprocessing import InputSpec, decode_image, prepare_image
from app.ml.routing import GATE_FILE, GENERAL_DIR, DomainGate
from app.ml.site_cells import MIN_ACCESSIONS as MIN_ACCESSIONS
from app.ml.site_cells import MIN_REVIEWED_CELLS as MIN_REVIEWED_CELLS
from app.ml.site_cells import SiteCell as SiteCell
from app.ml.site_cells import TooFewCellsError as TooFewCellsError
from app.ml.site_cells import check_enough as check_enough

TARGET_SENSITIVITY = 0.95  # as for the base model: a missed abnormal cell is the costly error
SITE_TEST_FOLDS = 5  # 1/5 of the site's accessions held out for the before/after comparison
SITE_VAL_FOLDS = 5  # 1/5 of the rest for the temperature and cut-off
OOD_FIT_CELLS = 512  # training cells for the typical-cell model and the routing gate (8 views each: time)
OOD_SET_CELLS = 20  # images per non-cell set in its check (the shipped model's card uses 40)


@dataclass(frozen=True)
class SiteSplit:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_site(labels: np.ndarray, groups: np.ndarray, seed: int) -> SiteSplit:
    """Grouped by accession, stratified by class: one slide's cells never sit on two sides."""
    indices = np.arange(len(labels))
    try:
        rest, test = next(StratifiedGroupKFold(SITE_TEST_FOLDS, shuffle=True, random_state=seed).split(
            indices, labels, groups))  # fmt: skip
        train_local, val_local = next(
            StratifiedGroupKFold(SITE_VAL_FOLDS, shuffle=True, random_state=seed).split(
                rest, labels[rest], groups[rest]
            )
        )
    except ValueError as exc:  # fewer accessions than folds on one side
        raise TooFewCellsError(f"the accessions cannot be split into train/validation/test: {exc}") from exc
    return SiteSplit(train=rest[train_local], val=rest[val_local], test=test)


def site_arrays(cells: Sequence[SiteCell], spec: InputSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Network input, label indices and accession of every cell."""
    pixels = []
    for cell in tqdm(cells, desc="preparing site cells", unit="img", disable=len(cells) < 200):
        try:
            pixels.append(prepare_image(cell.data, spec))
        except InvalidImageError as exc:  # stored images were checked on upload; this is damage
            raise DatasetError(f"a stored image of accession {cell.group} cannot be read: {exc}") from exc
    labels = np.array([CLASS_NAMES.index(c.label) for c in cells])
    return np.stack(pixels), labels, np.array([c.group for c in cells])


@dataclass
class BaseData:
    """The base model's training data: its training images (the gate's general side, the typical-cell model's,
    mixed into fine-tuning when `base_share` > 0), its validation split (joined to the site's for the typical-cell
    cut-off and the gate's check) and its own test split for the forgetting check."""

    dataset: Dataset
    mix: np.ndarray
    val: np.ndarray | None  # None (like test) when the data is not what the base model was trained on
    test: np.ndarray | None
    note: str


def base_data(folder: Path, card: dict[str, Any]) -> BaseData:
    dataset = discover(folder)
    data = card.get("data") or {}
    split_info = data.get("split") or {}
    if data.get("fingerprint_sha256") and dataset.fingerprint() == data["fingerprint_sha256"] and split_info:
        split = fixed_split(dataset, split_info["seed"], val_folds=split_info["val_folds"])
        note = (
            "the base model's training data: its train split as the general images of the gate and the "
            "typical-cell model, its validation split joined to the site's validation, its test split held out"
        )
        return BaseData(dataset, split.train, split.val, split.test, note)
    note = (
        "not the data the base model was trained on (fingerprint differs or the card has none): all of it as the "
        "general images, no forgetting check"
    )
    return BaseData(dataset, np.arange(len(dataset.samples)), None, None, note)


def _summary(labels: np.ndarray, probs: np.ndarray, threshold: float | np.ndarray) -> dict[str, Any]:
    """The figures the card and the admin page show for one model on one set of cells; threshold: the cut-off,
    or each cell's (a routed model reads each call at the cut-off of the model that made it)."""
    result = compute_metrics(labels, probs)
    p_abnormal, abnormal = probs[:, ABNORMAL_MASK].sum(axis=1), ABNORMAL_MASK[labels]
    sensitivity, specificity = cal.sensitivity_specificity(p_abnormal, abnormal, threshold)
    cutoffs = np.unique(threshold)
    return {
        "n": result["n"],
        "accuracy_7class": result["multiclass"]["accuracy"],
        "macro_f1": result["multiclass"]["macro_f1"],
        "binary_accuracy": result["binary"]["accuracy"],
        "binary_sensitivity": result["binary"]["sensitivity"],
        "binary_specificity": result["binary"]["specificity"],
        "binary_roc_auc": result["binary"]["roc_auc"],
        "cutoff": float(cutoffs[0]) if len(cutoffs) == 1 else [float(c) for c in cutoffs],
        "cutoff_sensitivity": None if np.isnan(sensitivity) else sensitivity,
        "cutoff_specificity": None if np.isnan(specificity) else specificity,
        "cutoff_accuracy": float(np.mean((p_abnormal >= threshold) == abnormal)),  # the calls the product makes
        "nll": cal.negative_log_likelihood(probs, labels),
    }


def _calibrated(classifier: Classifier, pixels: np.ndarray) -> np.ndarray:
    return classifier.predict_pixels(pixels) if len(pixels) else np.zeros((0, len(CLASS_NAMES)))


def _recalibrate(raw: np.ndarray, y_val: np.ndarray, base_threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Temperature and cut-off fitted on the site's validation cells (their uncalibrated probabilities, `raw`;
    the base cut-off if they cannot say)."""
    temperature = cal.fit_temperature(raw, y_val)
    scaled = cal.apply_temperature(raw, temperature)
    p_val, abnormal = scaled[:, ABNORMAL_MASK].sum(axis=1), ABNORMAL_MASK[y_val]
    calibration = {
        "method": "temperature scaling fitted on the site's validation accessions (NLL)",
        "temperature": temperature,
        "validation": {
            "n": int(len(y_val)),
            "ece_before": cal.expected_calibration_error(raw, y_val),
            "ece_after": cal.expected_calibration_error(scaled, y_val),
            "nll_before": cal.negative_log_likelihood(raw, y_val),
            "nll_after": cal.negative_log_likelihood(scaled, y_val),
        },
    }
    if abnormal.all() or not abnormal.any():
        threshold, chosen_on = base_threshold, "base model (the site validation cells are all of one kind)"
    else:
        threshold, chosen_on = cal.choose_abnormal_threshold(p_val, abnormal, TARGET_SENSITIVITY), "site validation"
    sensitivity, specificity = cal.sensitivity_specificity(p_val, abnormal, threshold)
    cutoff = {
        "value": threshold,
        "chosen_on": chosen_on,
        "target_sensitivity": TARGET_SENSITIVITY,
        "validation_sensitivity": None if np.isnan(sensitivity) else sensitivity,
        "validation_specificity": None if np.isnan(specificity) else specificity,
    }
    return calibration, cutoff


def _describe(cells: Sequence[SiteCell], labels: np.ndarray, groups: np.ndarray, split: SiteSplit) -> dict[str, Any]:
    counts = Counter(c.label for c in cells)

    def side(indices: np.ndarray) -> dict[str, int]:
        return {"cells": int(len(indices)), "accessions": int(len(set(groups[indices])))}

    return {
        "reviewed_cells": len(cells),
        "accessions": int(len(set(groups))),
        "per_class": {name: counts.get(name, 0) for name in CLASS_NAMES},
        "abnormal": int(ABNORMAL_MASK[labels].sum()),
        "split": {
            "method": f"StratifiedGroupKFold by accession: fold 0 of {SITE_TEST_FOLDS} held out as test, "
            f"fold 0 of {SITE_VAL_FOLDS} of the rest for validation (temperature and cut-off)",
            "train": side(split.train),
            "validation": side(split.val),
            "test": side(split.test),
        },
    }


def _refuse_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} already exists and is not empty; choose a new directory for the adapted model")


def adapt(
    cells: Sequence[SiteCell],
    base_dir: Path,
    out_dir: Path,
    base_folder: Path | None = None,
    config: AdaptConfig = AdaptConfig(),
    version: str | None = None,
    since: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the base model's network on the site's reviewed cells and write the adapted model directory
    (routed to a copy of the general model when base_folder holds the base model's training data).

    Everything is written to a hidden sibling directory that is renamed to out_dir only when complete,
    so a refusal or a failure leaves nothing behind. Returns the new card.
    """
    started = time.monotonic()
    minutes: dict[str, float] = {}
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _refuse_out(out_dir)
    check_enough(cells)
    base_card = read_card(base_dir)
    with _timed(minutes, "reading"):
        base_model = Classifier.load(base_dir, with_ood=False, precision="float32")
        # An adapted base routes to its own general model: the new model routes to that one, not to the base.
        general = base_model.routing.general if base_model.routing is not None else base_model
        if (version or out_dir.name) in {general.version, base_model.version}:
            raise InputError(f"the adapted model needs a version of its own, not {version or out_dir.name!r}")
        spec = base_model.spec
        x_site, y_site, groups = site_arrays(cells, spec)
        split = split_site(y_site, groups, config.seed)
        base = base_data(base_folder, general.card) if base_folder is not None else None
        base_arrays = load_arrays(base.dataset.subset(base.mix), spec, progress) if base is not None else None
        x_val, y_val = x_site[split.val], y_site[split.val]
        if base is not None and base.val is not None:
            x_base_val, y_base_val = load_arrays(base.dataset.subset(base.val), spec, progress)
            x_val, y_val = np.concatenate([x_val, x_base_val]), np.concatenate([y_val, y_base_val])

    with _timed(minutes, "fine_tuning"):
        model, history = fine_tune(
            base_dir,
            base_card,
            (x_site[split.train], y_site[split.train]),
            base_arrays,
            config,
            progress,
            judge=validation_judge(x_site[split.val], y_site[split.val]),
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        card = _write_adapted(work, model, history, base_card, version or out_dir.name)
        del model
        with _timed(minutes, "recalibrating"):
            adapted = Classifier.load(work, with_ood=False, precision="float32")
            # One pass over all validation cells: the site's refit temperature and cut-off, all set the guard's.
            raw_val, val_features = adapted.predictor.with_features(x_val)
            site_val = slice(0, len(split.val))  # x_val holds the site's validation cells first
            calibration, cutoff = _recalibrate(raw_val[site_val], y_val[site_val], base_model.abnormal_threshold)
            card["calibration"], card["abnormal_threshold"] = calibration, cutoff
            write_card(work, card)
            adapted = Classifier.load(work, with_ood=False, precision="float32")

        x_test, y_test = x_site[split.test], y_site[split.test]
        with _timed(minutes, "scoring"):
            site_after = score(adapted, x_test)  # its features serve the guard's check, the whole the int8 one
        with _timed(minutes, "typical_cell_model"):
            x_fit, y_fit = _fitting_cells(x_site, y_site, split, base_arrays)
            fit_features = pixel_features(adapted, x_fit, "typical-cell model and gate: training features")
            card["ood"] = _typical_cell_model(
                work, adapted, cells, split, (fit_features, y_fit), val_features, site_after.features
            )
        if base is not None:
            with _timed(minutes, "routing"):
                card["routing"], gate = _routing(work, general, fit_features, y_fit, val_features, len(split.val))
                shutil.copytree(general.model_dir, work / GENERAL_DIR, ignore=shutil.ignore_patterns(GENERAL_DIR))
                write_card(work, card)
                # The networks already loaded, routed (the copy is checked when the finished directory is loaded).
                adapted = Classifier(work, card, adapted.predictor, adapted.ood, Routing(general, gate))
        with _timed(minutes, "scoring"):
            after = adapted.routed(x_test, site_after.probs, site_after.features)
            site: dict[str, Any] = {
                "split": "held-out site accessions",
                "before": _summary(y_test, _calibrated(base_model, x_test), base_model.abnormal_threshold),
                "after": _summary(y_test, after, adapted.cutoffs(site_after.features)),
            }
            site["after"]["routed_to_general"] = int(adapted.to_general(site_after.features).sum())
            write_report(work, y_test, after, prefix="site_test")
            herlev = _forgetting_check(work, adapted, base_model, base, progress)
        card["adaptation"] = {
            "base_version": base_card["version"],
            "base_weights_sha256": base_card["weights_sha256"],
            "base_directory": base_dir.name,
            "site_data": {**_describe(cells, y_site, groups, split), "since": since},
            "base_data": None
            if base is None
            else {
                "root_name": base.dataset.root.name,
                "training_images": int(len(base.mix)),
                "mixed_into_fine_tuning": config.base_share > 0,
                "note": base.note,
            },
            "config": asdict(config),
            "history": history,
            "site_metrics": site,
            "base_test_metrics": herlev,
        }
        card["metrics"] = {
            **site["after"],
            "split": "held-out site accessions",
            "tta": adapted.predictor.tta,
            "probabilities": "calibrated",
            "details": "site_test_metrics.json",
        }
        write_card(work, card)
        del adapted
        with _timed(minutes, "int8_export"):
            card["serving"] = export_lite(work, x_test, y_test, "held-out site accessions", site_after)
            Classifier.load(work)  # as a server will load it: weights, typical-cell model and LiteRT network checked
        card["adaptation"]["minutes"] = round((time.monotonic() - started) / 60, 1)
        card["adaptation"]["minutes_by_phase"] = {name: round(value, 2) for name, value in minutes.items()}
        write_card(work, card)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return card


@contextmanager
def _timed(minutes: dict[str, float], phase: str) -> Iterator[None]:
    """Adds the minutes spent in the block to minutes[phase]: the card says where an adaptation's time went."""
    started = time.monotonic()
    try:
        yield
    finally:
        minutes[phase] = minutes.get(phase, 0.0) + (time.monotonic() - started) / 60


def _forgetting_check(
    work: Path,
    adapted: Classifier,
    base_model: Classifier,
    base: BaseData | None,
    progress: bool,
) -> dict[str, Any] | None:
    """Base and adapted model, as served, on the general model's own test split (None without the base data it
    was trained on).

    Besides the accuracy change, how many 7-class calls changed and in which direction (a small net change can
    hide many changed calls), and how many of these cells the gate sent to the site network.
    """
    if base is None or base.test is None:
        return None
    x_base_test, y_base_test = load_arrays(base.dataset.subset(base.test), base_model.spec, progress)
    before_probs = _calibrated(base_model, x_base_test)
    probs, features = adapted.predict_pixels_with_features(x_base_test)
    after_probs = adapted.routed(x_base_test, probs, features)
    before = _summary(y_base_test, before_probs, base_model.abnormal_threshold)
    after = _summary(y_base_test, after_probs, adapted.cutoffs(features))
    write_report(work, y_base_test, after_probs, prefix="base_test")
    right_before, right_after = before_probs.argmax(axis=1) == y_base_test, after_probs.argmax(axis=1) == y_base_test
    to_site = int((~adapted.to_general(features)).sum())
    return {
        "split": f"the base model's own test split of {base.dataset.root.name}",
        "before": before,
        "after": after,
        "accuracy_7class_change_points": round(100 * (after["accuracy_7class"] - before["accuracy_7class"]), 2),
        "binary_accuracy_change_points": round(100 * (after["binary_accuracy"] - before["binary_accuracy"]), 2),
        "calls_changed_7class": int(np.sum(before_probs.argmax(axis=1) != after_probs.argmax(axis=1))),
        "calls_now_right": int(np.sum(~right_before & right_after)),
        "calls_now_wrong": int(np.sum(right_before & ~right_after)),
        "routed_to_site_network": to_site,
    }


def _fitting_cells(
    x_site: np.ndarray, y_site: np.ndarray, split: SiteSplit, base_arrays: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """At most OOD_FIT_CELLS training cells, evenly spaced: the site's training accessions (classes numbered after
    the base's: the site's cells and the base images are two kinds of typical cell, each class of each gets its
    own mean in the typical-cell model) and the base images; the gate tells the two kinds apart."""
    x_train, y_train = x_site[split.train], y_site[split.train] + len(CLASS_NAMES)
    if base_arrays is not None:
        x_train, y_train = np.concatenate([x_train, base_arrays[0]]), np.concatenate([y_train, base_arrays[1]])
    keep = every_kth(len(y_train), OOD_FIT_CELLS)
    return x_train[keep], y_train[keep]


def _typical_cell_model(
    work: Path,
    adapted: Classifier,
    cells: Sequence[SiteCell],
    split: SiteSplit,
    train: tuple[np.ndarray, np.ndarray],
    val_features: np.ndarray,
    test_features: np.ndarray,
) -> dict[str, Any]:
    """The site network's own "not a typical cell" model: fitted on the features of its fitting cells
    (`_fitting_cells`), cut-off on the combined validation cells, measured on the held-out site accessions
    against the non-cell sets."""
    test_cells = [cells[i] for i in split.test]
    flags = [input_flags(as_sent(c.data), decode_image(c.data)) for c in test_cells]
    crops = [decode_image(c.data) for c in test_cells]
    with_base = bool((train[1] < len(CLASS_NAMES)).any())
    described = {
        "fitted_on": "site training accessions"
        + (" + the base model's training images" if with_base else "")
        + " (a mean per class of each)",
        "chosen_on": "site validation accessions"
        + (" + the base model's validation split" if len(val_features) > len(split.val) else ""),
        "test_split": "held-out site accessions",
        "command": "papcad adapt (refitted for the adapted network)",
    }
    return fit_from_features(
        adapted, work, train, val_features, (test_features, flags), crops, described, OOD_SET_CELLS
    )


def _routing(
    work: Path,
    general: Classifier,
    fit_features: np.ndarray,
    fit_labels: np.ndarray,
    val_features: np.ndarray,
    site_val_cells: int,
) -> tuple[dict[str, Any], DomainGate]:
    """Fit the gate on the fitting cells' features (site cells against base images), write it, and return it with
    the card's "routing" section: how well it routes the validation cells (site's first, then the base's)."""
    at_site = fit_labels >= len(CLASS_NAMES)
    gate = DomainGate.fit(fit_features[at_site], fit_features[~at_site])
    gate.save(work / GATE_FILE)
    to_general = gate.general(val_features)
    site_val, base_val = to_general[:site_val_cells], to_general[site_val_cells:]
    section = {
        "general": GENERAL_DIR,
        "general_version": general.version,
        "general_weights_sha256": general.weights_sha256,
        "gate": {
            "file": GATE_FILE,
            "sha256": sha256_file(work / GATE_FILE),
            "method": "logistic regression on the site network's standardised pooled features (L2, C 0.1, "
            "balanced classes); P(site) < 0.5 goes to the general model",
            "fitted_on": {"site_cells": int(at_site.sum()), "general_images": int((~at_site).sum())},
            "validation": {
                "site_cells": int(len(site_val)),
                "site_cells_to_site_network": int((~site_val).sum()),
                "general_images": int(len(base_val)),
                "general_images_to_general_model": int(base_val.sum()),
            },
        },
    }
    return section, gate


def _write_adapted(
    work: Path,
    model: keras.Model,
    history: dict[str, list[float]],
    base_card: dict[str, Any],
    version: str,
) -> dict[str, Any]:
    save_weights(model, work / WEIGHTS_FILE)
    (work / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    dropped = ("ood", "robustness", "metrics", "calibration", "routing")
    card = {k: v for k, v in base_card.items() if k not in dropped}
    card.update(
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        weights_file=WEIGHTS_FILE,
        weights_dtype="float16",
        weights_sha256=sha256_file(work / WEIGHTS_FILE),
    )
    card["notes"] = [
        f"Adapted from {base_card['version']} to one laboratory's reviewed cells (see 'adaptation').",
        "The typical-cell (OOD) model is the site network's own, fitted on its training cells (see 'ood').",
        "With a 'routing' section, cells unlike the site's get the general model's call (see app.ml.routing).",
    ]
    write_card(work, card)
    return card
