from __future__ import annotations

import ast
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
from PIL import Image

import finetune.data
from finetune.data import (
    ImageFolderDataModule,
    ImageFolderDataset,
    collate_skipping,
    default_num_workers,
    scan_image_folder,
)
from finetune.data.folders import DatasetSplits, Sample

SMALL_CONFIG = {
    "input_size": (3, 32, 48),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


def backbone_config(name: str) -> dict:
    return timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False))


@pytest.fixture
def mixed_splits(
    tmp_path: Path, mixed_folder: dict[str, Path], make_class_folder: Callable[..., Path]
) -> DatasetSplits:
    """train/ and val/ whose class 'mixed' holds every decoding case (bad ones included)."""
    root = tmp_path / "ds"
    for split in ("train", "val"):
        make_class_folder(root / split, {"plain": 4})  # 4 + 16 mixed = 20: batches of 4 drop nothing
        for name, path in mixed_folder.items():
            target = root / split / "mixed" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return scan_image_folder(root)


def _bad(splits: DatasetSplits, split: str) -> set[str]:
    return {str(s.path) for s in getattr(splits, split) if s.path.name.startswith("bad_")}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loaders_skip_exactly_the_bad_files(mixed_splits: DatasetSplits, num_workers: int) -> None:
    dm = ImageFolderDataModule(mixed_splits, SMALL_CONFIG, batch_size=4, num_workers=num_workers)
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        skipped: list[str] = []
        seen = 0
        for images, labels, batch_skipped in loader:
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 48)
            assert labels.dtype == torch.long and labels.shape == (images.shape[0],)
            assert images.shape[0] + len(batch_skipped) <= 4
            skipped += batch_skipped
            seen += images.shape[0]
        assert set(skipped) == _bad(mixed_splits, split) and len(skipped) == 3
        assert seen == len(getattr(mixed_splits, split)) - 3


def test_dataset_returns_failed_items_and_logs_the_file(
    mixed_splits: DatasetSplits, caplog: pytest.LogCaptureFixture
) -> None:
    dm = ImageFolderDataModule(mixed_splits, SMALL_CONFIG, num_workers=0)
    dataset = dm.val_dataset
    index = next(i for i, s in enumerate(dataset.samples) if s.path.name == "bad_truncated.jpg")
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        image, label, path = dataset[index]
    assert image is None and path == str(dataset.samples[index].path)
    assert label == mixed_splits.classes.index("mixed")
    assert "bad_truncated.jpg" in caplog.text and "truncated" in caplog.text
    good = next(i for i, s in enumerate(dataset.samples) if s.path.name == "rgb.jpg")
    image, label, path = dataset[good]
    assert image.shape == (3, 32, 48) and path is None


