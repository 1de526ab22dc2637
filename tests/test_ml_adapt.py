"""Site adaptation (app.ml.adapt) on the tiny model: refusals, the grouped split, the written directory."""

import json

import numpy as np
import pytest

from app.errors import InputError, ModelIntegrityError
from app.ml.adapt import (
    MIN_ACCESSIONS,
    MIN_REVIEWED_CELLS,
    AdaptConfig,
    SiteCell,
    TooFewCellsError,
    adapt,
    site_arrays,
    split_site,
)
from app.ml.artifact import read_card, sha256_file, verified_weights_path
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier, keras_network
from app.ml.finetune import _reestimate_statistics, fine_tune
from app.ml.preprocessing import decode_image, prepare_image
from app.ml.site_shift import site_png

FAST = AdaptConfig(epochs=1, batch_size=8)


@pytest.fixture(scope="module")
def site_cells(herlev_dir) -> list[SiteCell]:
    """56 simulated-site cells (8 per class) in 8 accessions, every accession holding every class."""
    cells = []
    for name in CLASS_NAMES:
        for index, path in enumerate(sorted((herlev_dir / name).glob("*.BMP"))[:8]):
            cells.append(SiteCell(site_png(path.read_bytes()), name, f"accession:S-{index}"))
    return cells


