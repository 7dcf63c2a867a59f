from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import timm
import torch
from imagefolders import photo_like
from PIL import Image

from finetune.data.transforms import ResizeCenterCrop, build_transforms, parse_data_config

BACKBONES = ("tf_efficientnet_lite0", "mobilenetv2_100")
# Measured: max |ours - timm| is ~5e-7 (float rounding only) because the eval resize uses Pillow like timm.
EVAL_TOLERANCE = 1e-5


def data_config(name: str) -> dict:
    return timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False))


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    return {name: data_config(name) for name in BACKBONES}


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "odd": photo_like(300, 451, seed=1),  # an odd crop margin
        "square": photo_like(512, 512, seed=2),
        "noise_tall": rng.integers(0, 256, (517, 203, 3), dtype=np.uint8),
        "tiny": rng.integers(0, 256, (28, 28, 3), dtype=np.uint8),  # upscaled like Fashion-MNIST
    }


def timm_eval(config: dict, image: np.ndarray) -> torch.Tensor:
    return timm.data.create_transform(**config, is_training=False)(Image.fromarray(image))


def test_backbone_configs_are_what_the_tests_assume(configs: dict[str, dict]) -> None:
    lite0, mobilenet = configs["tf_efficientnet_lite0"], configs["mobilenetv2_100"]
    assert lite0["mean"] == lite0["std"] == (0.5, 0.5, 0.5)
    assert (lite0["interpolation"], lite0["input_size"], lite0["crop_pct"]) == (
        "bicubic",
        (3, 224, 224),
        0.875,
    )
    assert mobilenet["mean"] == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_eval_transform_matches_timm_on_photos(
    configs: dict[str, dict], photos: dict[str, np.ndarray], backbone: str
) -> None:
    config = configs[backbone]
    ours = build_transforms(config, train=False)
    for name, image in photos.items():
        expected = timm_eval(config, image)
        actual = ours(image=image)["image"]
        assert actual.shape == expected.shape == (3, 224, 224), name
        assert actual.dtype == torch.float32
        assert (actual - expected).abs().mean() < EVAL_TOLERANCE, name
        assert (actual - expected).abs().max() < EVAL_TOLERANCE, name


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("input_size", [(3, 224, 224), (3, 160, 208)])
@pytest.mark.parametrize("crop_pct", [0.9, 1.0, 1.1])
def test_eval_transform_matches_timm_for_other_configs(
    configs: dict[str, dict],
    photos: dict[str, np.ndarray],
    crop_mode: str,
    input_size: tuple,
    crop_pct: float,
) -> None:
    config = dict(configs["mobilenetv2_100"], crop_mode=crop_mode, input_size=input_size, crop_pct=crop_pct)
    ours = build_transforms(config, train=False)
    for name in ("odd", "noise_tall"):
        expected = timm_eval(config, photos[name])
        actual = ours(image=photos[name])["image"]
        assert actual.shape == expected.shape == (3, *input_size[1:])
        assert (actual - expected).abs().max() < EVAL_TOLERANCE, name


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Red encodes the row, green the column (mod 256), blue is a constant: every pixel says where it is."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows % 256, cols % 256, np.full_like(rows, 50)], axis=2).astype(np.uint8)


@pytest.mark.parametrize(
    ("height", "width", "top", "left"), [(224, 336, 0, 56), (224, 337, 0, 56), (227, 224, 2, 0)]
)
def test_eval_crop_offsets_are_exact(height: int, width: int, top: int, left: int) -> None:
    """With crop_pct=1 the short side is already 224, so the transform is a pure crop; torchvision rounds the
    margin with round-half-even (56.5 -> 56, 1.5 -> 2), where albumentations' CenterCrop would floor."""
    config = {"input_size": (3, 224, 224), "mean": (0, 0, 0), "std": (1, 1, 1), "crop_pct": 1.0}
    image = coordinate_image(height, width)
    out = build_transforms(config, train=False)(image=image)["image"]
    expected = image[top : top + 224, left : left + 224].transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_eval_resize_keeps_orientation_and_aspect() -> None:
    """A tall image with a marker at the top-left: after resize and crop the marker stays top-left."""
    image = np.zeros((400, 200, 3), np.uint8)
    image[200:240, :40] = 255
    config = {"input_size": (3, 112, 112), "mean": (0, 0, 0), "std": (1, 1, 1), "crop_pct": 0.875}
    out = build_transforms(config, train=False)(image=image)["image"][0].numpy()
    # short side 200 -> 128, long 400 -> 256; crop offset (256 - 112) / 2 = 72 rows, 8 columns.
    rows = (np.array([200, 240]) * 128 / 200 - 72).round().astype(int)  # 56, 82
    cols_end = round(40 * 128 / 200 - 8)
    assert out[rows[0] + 2 : rows[1] - 2, : cols_end - 2].min() > 0.95
    assert out[: rows[0] - 3].max() < 0.05 and out[:, cols_end + 3 :].max() < 0.05


