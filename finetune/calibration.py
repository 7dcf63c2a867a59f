"""Calibrated probabilities: one temperature fitted on validation logits, and the calibration error it fixes.

A network trained with cross-entropy is usually over-confident: its top probability is higher than its
accuracy. Dividing every logit by one scalar T > 1 (temperature scaling, Guo et al. 2017) fixes most of that
without changing any prediction, because the arg-max is unchanged. T minimises the negative log-likelihood
of the validation labels; with a single parameter and the whole validation set in memory, L-BFGS solves it
in a few steps with no learning rate to tune.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BINS = 15
MIN_TEMPERATURE = 0.01  # a perfectly separated validation set drives T to 0; these bounds keep it usable
MAX_TEMPERATURE = 100.0


class TemperatureFit(NamedTuple):
    """The fitted temperature, with expected calibration error and NLL before (T = 1) and after."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float

    def to_dict(self) -> dict[str, float]:
        return self._asdict()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, n_bins: int = DEFAULT_BINS,
                    max_iter: int = 100) -> TemperatureFit:
    """The T that minimises the NLL of ``softmax(logits / T)`` on ``labels``, by L-BFGS on log T.

    ``logits`` is (N, C) float, ``labels`` (N,) class indices; both come from the validation split with
    the trained model in eval mode. T is clamped to [0.01, 100]; if the fit does not lower the NLL
    (which should not happen), T = 1 is kept.
    """
    logits, labels = _check(logits, labels)
    with torch.inference_mode(False), torch.enable_grad():
        logits = logits.clone()  # a normal tensor even when the caller's came from inference mode
        log_t = torch.zeros((), requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
    fitted = float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))
    nll_before = float(F.cross_entropy(logits, labels))
    nll_after = float(F.cross_entropy(logits / fitted, labels))
    if not nll_after <= nll_before:  # also catches NaN
        fitted, nll_after = 1.0, nll_before
    return TemperatureFit(
        temperature=fitted,
        ece_before=expected_calibration_error(logits.softmax(1), labels, n_bins=n_bins),
        ece_after=expected_calibration_error((logits / fitted).softmax(1), labels, n_bins=n_bins),
        nll_before=nll_before,
        nll_after=nll_after,
    )


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, *,
                               n_bins: int = DEFAULT_BINS) -> float:
    """ECE: the gap between confidence (top probability) and accuracy, averaged over ``n_bins`` equal-width
    confidence bins weighted by how many samples fall in each. 0 is perfectly calibrated."""
    conf_sum, acc_sum, _ = _bin_sums(probabilities, labels, n_bins)
    return float((conf_sum - acc_sum).abs().sum() / len(labels))


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, *,
                     n_bins: int = DEFAULT_BINS) -> dict[str, list[float]]:
    """What a reliability diagram draws, in the bins of ``expected_calibration_error``: per bin the mean
    confidence, the accuracy (both NaN in an empty bin) and the number of samples."""
    conf_sum, acc_sum, count = _bin_sums(probabilities, labels, n_bins)
    per = count.clamp(min=1)
    empty = count == 0
    return {"confidence": (conf_sum / per).masked_fill(empty, float("nan")).tolist(),
            "accuracy": (acc_sum / per).masked_fill(empty, float("nan")).tolist(),
            "count": [int(c) for c in count]}


def _bin_sums(probabilities: torch.Tensor, labels: torch.Tensor,
              n_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per confidence bin: the sum of confidences, of correct predictions, and the count."""
    probabilities, labels = _check(probabilities, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    # bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 cannot occur with softmax
    bins = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1
    conf_sum = torch.zeros(n_bins).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(n_bins).index_add_(0, bins, correct)
    count = torch.zeros(n_bins).index_add_(0, bins, torch.ones_like(confidence))
    return conf_sum, acc_sum, count


@torch.no_grad()
def collect_logits(model: nn.Module, batches: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (put in eval mode, fp32) over ``(images, labels, ...)`` batches, e.g. a validation
    loader of ``ImageFolderDataModule``; returns all logits (N, C) and labels (N,). Empty batches (every
    file unreadable) are skipped."""
    model.eval()
    device = next(model.parameters()).device
    all_logits, all_labels = [], []
    for batch in batches:
        images, labels = batch[0], batch[1]
        if len(labels) == 0:
            continue
        all_logits.append(model(images.to(device, torch.float32)).float().cpu())
        all_labels.append(labels.cpu())
    if not all_logits:
        raise ValueError("no batches with images: cannot collect logits")
    return torch.cat(all_logits), torch.cat(all_labels)


def _check(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores).detach().float().cpu()
    labels = torch.as_tensor(labels).detach().long().cpu()
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"expected (N, C) scores with C >= 2 classes, got shape {tuple(scores.shape)}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"expected ({scores.shape[0]},) labels for {scores.shape[0]} rows, got {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("no samples: calibration needs at least one validation image")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {scores.shape[1] - 1}], got "
                         f"{int(labels.min())}..{int(labels.max())}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; check the model's outputs")
    return scores, labels