def test_too_few_cells_refused_and_nothing_written(site_cells, tiny_model_dir, tmp_path):
    out = tmp_path / "adapted"
    with pytest.raises(TooFewCellsError, match=f"at least {MIN_REVIEWED_CELLS} reviewed cells"):
        adapt(site_cells[: MIN_REVIEWED_CELLS - 1], tiny_model_dir, out, config=FAST, progress=False)
    too_few_accessions = [SiteCell(c.data, c.label, "accession:one") for c in site_cells]
    with pytest.raises(TooFewCellsError, match=f"from at least {MIN_ACCESSIONS} accessions"):
        adapt(too_few_accessions, tiny_model_dir, out, config=FAST, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(site_cells, tiny_model_dir, tmp_path):
    (tmp_path / "adapted").mkdir()
    (tmp_path / "adapted" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        adapt(site_cells, tiny_model_dir, tmp_path / "adapted", config=FAST, progress=False)
    assert [p.name for p in (tmp_path / "adapted").iterdir()] == ["keep.txt"]


def test_split_keeps_accessions_on_one_side():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 300)
    groups = np.array([f"A{i // 6}" for i in range(300)])
    split = split_site(labels, groups, seed=1)
    sides = [set(groups[s]) for s in (split.train, split.val, split.test)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(300))
    assert 0.15 < len(split.test) / 300 < 0.25


@pytest.mark.slow  # a real (tiny) fine-tuning run
def test_adapt_writes_a_loadable_versioned_model(site_cells, tiny_model_dir, tmp_path):
    """Site cells only here; mixing in the base data and the forgetting check run in the server test with the
    real model (tests/server/test_site_adaptation.py)."""
    out = tmp_path / "site-v1"
    card = adapt(site_cells, tiny_model_dir, out, config=FAST, version="site-v1", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-v1"]  # no partial directory left
    loaded = Classifier.load(out)
    assert loaded.version == "site-v1"
    assert card["weights_sha256"] == sha256_file(out / "weights.npz") != read_card(tiny_model_dir)["weights_sha256"]
    adaptation = read_card(out)["adaptation"]
    assert adaptation["base_version"] == "tiny-test-r32"
    assert adaptation["site_data"]["reviewed_cells"] == len(site_cells)
    assert adaptation["site_data"]["per_class"] == {name: 8 for name in CLASS_NAMES}
    split = adaptation["site_data"]["split"]
    assert split["train"]["cells"] + split["validation"]["cells"] + split["test"]["cells"] == len(site_cells)
    site = adaptation["site_metrics"]
    assert site["before"]["n"] == site["after"]["n"] == split["test"]["cells"]
    assert adaptation["base_data"] is None and adaptation["base_test_metrics"] is None
    assert len(adaptation["history"]["loss"]) == FAST.epochs
    # Where the time went, phase by phase (the phases are what the whole run is made of).
    phases = adaptation["minutes_by_phase"]
    assert set(phases) == {"reading", "fine_tuning", "recalibrating", "scoring", "typical_cell_model", "int8_export"}
    assert phases["fine_tuning"] > 0 and sum(phases.values()) <= adaptation["minutes"] + 0.06
    assert card["abnormal_threshold"]["chosen_on"] in (
        "site validation",
        "base model (the site validation cells are all of one kind)",
    )
    assert (out / "site_test_metrics.json").is_file()
    assert json.loads((out / "history.json").read_text())["loss"]
    prediction = loaded.predict([site_cells[0].data])[0]
    assert prediction.model_version == "site-v1"
    # Its own typical-cell model: fitted on its training cells, cut-off on its validation cells, checked on load.
    ood = read_card(out)["ood"]
    assert ood["sha256"] == sha256_file(out / "ood.npz")
    assert ood["fitted_on"]["n"] == split["train"]["cells"] and ood["cutoff"]["n"] == split["validation"]["cells"]
    assert ood["evaluation"]["n"] == split["test"]["cells"] and 0 <= ood["evaluation"]["auroc_overall"] <= 1
    assert loaded.ood is not None and loaded.ood.cutoff == pytest.approx(ood["cutoff"]["score"], rel=1e-6)
    assert prediction.in_distribution is not None and prediction.ood_score is not None
    assert len(adaptation["history"]["validation_score"]) == FAST.epochs
    # Its int8 network, checked on the held-out site cells; the server's auto choice follows that check.
    serving = read_card(out)["serving"]
    assert serving["int8"]["sha256"] == sha256_file(out / serving["int8"]["file"])
    assert serving["check"]["n"] == split["test"]["cells"] and serving["check"]["cells"] == "held-out site accessions"
    assert loaded.predictor.precision == serving["auto"]


@pytest.mark.slow  # real (tiny) fine-tuning steps
def test_a_large_site_is_trained_for_at_most_max_steps(site_cells, tiny_model_dir):
    spec = Classifier.load(tiny_model_dir, with_ood=False, precision="float32").spec
    x, y, _ = site_arrays(site_cells, spec)
    site = (x, y)  # 56 cells: 14 steps of 4 site cells per epoch without the cap
    card = read_card(tiny_model_dir)
    capped = AdaptConfig(epochs=2, batch_size=8, base_share=0.5, max_steps=6)
    _, history = fine_tune(tiny_model_dir, card, site, site, capped, progress=False)
    assert history["steps_per_epoch"] == [3.0] and len(history["loss"]) == 2
    _, history = fine_tune(
        tiny_model_dir,
        card,
        site,
        site,
        AdaptConfig(epochs=1, batch_size=8, base_share=0.5, max_steps=0),
        progress=False,
    )
    assert history["steps_per_epoch"] == [14.0]


@pytest.mark.slow  # real (tiny) forward passes and steps
def test_statistics_are_reestimated_and_nothing_else_moves(site_cells, tiny_model_dir):
    """Re-estimation changes BatchNorm's moving statistics only; with a share of 0 fine-tuning keeps the base's."""
    card = read_card(tiny_model_dir)
    spec = Classifier.load(tiny_model_dir, with_ood=False, precision="float32").spec
    x, y, _ = site_arrays(site_cells, spec)
    base_images = x[:, ::-1]  # another kind of input than the site's cells

    def weights(model) -> list[np.ndarray]:
        return [v.numpy().copy() for v in model.weights]

    network = keras_network(card, verified_weights_path(tiny_model_dir, card))
    before = weights(network)
    _reestimate_statistics(network, x, base_images, AdaptConfig(batch_size=8))
    after = weights(network)
    statistics = [i for i, v in enumerate(network.weights) if v.path.endswith(("moving_mean", "moving_variance"))]
    trained = [i for i, v in enumerate(network.weights) if v.trainable]
    assert statistics and all(not np.allclose(before[i], after[i]) for i in statistics)
    assert trained and all(np.array_equal(before[i], after[i]) for i in trained)

    kept, _ = fine_tune(
        tiny_model_dir,
        card,
        (x, y),
        (base_images, y),
        AdaptConfig(epochs=1, batch_size=8, max_steps=1, statistics_site_share=0.0),
        progress=False,
    )
    kept_weights = weights(kept)
    assert all(np.array_equal(before[i], kept_weights[i]) for i in statistics)
    with pytest.raises(InputError):
        AdaptConfig(statistics_site_share=1.5)


@pytest.mark.slow  # a real (tiny) fine-tuning run with base data
def test_with_base_data_the_adapted_model_routes_each_cell(site_cells, tiny_model_dir, herlev_dir, tmp_path):
    """The site network answers for cells the gate places at the site, the unchanged general model for the rest,
    each call with the version, weights and cut-off of the network that made it; both are checked on load."""
    out = tmp_path / "routed"
    card = adapt(site_cells, tiny_model_dir, out, base_folder=herlev_dir, config=FAST, progress=False)
    general_card = read_card(tiny_model_dir)
    routing = card["routing"]
    assert routing["general_weights_sha256"] == general_card["weights_sha256"] != card["weights_sha256"]
    assert read_card(out / routing["general"])["weights_sha256"] == general_card["weights_sha256"]
    assert routing["gate"]["sha256"] == sha256_file(out / routing["gate"]["file"])
    fitted = routing["gate"]["fitted_on"]
    assert fitted["site_cells"] > 0 and fitted["general_images"] > 0
    validation = routing["gate"]["validation"]
    assert validation["site_cells"] == card["adaptation"]["site_data"]["split"]["validation"]["cells"]
    assert 0 <= validation["site_cells_to_site_network"] <= validation["site_cells"]

    routed, general = Classifier.load(out, precision="float32"), Classifier.load(tiny_model_dir, precision="float32")
    assert routed.routing is not None and [p.version for p in routed.parts] == ["routed", general.version]
    assert routed.abnormal_threshold == card["abnormal_threshold"]["value"]  # the site network's own cut-off
    images = [c.data for c in site_cells[::7]] + [p.read_bytes() for p in sorted(herlev_dir.glob("*/*.BMP"))[::60]]
    calls = routed.predict(images)
    site_network, features, _ = routed.analyse(images)
    to_general = routed.to_general(features)
    assert to_general.any() and not to_general.all()  # mostly cells it was fitted on: both parts answer
    own = general.predict(images)
    for call, general_call, network_row, is_general in zip(calls, own, site_network, to_general, strict=True):
        if is_general:  # the general model's call as it would make it alone, typical-cell verdict included
            assert call == general_call
        else:
            assert call.model_version == "routed"
            assert np.allclose(np.array(list(call.probabilities.values())), network_row, atol=1e-6)
        assert routed.weights_sha256_of(call.model_version) == (
            general.weights_sha256 if is_general else routed.weights_sha256
        )
    cutoffs = routed.cutoffs(features)
    assert set(cutoffs[to_general]) == {general.abnormal_threshold}
    assert set(cutoffs[~to_general]) == {routed.abnormal_threshold}
    pixels = np.stack([prepare_image(decode_image(image), routed.spec) for image in images])
    served = np.stack([np.array(list(c.probabilities.values())) for c in calls])
    assert np.allclose(routed.predict_pixels(pixels), served, atol=1e-5)  # the pixel path routes the same way
    # A heatmap is drawn by the network that made the call.
    first_general, first_site = int(np.argmax(to_general)), int(np.argmin(to_general))
    assert np.allclose(routed.heatmap(pixels[first_general], 3), general.heatmap(pixels[first_general], 3))
    assert np.allclose(routed.heatmap(pixels[first_site], 3), routed.predictor.heatmap(pixels[first_site], 3))

    (out / routing["gate"]["file"]).write_bytes(b"not the gate")
    with pytest.raises(ModelIntegrityError, match="routing gate"):
        Classifier.load(out)


def test_the_adapted_model_needs_a_version_of_its_own(site_cells, tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="version of its own"):
        adapt(site_cells, tiny_model_dir, tmp_path / "m", config=FAST, version="tiny-test-r32", progress=False)
    assert not any(tmp_path.iterdir())
