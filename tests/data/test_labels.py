"""`--labels FILE.csv`: path,label[,split] rows instead of class folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.data.labels import read_labels_csv
from finetune.errors import DatasetError


@pytest.fixture
def flat(tmp_path: Path, write_png) -> Path:
    """root/img/{0..11}.png, no class folders: the labels come from the CSV."""
    root = tmp_path / "root"
    for i in range(12):
        write_png(root / "img" / f"{i}.png", (20 * i, 0, 0))
    return root


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_split_column_is_used(tmp_path: Path, flat: Path) -> None:
    rows = ["path,label,split"] + [f"img/{i}.png,{'cat' if i % 2 else 'dog'},{'val' if i < 4 else 'train'}"
                                   for i in range(12)]
    splits = read_labels_csv(_csv(tmp_path, "\n".join(rows)), flat)
    assert splits.classes == ["cat", "dog"] and splits.split_source == "labels"
    assert len(splits.train) == 8 and len(splits.val) == 4 and splits.test == []
    assert {s.path for s in splits.val} == {flat / "img" / f"{i}.png" for i in range(4)}
    assert all(s.label == (0 if int(s.path.stem) % 2 else 1) for s in splits.train + splits.val)


def test_without_split_column_a_seeded_stratified_split_is_made(tmp_path: Path, flat: Path) -> None:
    text = "\ufeff" + "\n".join(f"img/{i}.png,{'cat' if i % 2 else 'dog'}" for i in range(12))  # BOM, no header
    first = read_labels_csv(_csv(tmp_path, text), flat, val_fraction=0.5, seed=3)
    again = read_labels_csv(_csv(tmp_path, text), flat, val_fraction=0.5, seed=3)
    assert first.split_source == "generated" and first.to_dict() == again.to_dict()
    assert first.class_counts("val") == [3, 3] and first.class_counts("train") == [3, 3]


def test_split_names_and_test_rows(tmp_path: Path, flat: Path) -> None:
    split = {0: "validation", 1: "VALID", 2: "test", 3: "test"}
    rows = [f"./img/{i}.png,{'cat' if i % 2 else 'dog'},{split.get(i, 'Train')}" for i in range(12)]
    splits = read_labels_csv(_csv(tmp_path, "path,label,split\n" + "\n".join(rows)), flat)
    assert len(splits.val) == 2 and {s.path.name for s in splits.test} == {"2.png", "3.png"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/etc/passwd,cat", "line 3: '/etc/passwd' is an absolute path"),
        ("C:\\data\\x.png,cat", "line 3: 'C:\\\\data\\\\x.png' is an absolute path"),
        ("../outside.png,cat", "line 3: '../outside.png' leaves the dataset root"),
        ("img/../../outside.png,cat", "leaves the dataset root"),
        ("img/1.png,cat,holdout", "line 3: split 'holdout' is not one of train, val, test"),
        ("img/1.png", "line 3: expected path,label"),
        ("img/1.png,,train", "line 3: label is empty"),
        ("img/0.png,dog", "line 3: img/0.png is already listed on line 2"),
        ("img/99.png,cat", "line 3: img/99.png"),
    ],
)
def test_bad_rows_name_the_line(tmp_path: Path, flat: Path, line: str, message: str) -> None:
    text = "path,label\nimg/0.png,dog\n" + line + "\n" + "\n".join(f"img/{i}.png,cat" for i in range(2, 6))
    with pytest.raises(DatasetError) as info:
        read_labels_csv(_csv(tmp_path, text), flat)
    assert message in str(info.value) and "labels.csv" in str(info.value)


def test_file_level_errors(tmp_path: Path, flat: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_labels_csv(tmp_path / "nope.csv", flat)
    with pytest.raises(DatasetError, match="no rows"):
        read_labels_csv(_csv(tmp_path, "path,label\n"), flat)
    with pytest.raises(DatasetError, match="at least 2"):
        read_labels_csv(_csv(tmp_path, "img/0.png,cat\nimg/1.png,cat\n"), flat)
    with pytest.raises(DatasetError, match="line 2: label 'dog' \\(val\\) has no train rows"):
        read_labels_csv(_csv(tmp_path, "img/0.png,cat,train\nimg/1.png,dog,val\nimg/2.png,owl,train\n"), flat)
    (tmp_path / "bad.csv").write_bytes(b"img/0.png,\xff\xfe\n")
    with pytest.raises(DatasetError, match="UTF-8"):
        read_labels_csv(tmp_path / "bad.csv", flat)


def test_the_doctor_checks_the_files_of_a_labels_file(tmp_path: Path, flat: Path, monkeypatch) -> None:
    from finetune.cli import main

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    (flat / "img" / "5.png").write_bytes(b"")
    labels = _csv(tmp_path, "\n".join(f"img/{i}.png,{'cat' if i % 2 else 'dog'}" for i in range(12)))
    assert main(["doctor", str(flat), "--labels", str(labels), "--json", "--workers", "0"]) == 1


def test_fit_trains_from_a_labels_file(tmp_path: Path, flat: Path, monkeypatch) -> None:
    from finetune.cli import main

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    labels = _csv(tmp_path, "\n".join(f"img/{i}.png,{'cat' if i % 2 else 'dog'}" for i in range(12)))
    assert main(["fit", str(flat), "--labels", str(labels), "--recipe", "small-similar", "--model",
                 "test_efficientnet", "--no-pretrained", "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--no-progress", "--workers", "0"]) == 0
    split = (tmp_path / "run" / "split.json").read_text()
    assert '"classes": [\n  "cat",\n  "dog"\n ]' in split and "img/0.png" in split
