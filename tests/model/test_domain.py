"""The domain gap: synthetic BatchNorm statistics, and real data sets that ship offline."""

import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from finetune.model.domain import DOMAIN_GAP_THRESHOLD, measure_domain_gap
from finetune.recipe_choice import inspect_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import reference_sets  # noqa: E402


def bn_model(mean=0.0, var=1.0):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[0].running_mean.fill_(mean)
    model[0].running_var.fill_(var)
    return model


def batches(mean, std, n=4, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 3, size, size, generator=g) * std + mean, torch.zeros(16), []) for _ in range(n)]


def test_matching_statistics_score_near_zero_and_a_shift_scores_high():
    model = bn_model(0.0, 1.0)
    # the second BN layer: give it the statistics its input actually has, so only the first layer can differ
    same = measure_domain_gap(model, batches(0.0, 1.0))
    assert same.per_layer[0] < 0.01
    shifted = measure_domain_gap(model, batches(3.0, 0.2))
    assert shifted.per_layer[0] > 4  # KL of N(3, 0.04) from N(0, 1) is about 5.7
    assert shifted.score > same.score
    assert shifted.domain == "different" and shifted.images == 64


def test_max_images_limits_the_pass_and_model_mode_is_restored():
    model = bn_model().train()
    gap = measure_domain_gap(model, batches(0.0, 1.0, n=10), max_images=40)
    assert gap.images == 40 and model.training
    assert torch.equal(model[0].running_mean, torch.zeros(3))  # eval mode: the statistics were not updated


def test_needs_batchnorm_and_images():
    with pytest.raises(ValueError, match="no BatchNorm"):
        measure_domain_gap(nn.Conv2d(3, 3, 1), batches(0, 1))
    with pytest.raises(ValueError, match="no decodable image"):
        measure_domain_gap(bn_model(), [(torch.empty(0, 3, 8, 8), torch.empty(0), ["bad.jpg"])])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return {name: writer(root / name, 12, 0) for name, (_, writer) in reference_sets.WRITERS.items()}


@pytest.mark.parametrize("name", list(reference_sets.WRITERS))
def test_real_data_sets_land_on_the_right_side_of_the_threshold(name, reference):
    expected = reference_sets.WRITERS[name][0]
    result = inspect_dataset(reference[name], num_workers=0)
    gap = result.domain_gap
    assert gap.domain == expected, f"{name}: gap {gap.score:.3f} vs threshold {DOMAIN_GAP_THRESHOLD}"
    # a clear margin, not a coin flip at the threshold
    assert (gap.score / DOMAIN_GAP_THRESHOLD if expected == "different" else DOMAIN_GAP_THRESHOLD / gap.score) > 1.4
    assert result.recipe == f"small-{expected}" and "domain gap" in result.reason


def test_a_backbone_without_batchnorm_is_not_measured(tiny_folder, monkeypatch):
    from finetune import recipe_choice as choice

    def vit(name, **kwargs):  # a tiny backbone without BatchNorm, random weights (no hub download)
        return timm.create_model("test_vit", num_classes=kwargs["num_classes"])

    monkeypatch.setattr(choice, "create_backbone", vit)
    result = inspect_dataset(tiny_folder, model="test_vit", num_workers=0)
    assert result.domain_gap is None and result.recipe == "small-similar"
    assert "no BatchNorm statistics" in result.reason
