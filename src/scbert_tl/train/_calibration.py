"""Calibrated probabilities and a novelty score for a fine-tuned classifier (no AnnData here).

After fine-tuning, a temperature is fitted on the validation cells (the logits divided by it give
calibrated probabilities), and the distribution of the novelty score on those same cells is kept as
quantiles, so that an ``"unknown"`` threshold can be chosen for a target rate of false unknowns
(known cells called unknown). :func:`scbert_tl.tl.finetune` stores the result with the model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ._inference import run_batches

if TYPE_CHECKING:
    import torch

    from ..data import TokenMatrix
    from ..model import ScBERTNetwork

logger = logging.getLogger(__name__)

#: Novelty scores, each higher for a cell less like the training types; ``energy`` decides ``"unknown"``.
SCORES = ("probability", "calibrated_probability", "energy")
NOVELTY_SCORE = "energy"
#: Validation quantiles stored for the novelty score: levels 0, 0.005, ..., 1.
QUANTILE_LEVELS = np.linspace(0, 1, 201)
#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
#: Standard deviation of the prior on ``log(temperature)`` (centred on a temperature of 1).
PRIOR_SD = 1.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(np.mean(_logsumexp(z) - z[np.arange(z.shape[0]), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that best explains ``labels``: temperature scaling with a weak prior.

    Minimises the summed negative log-likelihood plus ``log(T)**2 / 2`` (a standard log-normal
    prior centred on ``T = 1``) over ``T`` in [0.05, 20], by golden-section search on ``log(T)``.
    The prior matters only when the validation cells say little: when all of them are classified
    correctly, the likelihood alone keeps improving as ``T`` goes to 0 (ever more confident), which
    then overstates the confidence on new cells.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)

    def objective(log_t: float) -> float:
        return labels.size * nll(logits, labels, np.exp(log_t)) + log_t**2 / (2 * PRIOR_SD**2)

    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = objective(a), objective(b)
    for _ in range(50):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = objective(b)
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: the cell-weighted mean of ``|accuracy - mean confidence|`` over equal-width bins.

    ``confidence`` is the probability a method gives its predicted type, ``correct`` whether that
    type is right. Bin ``k`` holds confidences in ``(k / n_bins, (k + 1) / n_bins]`` (the first also 0).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return float("nan")
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = sum(
        (bins == k).sum() * abs(correct[bins == k].mean() - confidence[bins == k].mean()) for k in np.unique(bins)
    )
    return float(total / confidence.size)


def calibration_noise(confidence: np.ndarray, n_bins: int = ECE_BINS, draws: int = 200, seed: int = 0) -> float:
    """The expected calibration error a perfectly calibrated method would show with these confidences.

    Each cell is drawn right with probability equal to its confidence (``draws`` times, a fixed
    seed) and the mean expected calibration error is returned. On a few hundred cells this is far
    from 0: an observed error near it cannot be told from perfect calibration.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    if confidence.size == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(
        np.mean(
            [
                expected_calibration_error(confidence, rng.random(confidence.size) < confidence, n_bins)
                for _ in range(draws)
            ]
        )
    )


def novelty_scores(logits: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """The novelty scores of :data:`SCORES` (higher = less like the training types).

    ``probability``: one minus the highest class probability; ``calibrated_probability``: the same
    after dividing the logits by ``temperature``; ``energy``: minus the log-sum-exp of the logits
    (Liu et al., NeurIPS 2020), which keeps the logits' scale that the softmax discards.
    """
    logits = np.asarray(logits, dtype=np.float64)
    return {
        "probability": 1 - softmax(logits).max(axis=1),
        "calibrated_probability": 1 - softmax(logits, temperature).max(axis=1),
        "energy": -_logsumexp(logits),
    }


def threshold_for_rate(quantiles: Any, rate: float) -> float:
    """The score above which a share ``rate`` of the validation cells lies, from their stored quantiles."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
        raise ValueError(f"false_unknown_rate must be a number between 0 and 1, got {rate!r}.")
    return float(np.interp(1 - rate, QUANTILE_LEVELS, np.asarray(quantiles, dtype=np.float64)))


def _logits(network: ScBERTNetwork, x: torch.Tensor) -> torch.Tensor:
    return network(x).float()


def calibrate(
    network: ScBERTNetwork,
    tokens: TokenMatrix,
    labels: np.ndarray,
    val_rows: np.ndarray,
    *,
    device: torch.device | str | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Fit the temperature on the validation cells and keep the quantiles of their novelty score.

    Returns
    -------
    A JSON-serialisable dict: ``temperature``, ``n_validation``, ``score`` (the novelty score's
    name), ``quantiles`` (of that score on the validation cells, at :data:`QUANTILE_LEVELS`) and
    ``validation`` (NLL and ECE before and after temperature scaling, measured on the cells the
    temperature was fitted on, so the calibrated figures are optimistic).
    """
    val_rows = np.asarray(val_rows)
    (logits,) = run_batches(
        network, tokens, _logits, rows=val_rows, device=device, precision=precision, desc="calibrate"
    )
    y = labels[val_rows]
    temperature = fit_temperature(logits, y)
    correct = logits.argmax(1) == y
    calibration = {
        "temperature": temperature,
        "n_validation": int(val_rows.size),
        "score": NOVELTY_SCORE,
        "quantiles": np.quantile(novelty_scores(logits)[NOVELTY_SCORE], QUANTILE_LEVELS).tolist(),
        "validation": {
            "nll": nll(logits, y),
            "nll_calibrated": nll(logits, y, temperature),
            "ece": expected_calibration_error(softmax(logits).max(1), correct),
            "ece_calibrated": expected_calibration_error(softmax(logits, temperature).max(1), correct),
        },
    }
    logger.info(
        "Calibrated on %d validation cells: temperature %.2f, NLL %.3f -> %.3f, ECE %.3f -> %.3f",
        val_rows.size,
        temperature,
        calibration["validation"]["nll"],
        calibration["validation"]["nll_calibrated"],
        calibration["validation"]["ece"],
        calibration["validation"]["ece_calibrated"],
    )
    return calibration
