"""Class imbalance: the decision, the weights and the class-balanced sampler in the datamodule."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from finetune.data import ImageFolderDataModule, scan_image_folder
from finetune.data.balance import IMBALANCE_RATIO, class_weights, plan_balance
from finetune.data.sampling import EpochSampler, balanced_weights

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
          "crop_pct": 1.0}


def test_balanced_data_needs_nothing() -> None:
    plan = plan_balance([10, 12, 9])
    assert plan.method == "none" and plan.ratio == pytest.approx(12 / 9)


def test_above_the_ratio_the_sampler_is_chosen_and_recorded() -> None:
    plan = plan_balance([40, 10, 0, 12])
    assert plan.ratio == 4.0 > IMBALANCE_RATIO and plan.method == "sampler"
    assert "4.0" in plan.reason and plan.to_dict()["method"] == "sampler"
    assert plan_balance([40, 10], method="loss_weights").method == "loss_weights"
    with pytest.raises(ValueError, match="balance method"):
        plan_balance([1, 2], method="oversample")


def test_weights_are_inverse_frequency_with_mean_one() -> None:
    weights = class_weights([30, 10, 0])
    assert weights[2] == 0 and weights[1] == pytest.approx(3 * weights[0])
    assert sum(weights[:2]) / 2 == pytest.approx(1.0)


def test_sampler_draws_classes_about_equally_and_is_seeded() -> None:
    labels = [0] * 900 + [1] * 100
    sampler = EpochSampler(len(labels), seed=1, weights=balanced_weights(labels))
    drawn = Counter(labels[i] for i, _ in sampler)
    assert 400 < drawn[1] < 600
    assert list(sampler) == list(EpochSampler(len(labels), seed=1, weights=balanced_weights(labels)))


def test_datamodule_uses_the_sampler_when_asked(tmp_path: Path, make_class_folder) -> None:
    splits = scan_image_folder(make_class_folder(tmp_path / "d", {"a": 30, "b": 5}))
    plain = ImageFolderDataModule(splits, CONFIG, batch_size=4, num_workers=0)
    balanced = ImageFolderDataModule(splits, CONFIG, batch_size=4, num_workers=0, class_balanced=True)
    assert plain.train_dataloader().sampler.weights is None
    loader = balanced.train_dataloader()
    assert loader.sampler.weights is not None
    labels = Counter(int(label) for _, batch, _ in loader for label in batch)
    assert labels[1] > 5  # the small class is drawn far more often than its share
