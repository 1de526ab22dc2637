"""Temperature scaling, calibration error, and the abnormal threshold, fitted on the validation split.

Temperature scaling (Guo et al., 2017) divides the log-probabilities by one scalar T fitted to
minimise the validation negative log-likelihood. It leaves every argmax unchanged (accuracy is
the same) and only makes the probabilities mean what they say.

Only NumPy at import: the server imports this module to apply a temperature, and SciPy and
scikit-learn are loaded by the functions that fit (evaluation, adaptation). The reliability diagram
lives in `calibration_plots`, so nothing here pulls in matplotlib.
"""

import numpy as np

_EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T), row by row."""
    logits = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled: np.ndarray = np.exp(logits)
    result: np.ndarray = scaled / scaled.sum(axis=1, keepdims=True)
    return result


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], _EPS, 1.0))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the NLL of the scaled probabilities."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(apply_temperature(probs, float(np.exp(log_t))), labels),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(result.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: the bin-size-weighted gap between confidence and accuracy, equal-width bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of the squared distance to the one-hot label."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def choose_abnormal_threshold(p_abnormal: np.ndarray, is_abnormal: np.ndarray, min_sensitivity: float) -> float:
    """The highest P(abnormal) threshold whose sensitivity still reaches min_sensitivity.

    Highest, because among thresholds that miss few abnormal cells it flags the fewest normal ones.
    """
    from sklearn.metrics import roc_curve

    _, tpr, thresholds = roc_curve(is_abnormal.astype(int), p_abnormal, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= min_sensitivity)
    return float(min(1.0, thresholds[ok[0]]))


def sensitivity_specificity(
    p_abnormal: np.ndarray, is_abnormal: np.ndarray, threshold: float | np.ndarray
) -> tuple[float, float]:
    """At the cut-off (or each cell's own: an adapted model's general cells have the general model's)."""
    called = p_abnormal >= threshold
    positives, negatives = is_abnormal.sum(), (~is_abnormal).sum()
    sensitivity = float((called & is_abnormal).sum() / positives) if positives else float("nan")
    specificity = float((~called & ~is_abnormal).sum() / negatives) if negatives else float("nan")
    return sensitivity, specificity
