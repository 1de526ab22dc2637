"""Calibration maths against cases worked out by hand."""

import numpy as np
import pytest

from app.ml import calibration as cal
from app.ml.calibration_plots import reliability_diagram


def test_temperature_scaling_by_hand():
    # T = 2 takes square roots: 0.8 : 0.2 becomes sqrt(0.8) : sqrt(0.2) = 2 : 1.
    np.testing.assert_allclose(cal.apply_temperature(np.array([[0.8, 0.2]]), 2.0), [[2 / 3, 1 / 3]], atol=1e-9)
    np.testing.assert_allclose(cal.apply_temperature(np.array([[0.7, 0.2, 0.1]]), 1.0), [[0.7, 0.2, 0.1]], atol=1e-9)


def test_fitted_temperature_matches_the_analytic_optimum():
    # Every sample says 0.8/0.2 but only 2 of 3 are class 0: the NLL optimum is p = 2/3, i.e. T = 2.
    probs = np.array([[0.8, 0.2]] * 3)
    assert cal.fit_temperature(probs, np.array([0, 0, 1])) == pytest.approx(2.0, rel=1e-3)


def test_ece_and_brier_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    # One sample per bin; |accuracy - confidence| = 0.1, 0.6, 0.3, 0.2 -> mean 0.3.
    assert cal.expected_calibration_error(probs, labels) == pytest.approx(0.3)
    # Squared distances to one-hot: 0.02, 0.72, 0.18, 0.08 -> mean 0.25.
    assert cal.brier_score(probs, labels) == pytest.approx(0.25)
    # NLL: -(ln 0.9 + ln 0.4 + ln 0.7 + ln 0.8) / 4
    expected = -(np.log(0.9) + np.log(0.4) + np.log(0.7) + np.log(0.8)) / 4
    assert cal.negative_log_likelihood(probs, labels) == pytest.approx(expected)


def test_threshold_is_the_highest_that_keeps_sensitivity():
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    abnormal = np.array([False, True, False, True, True])
    assert cal.choose_abnormal_threshold(p, abnormal, 1.0) == pytest.approx(0.4)
    assert cal.choose_abnormal_threshold(p, abnormal, 0.6) == pytest.approx(0.8)
    assert cal.sensitivity_specificity(p, abnormal, 0.4) == (1.0, 1.0)
    sens, spec = cal.sensitivity_specificity(p, abnormal, 0.8)
    assert sens == pytest.approx(2 / 3) and spec == 1.0


def test_a_cutoff_under_shifts_keeps_sensitivity_over_the_shifted_cells_too():
    from app.ml.evaluate import TARGET_SENSITIVITY, pooled_cutoff

    # 20 abnormal and 20 normal cells; unshifted, every abnormal cell is over 0.6. Under one shift the abnormal
    # cells fall to 0.1..0.48, under the other they stay: the pooled cut-off must come down to keep 95 %.
    abnormal = np.arange(40) < 20
    plain = np.where(abnormal, np.linspace(0.6, 0.99, 40), np.linspace(0.0, 0.3, 40))
    faded = np.where(abnormal, np.linspace(0.1, 0.48, 40), plain)
    shifted = np.stack([faded, plain])
    plain_cut = cal.choose_abnormal_threshold(plain, abnormal, TARGET_SENSITIVITY)
    cut, report = pooled_cutoff(plain, shifted, abnormal)

    pooled_p, pooled_abnormal = np.concatenate([plain, *shifted]), np.tile(abnormal, 3)
    assert cal.sensitivity_specificity(pooled_p, pooled_abnormal, cut)[0] >= TARGET_SENSITIVITY
    higher = np.nextafter(cut, 1.0)  # the highest such cut-off: any higher one misses too many
    assert cal.sensitivity_specificity(pooled_p, pooled_abnormal, higher)[0] < TARGET_SENSITIVITY
    assert cut < plain_cut
    assert report["shifts"] == 2
    assert report["lowest_shift_sensitivity"] == cal.sensitivity_specificity(faded, abnormal, cut)[0] < 1.0
    assert report["shifted_sensitivity"] == pytest.approx(
        cal.sensitivity_specificity(shifted.ravel(), np.tile(abnormal, 2), cut)[0]
    )


def test_temperature_scaling_improves_an_overconfident_model(tmp_path):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2000, 7)) * 3
    truth = cal.apply_temperature(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2.5)
    labels = np.array([rng.choice(7, p=row) for row in truth])
    overconfident = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    temperature = cal.fit_temperature(overconfident, labels)
    assert 2.0 < temperature < 3.0
    fixed = cal.apply_temperature(overconfident, temperature)
    assert (fixed.argmax(1) == overconfident.argmax(1)).all()
    assert cal.expected_calibration_error(fixed, labels) < cal.expected_calibration_error(overconfident, labels) / 2
    reliability_diagram(overconfident, fixed, labels, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
