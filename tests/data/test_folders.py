from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from finetune.data.folders import DatasetSplits, Sample, scan_image_folder
from finetune.errors import DatasetError

MakeFolder = Callable[..., Path]


def _paths(samples: list[Sample]) -> set[Path]:
    return {s.path for s in samples}


def test_class_layout_generates_a_stratified_split(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    root = make_class_folder(tmp_path / "ds", {"dog": 10, "cat": 20, "bird": 5})
    splits = scan_image_folder(root)
    assert splits.classes == ["bird", "cat", "dog"]
    assert splits.split_source == "generated"
    assert splits.class_counts("val") == [1, 4, 2]  # round(20% of 5, 20, 10)
    assert splits.class_counts("train") == [4, 16, 8]
    assert not _paths(splits.train) & _paths(splits.val)
    assert len(_paths(splits.train) | _paths(splits.val)) == 35
    assert splits.test == []
    for sample in splits.train + splits.val:
        assert sample.path.parent.name == splits.classes[sample.label]


def test_split_is_seeded(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": 30, "b": 30})
    first, again = scan_image_folder(root, seed=1), scan_image_folder(root, seed=1)
    assert first == again
    other = scan_image_folder(root, seed=2)
    assert _paths(other.val) != _paths(first.val)
    assert other.class_counts("val") == first.class_counts("val") == [6, 6]


@pytest.mark.parametrize(("count", "fraction"), [(2, 0.2), (2, 0.9), (3, 0.01), (7, 0.99)])
def test_every_class_keeps_an_image_on_each_side(
    tmp_path: Path, make_class_folder: MakeFolder, count: int, fraction: float
) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": count, "b": 40})
    splits = scan_image_folder(root, val_fraction=fraction)
    assert min(splits.class_counts("train")) >= 1 and min(splits.class_counts("val")) >= 1


def test_train_val_test_layout(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    make_class_folder(tmp_path / "train", {"cat": 4, "dog": 3})
    make_class_folder(tmp_path / "validation", {"cat": 2, "dog": 1})
    make_class_folder(tmp_path / "test", {"dog": 2})
    splits = scan_image_folder(tmp_path)
    assert splits.split_source == "folders"
    assert splits.classes == ["cat", "dog"]
    assert splits.class_counts("train") == [4, 3]
    assert splits.class_counts("val") == [2, 1]
    assert splits.class_counts("test") == [0, 2]
    assert all(s.path.is_relative_to(tmp_path / "validation") for s in splits.val)


def test_train_folder_without_val_generates_one(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    make_class_folder(tmp_path / "train", {"cat": 5, "dog": 5})
    splits = scan_image_folder(tmp_path)
    assert splits.split_source == "generated"
    assert splits.class_counts("val") == [1, 1]


def test_a_class_named_train_is_just_a_class(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    root = make_class_folder(tmp_path / "vehicles", {"train": 3, "car": 3, "bus": 3})
    assert scan_image_folder(root).classes == ["bus", "car", "train"]


def test_hidden_files_and_folders_are_ignored(
    tmp_path: Path, make_class_folder: MakeFolder, write_png: Callable[..., Path]
) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": 3, "b": 3})
    write_png(root / ".cache" / "x.png")
    write_png(root / "a" / ".thumb.png")
    write_png(root / "a" / ".ipynb_checkpoints" / "y.png")
    (root / ".DS_Store").write_bytes(b"\0")
    splits = scan_image_folder(root)
    assert splits.classes == ["a", "b"]
    assert len(splits.train) + len(splits.val) == 6


def test_nested_images_and_upper_case_extensions(
    tmp_path: Path, make_class_folder: MakeFolder, write_png: Callable[..., Path]
) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": 2, "b": 2}, ext=".JPG")
    write_png(root / "a" / "2024" / "deep.png")
    splits = scan_image_folder(root)
    assert root / "a" / "2024" / "deep.png" in _paths(splits.train) | _paths(splits.val)
    assert sum(splits.class_counts("train")) + sum(splits.class_counts("val")) == 5


def test_save_and_reuse_gives_the_identical_split(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": 10, "b": 10, "c": 10})
    first = scan_image_folder(root, seed=3)
    split_file = first.save(tmp_path / "run" / "split.json")
    data = json.loads(split_file.read_text())
    assert data["train"][0][0] == first.train[0].path.relative_to(root).as_posix()
    again = scan_image_folder(root, seed=99, split_file=split_file)
    assert again.split_source == "file"
    assert (again.classes, again.train, again.val, again.test) == (
        first.classes,
        first.train,
        first.val,
        first.test,
    )
    assert DatasetSplits.load(split_file).train == first.train


def test_split_file_follows_a_moved_folder(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": 4, "b": 4})
    split_file = scan_image_folder(root).save(tmp_path / "split.json")
    moved = root.rename(tmp_path / "moved")
    splits = scan_image_folder(moved, split_file=split_file)
    assert all(s.path.is_relative_to(moved) for s in splits.train + splits.val)


def test_split_file_with_missing_files(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": 4, "b": 4})
    first = scan_image_folder(root)
    split_file = first.save(tmp_path / "split.json")
    first.val[0].path.unlink()
    with pytest.raises(DatasetError, match="no longer exist") as info:
        scan_image_folder(root, split_file=split_file)
    assert str(first.val[0].path) in str(info.value)


def test_split_file_with_changed_classes(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": 4, "b": 4})
    split_file = scan_image_folder(root).save(tmp_path / "split.json")
    make_class_folder(root, {"c": 3})
    with pytest.raises(DatasetError, match=r"added: \['c'\], removed: none"):
        scan_image_folder(root, split_file=split_file)


def test_split_file_warns_about_new_images(
    tmp_path: Path,
    make_class_folder: MakeFolder,
    write_png: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": 4, "b": 4})
    first = scan_image_folder(root)
    split_file = first.save(tmp_path / "split.json")
    write_png(root / "a" / "new.png")
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        again = scan_image_folder(root, split_file=split_file)
    assert again.train == first.train and "not in split file" in caplog.text


def test_a_split_left_out_on_purpose_is_not_warned_about(
    tmp_path: Path,
    make_class_folder: MakeFolder,
    write_png: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = make_class_folder(tmp_path / "ds" / "train", {"a": 4, "b": 4}).parent
    for name in ("a", "b"):
        write_png(root / "test" / name / "t.png")
    first = scan_image_folder(root)
    assert len(first.test) == 2
    split_file = dataclasses.replace(first, test=[], left_out=("test",)).save(tmp_path / "split.json")
    write_png(root / "train" / "a" / "new.png")
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        again = scan_image_folder(root, split_file=split_file)
    assert again.test == [] and again.left_out == ("test",)
    assert "1 images in" in caplog.text and "train/a/new.png" in caplog.text  # a new training image still is


def test_bad_split_files(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    root = make_class_folder(tmp_path / "ds", {"a": 4, "b": 4})
    with pytest.raises(DatasetError, match="does not exist"):
        scan_image_folder(root, split_file=tmp_path / "none.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot be read as JSON"):
        scan_image_folder(root, split_file=tmp_path / "junk.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(DatasetError, match="not a finetune split file"):
        scan_image_folder(root, split_file=tmp_path / "other.json")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda root, png: None, "does not exist"),
        (lambda root, png: root.write_text("x"), "is a file, not a folder"),
        (lambda root, png: root.mkdir(), "is empty"),
        (lambda root, png: png(root / "only" / "a.png"), "single class folder"),
        (lambda root, png: png(root / "a.png"), "no class folders"),
        (lambda root, png: (png(root / "a" / "1.png"), (root / "b").mkdir()), r"b: empty"),
        (lambda root, png: (png(root / "a" / "1.png"), png(root / "b" / "1.png")), "single image"),
        (lambda root, png: png(root / "val" / "a" / "1.png"), "no train/ folder"),
    ],
    ids=["missing", "file", "empty", "one-class", "loose-images", "empty-class", "one-image", "no-train"],
)
def test_dataset_errors_name_the_path_and_the_fix(
    tmp_path: Path,
    write_png: Callable[..., Path],
    build: Callable[[Path, Callable[..., Path]], object],
    message: str,
) -> None:
    root = tmp_path / "ds"
    build(root, write_png)
    with pytest.raises(DatasetError, match=message) as info:
        scan_image_folder(root)
    assert str(root) in str(info.value)


def test_no_known_extensions_lists_what_was_found(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.heic").write_bytes(b"x")
        (tmp_path / name / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no images with a known extension") as info:
        scan_image_folder(tmp_path)
    assert ".heic (6)" in str(info.value) and ".txt (2)" in str(info.value) and ".jpg" in str(info.value)


def test_one_class_without_images_names_its_extensions(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    make_class_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.heic").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"c: only \.heic \(1\)"):
        scan_image_folder(tmp_path)


def test_val_classes_must_exist_in_train(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    make_class_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    make_class_folder(tmp_path / "val", {"cat": 1, "cow": 1})
    with pytest.raises(DatasetError, match="not in .*train: cow") as info:
        scan_image_folder(tmp_path)
    assert str(tmp_path / "val") in str(info.value)


def test_several_validation_folders_are_an_error(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    for split in ("train", "val", "valid"):
        make_class_folder(tmp_path / split, {"cat": 2, "dog": 2})
    with pytest.raises(DatasetError, match="several validation folders"):
        scan_image_folder(tmp_path)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_val_fraction_is_checked(tmp_path: Path, make_class_folder: MakeFolder, fraction: float) -> None:
    root = make_class_folder(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(ValueError, match="val_fraction"):
        scan_image_folder(root, val_fraction=fraction)


def test_splits_json_is_stable(tmp_path: Path, make_class_folder: MakeFolder) -> None:
    root = make_class_folder(tmp_path, {"a": 3, "b": 3})
    splits = scan_image_folder(root)
    data = json.loads(splits.to_json())
    assert data["classes"] == ["a", "b"] and data["split_source"] == "generated"
    assert Counter(label for _, label in data["train"] + data["val"]) == {0: 3, 1: 3}
