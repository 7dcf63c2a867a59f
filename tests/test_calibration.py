"""Temperature scaling and the expected calibration error, on logits with a known amount of over-confidence."""

import pytest
import torch

from finetune.calibration import (
    MIN_TEMPERATURE,
    collect_logits,
    expected_calibration_error,
    fit_temperature,
)


def calibrated_logits(n: int = 4000, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true label distribution: labels are drawn from it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 1.5
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_fit_recovers_the_scale_and_lowers_the_calibration_error(scale):
    logits, labels = calibrated_logits()
    fit = fit_temperature(logits * scale, labels)
    assert fit.temperature == pytest.approx(scale, rel=0.1)  # over-confident -> T > 1, under-confident -> T < 1
    assert fit.ece_after < fit.ece_before / 3 and fit.ece_after < 0.03
    assert fit.nll_after < fit.nll_before
    assert set(fit.to_dict()) == {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"}


def test_already_calibrated_logits_keep_a_temperature_near_one():
    logits, labels = calibrated_logits(seed=1)
    assert fit_temperature(logits, labels).temperature == pytest.approx(1.0, abs=0.1)


def test_works_on_inference_mode_tensors_and_inside_no_grad():
    logits, labels = calibrated_logits(n=500)
    with torch.inference_mode():
        frozen = logits * 2
        fit = fit_temperature(frozen, labels)
    assert fit.temperature == pytest.approx(2.0, rel=0.2)


def test_perfectly_separated_data_gives_a_finite_bounded_temperature():
    labels = torch.arange(20) % 4
    logits = torch.nn.functional.one_hot(labels, 4).float() * 5
    fit = fit_temperature(logits, labels)
    assert MIN_TEMPERATURE <= fit.temperature <= 1.0
    assert fit.nll_after <= fit.nll_before


def test_ece_on_hand_computed_cases():
    labels = torch.tensor([0, 0, 0, 0, 1])
    confident = torch.tensor([[0.8, 0.2]] * 5)  # confidence 0.8, accuracy 0.8
    assert expected_calibration_error(confident, labels) == pytest.approx(0.0, abs=1e-6)
    certain = torch.tensor([[1.0, 0.0]] * 4 + [[1.0, 0.0]])  # confidence 1.0, accuracy 0.8
    assert expected_calibration_error(certain, labels) == pytest.approx(0.2)
    # two bins: (0.6, 2 right of 2) and (0.9, 0 right of 2): (2 * 0.4 + 2 * 0.9) / 4
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(probs, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.65)


@pytest.mark.parametrize(("logits", "labels", "message"), [
    (torch.zeros(3), torch.zeros(3), "(N, C)"),
    (torch.zeros(3, 2), torch.zeros(2), "labels"),
    (torch.zeros(0, 2), torch.zeros(0), "no samples"),
    (torch.zeros(2, 2), torch.tensor([0, 2]), "class indices"),
    (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), "NaN"),
])
def test_bad_inputs_are_named(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(logits, labels)


def test_collect_logits_runs_eval_mode_and_skips_empty_batches():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9), torch.nn.Linear(12, 3))
    x = torch.randn(5, 3, 2, 2)
    empty = (torch.empty(0, 3, 2, 2), torch.empty(0, dtype=torch.long), ["bad"])
    batches = [(x[:3], torch.tensor([0, 1, 2]), []), empty,
               (x[3:], torch.tensor([1, 1]), [])]
    logits, labels = collect_logits(model.train(), batches)
    assert not model.training  # dropout off: the same logits twice
    assert torch.equal(logits, model(x)) and labels.tolist() == [0, 1, 2, 1, 1]