@pytest.mark.parametrize("backbone", BACKBONES)
def test_train_transform_shape_dtype_and_range(
    configs: dict[str, dict], photos: dict[str, np.ndarray], backbone: str
) -> None:
    config = configs[backbone]
    train = build_transforms(config, train=True, seed=0)
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    for image in photos.values():
        out = train(image=image)["image"]
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        pixels = out * std + mean
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_train_transform_is_reproducible_with_a_seed(
    configs: dict[str, dict], photos: dict[str, np.ndarray]
) -> None:
    config = configs["mobilenetv2_100"]
    first = build_transforms(config, train=True, seed=5)
    second = build_transforms(config, train=True, seed=5)
    a = [first(image=photos["odd"])["image"] for _ in range(3)]
    b = [second(image=photos["odd"])["image"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])


def test_train_pipeline_contents(configs: dict[str, dict]) -> None:
    config = configs["tf_efficientnet_lite0"]
    names = [type(t).__name__ for t in build_transforms(config, train=True).transforms]
    assert names == ["RandomResizedCrop", "HorizontalFlip", "ColorJitter", "Normalize", "ToTensorV2"]
    crop = build_transforms(config, train=True, scale_min=0.3).transforms[0]
    assert crop.size == (224, 224) and crop.scale == (0.3, 1.0)
    assert crop.interpolation == 2  # cv2.INTER_CUBIC from 'bicubic'
    plain = build_transforms(config, train=True, hflip=0, color_jitter=0).transforms
    assert [type(t).__name__ for t in plain] == ["RandomResizedCrop", "Normalize", "ToTensorV2"]
    jitter = build_transforms(config, train=True, color_jitter=1.5).transforms[2]
    assert jitter.brightness == (0.0, 2.5) and jitter.hue == (0.0, 0.0)


def test_sizes_come_from_the_config() -> None:
    config = {"input_size": (3, 96, 128), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    image = np.zeros((50, 70, 3), np.uint8)
    for train in (True, False):
        assert build_transforms(config, train=train)(image=image)["image"].shape == (3, 96, 128)


def test_white_and_black_normalise_to_the_config_extremes(configs: dict[str, dict]) -> None:
    for config in configs.values():
        mean, std = np.array(config["mean"]), np.array(config["std"])
        for value in (0, 255):
            image = np.full((64, 64, 3), value, np.uint8)
            for train in (True, False):
                out = build_transforms(config, train=train, color_jitter=0)(image=image)["image"]
                expected = (value / 255 - mean) / std
                np.testing.assert_allclose(out.numpy()[:, 5, 5], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"scale_min": 0}, "scale_min"),
        ({"scale_min": 1.2}, "scale_min"),
        ({"hflip": -0.1}, "hflip"),
        ({"hflip": 2}, "hflip"),
        ({"color_jitter": -1}, "color_jitter"),
        ({"color_jitter": float("nan")}, "color_jitter"),
    ],
)
def test_bad_augment_arguments_are_named(configs: dict[str, dict], kwargs: dict, argument: str) -> None:
    for train in (True, False):
        with pytest.raises(ValueError, match=argument):
            build_transforms(configs["mobilenetv2_100"], train=train, **kwargs)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"input_size": (224, 224)}, "input_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"interpolation": "bogus"}, "interpolation"),
        ({"crop_pct": 0}, "crop_pct"),
        ({"crop_mode": "zoom"}, "crop_mode"),
    ],
)
def test_bad_data_configs_are_named(configs: dict[str, dict], change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        parse_data_config(dict(configs["mobilenetv2_100"], **change))
    with pytest.raises(ValueError, match="missing input_size"):
        parse_data_config({"mean": (0, 0, 0), "std": (1, 1, 1)})


@pytest.mark.parametrize("train", [True, False])
def test_pipelines_serialise_and_round_trip(
    configs: dict[str, dict], photos: dict[str, np.ndarray], train: bool
) -> None:
    pipeline = build_transforms(configs["tf_efficientnet_lite0"], train=train, seed=1)
    restored = A.from_dict(A.to_dict(pipeline))
    assert A.to_dict(restored) == A.to_dict(pipeline)
    if not train:
        assert isinstance(restored.transforms[0], ResizeCenterCrop)
        image = photos["odd"]
        assert torch.equal(restored(image=image)["image"], pipeline(image=image)["image"])