def test_collate_of_an_all_bad_batch() -> None:
    batch = [(None, 0, "a.jpg"), (None, 1, "b.jpg")]
    images, labels, skipped = collate_skipping(batch, image_shape=(3, 8, 8))
    assert images.shape == (0, 3, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (0,) and labels.dtype == torch.long and skipped == ["a.jpg", "b.jpg"]
    assert collate_skipping(batch)[0].shape == (0,)


def test_collate_keeps_order_of_good_items() -> None:
    batch = [(torch.zeros(3, 2, 2), 4, None), (None, 1, "bad.png"), (torch.ones(3, 2, 2), 2, None)]
    images, labels, skipped = collate_skipping(batch)
    assert images.shape == (2, 3, 2, 2) and images[1].min() == 1
    assert labels.tolist() == [4, 2] and skipped == ["bad.png"]


def test_loader_settings(tmp_path: Path, make_class_folder: Callable[..., Path]) -> None:
    splits = scan_image_folder(make_class_folder(tmp_path / "ds", {"a": 10, "b": 10}))
    dm = ImageFolderDataModule(splits, SMALL_CONFIG, batch_size=4, num_workers=1, pin_memory=False)
    assert (dm.num_classes, dm.classes) == (2, ["a", "b"])
    train = dm.train_dataloader()
    assert train.drop_last and train.persistent_workers and train.num_workers == 1
    assert not dm.val_dataloader().drop_last
    big = ImageFolderDataModule(splits, SMALL_CONFIG, batch_size=64, num_workers=0)
    assert not big.train_dataloader().drop_last and not big.train_dataloader().persistent_workers
    assert len(big.train_dataloader()) == 1


def test_no_test_split_gives_an_empty_loader(tmp_path: Path, make_class_folder: Callable[..., Path]) -> None:
    splits = scan_image_folder(make_class_folder(tmp_path / "ds", {"a": 3, "b": 3}))
    dm = ImageFolderDataModule(splits, SMALL_CONFIG, num_workers=2)
    assert not dm.has_test
    loader = dm.test_dataloader()
    assert len(loader) == 0 and list(loader) == []


def test_test_split_is_loaded(tmp_path: Path, make_class_folder: Callable[..., Path]) -> None:
    for split in ("train", "val", "test"):
        make_class_folder(tmp_path / split, {"a": 2, "b": 2})
    dm = ImageFolderDataModule(scan_image_folder(tmp_path), SMALL_CONFIG, batch_size=3, num_workers=0)
    assert dm.has_test
    assert [labels.tolist() for _, labels, _ in dm.test_dataloader()] == [[0, 0, 1], [1]]


def test_shuffling_and_augmentation_are_seeded(
    tmp_path: Path, make_class_folder: Callable[..., Path]
) -> None:
    splits = scan_image_folder(make_class_folder(tmp_path / "ds", {"a": 8, "b": 8}), val_fraction=0.25)

    def first_epoch(seed: int) -> list[torch.Tensor]:
        dm = ImageFolderDataModule(splits, SMALL_CONFIG, batch_size=4, num_workers=0, seed=seed)
        return [images for images, _, _ in dm.train_dataloader()]

    a, b, c = first_epoch(1), first_epoch(1), first_epoch(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_workers_draw_different_augmentations(tmp_path: Path) -> None:
    # The same gradient image everywhere: equal crops across workers would mean one shared random stream.
    gradient = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3)))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            gradient.save(tmp_path / name / f"{i}.png")
    splits = scan_image_folder(tmp_path, val_fraction=0.25)
    dm = ImageFolderDataModule(splits, SMALL_CONFIG, batch_size=1, num_workers=2, augment={"hflip": 0})
    crops = [images[0] for images, _, _ in dm.train_dataloader()]
    assert len({tuple(c[0, 0, :4].tolist()) for c in crops}) > len(crops) // 2


def test_augment_reaches_the_train_transform(tmp_path: Path, make_class_folder: Callable[..., Path]) -> None:
    splits = scan_image_folder(make_class_folder(tmp_path / "ds", {"a": 3, "b": 3}))
    dm = ImageFolderDataModule(
        splits, SMALL_CONFIG, augment={"scale_min": 0.5, "hflip": 0, "color_jitter": 0}
    )
    assert [type(t).__name__ for t in dm.train_transform.transforms] == [
        "RandomResizedCrop",
        "Normalize",
        "ToTensorV2",
    ]
    assert dm.train_transform.transforms[0].scale == (0.5, 1.0)
    assert type(dm.eval_transform.transforms[0]).__name__ == "ResizeCenterCrop"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"augment": {"rotate": 10}}, "augment"),
        ({"augment": {"hflip": 3}}, "hflip"),
    ],
)
def test_bad_arguments_are_named(
    tmp_path: Path, make_class_folder: Callable[..., Path], kwargs: dict, argument: str
) -> None:
    splits = scan_image_folder(make_class_folder(tmp_path / "ds", {"a": 3, "b": 3}))
    with pytest.raises(ValueError, match=argument):
        ImageFolderDataModule(splits, SMALL_CONFIG, **kwargs)


def test_default_num_workers_fits_the_machine() -> None:
    workers = default_num_workers()
    assert 0 <= workers <= 8
    dm_workers = ImageFolderDataModule(
        DatasetSplits(Path("/"), ["a", "b"], [], []), SMALL_CONFIG, num_workers=None
    ).num_workers
    assert dm_workers == workers


def test_dataset_works_without_a_datamodule(tmp_path: Path, make_class_folder: Callable[..., Path]) -> None:
    from finetune.data import build_transforms

    root = make_class_folder(tmp_path / "ds", {"a": 1, "b": 1})
    samples = [Sample(p, i) for i, p in enumerate(sorted(root.rglob("*.png")))]
    dataset = ImageFolderDataset(samples, build_transforms(SMALL_CONFIG, train=False))
    assert len(dataset) == 2 and dataset[1][1] == 1


# Fashion-MNIST made by scripts/make_fashion_mnist.py: real images through the real backbone configs.


@pytest.mark.slow  # real data: the Fashion-MNIST IDX files
def test_fashion_mnist_with_efficientnet_lite0(fashion_mnist_dir: Path) -> None:
    splits = scan_image_folder(fashion_mnist_dir)
    assert (
        splits.num_classes == 10 and len(splits.train) == 1000 and splits.class_counts("train") == [100] * 10
    )
    dm = ImageFolderDataModule(splits, backbone_config("tf_efficientnet_lite0"), batch_size=100)
    seen_labels: set[int] = set()
    for images, labels, skipped in dm.train_dataloader():
        assert images.shape == (100, 3, 224, 224) and images.dtype == torch.float32 and skipped == []
        assert images.min() >= -1 - 1e-6 and images.max() <= 1 + 1e-6
        seen_labels |= set(labels.tolist())
    assert seen_labels == set(range(10))


@pytest.mark.slow  # real data: the Fashion-MNIST IDX files
def test_fashion_mnist_with_mobilenetv2(fashion_mnist_dir: Path) -> None:
    config = backbone_config("mobilenetv2_100")
    mean, std = np.array(config["mean"]), np.array(config["std"])
    dm = ImageFolderDataModule(scan_image_folder(fashion_mnist_dir), config, batch_size=50)
    images, labels, skipped = next(iter(dm.val_dataloader()))
    assert images.shape == (50, 3, 224, 224) and images.dtype == torch.float32 and skipped == []
    pixels = images.numpy() * std[None, :, None, None] + mean[None, :, None, None]
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    np.testing.assert_allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)  # grey stays grey
    np.testing.assert_allclose(np.median(images[:, :, 0, 0].numpy(), axis=0), -mean / std, atol=1e-5)  # black
    white = np.full((28, 28, 3), 255, np.uint8)
    out = dm.eval_transform(image=white)["image"].numpy()
    np.testing.assert_allclose(out[:, 100, 100], (1 - mean) / std, atol=1e-5)


class _TinyModule(pl.LightningModule):
    """Mean colour -> linear layer: just enough to drive the loaders through a Trainer."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)
        self.skipped: set[str] = set()

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor, list[str]]) -> torch.Tensor | None:
        images, labels, skipped = batch
        self.skipped.update(skipped)
        if images.shape[0] == 0:  # the contract: all-bad batches are skipped by the step
            return None
        return torch.nn.functional.cross_entropy(self.head(images.mean(dim=(2, 3))), labels)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch)

    def validation_step(self, batch: tuple, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_lightning_trainer_runs_over_bad_files(mixed_splits: DatasetSplits) -> None:
    dm = ImageFolderDataModule(mixed_splits, SMALL_CONFIG, batch_size=1, num_workers=0)
    module = _TinyModule(dm.num_classes)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert module.skipped == _bad(mixed_splits, "train") | _bad(mixed_splits, "val")


def test_the_data_package_does_not_import_higher_layers() -> None:
    forbidden = ("finetune.model", "finetune.train", "finetune.cli", "..model", "..train", "..cli")
    for source in Path(finetune.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
                assert not name.startswith(forbidden), f"{source.name} imports {name}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith(forbidden) for a in node.names), source.name
