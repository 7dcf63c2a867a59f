from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CLASS_NAMES = [
    "Ankle_boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "Sneaker", "T-shirt_top", "Trouser",
]  # fmt: skip


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_fashion_mnist", REPO / "scripts" / "make_fashion_mnist.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_fashion_mnist"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, compresslevel=1))
    else:
        path.write_bytes(data)


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny IDX files in the Fashion-MNIST layout: image i of class c has every pixel = 10 * c + 1."""
    source = tmp_path_factory.mktemp("idx")
    for part, per_class, compress in (("train", 6, True), ("t10k", 3, False)):
        labels = np.repeat(np.arange(10), per_class)
        np.random.default_rng(0).shuffle(labels)
        images = np.broadcast_to((labels * 10 + 1)[:, None, None], (len(labels), 28, 28))
        write_idx(source / f"{part}-images-idx3-ubyte", images, compress)
        write_idx(source / f"{part}-labels-idx1-ubyte", labels, compress)
    return source


def run(script: ModuleType, out: Path, source: Path, *extra: str) -> int:
    return script.main(["--out", str(out), "--source", str(source), *extra])


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_layout_counts_and_class_names(script: ModuleType, fake_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "fm"
    assert (
        run(script, out, fake_source, "--per-class", "3", "--val-per-class", "2", "--test-per-class", "1")
        == 0
    )
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        assert sorted(p.name for p in (out / split).iterdir()) == CLASS_NAMES
        for label, name in enumerate(script.CLASS_NAMES):
            images = list((out / split / name).glob("*.png"))
            assert len(images) == count
            for path in images:  # the right pixels went into the right class folder
                assert np.asarray(Image.open(path)).max() == 10 * label + 1
    train = {p.relative_to(out / "train") for p in files(out / "train")}
    val = {p.relative_to(out / "val") for p in files(out / "val")}
    assert not train & val  # disjoint draws from the same IDX set


def test_rerun_is_a_no_op_and_changed_arguments_rewrite(
    script: ModuleType, fake_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fm"
    run(script, out, fake_source, "--per-class", "2", "--val-per-class", "1")
    first = {p: p.stat().st_mtime_ns for p in files(out)}
    capsys.readouterr()
    run(script, out, fake_source, "--per-class", "2", "--val-per-class", "1")
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in files(out)} == first
    run(script, out, fake_source, "--per-class", "1", "--val-per-class", "1", "--format", "jpg")
    assert len(list((out / "train").rglob("*.jpg"))) == 10 and not list(out.rglob("*.png"))


def test_seed_changes_the_draw(script: ModuleType, fake_source: Path, tmp_path: Path) -> None:
    names = []
    for seed in ("0", "0", "1"):
        out = tmp_path / f"fm{len(names)}"
        run(script, out, fake_source, "--per-class", "2", "--val-per-class", "2", "--seed", seed)
        names.append([p.relative_to(out) for p in files(out / "train")])
    assert names[0] == names[1] != names[2]


def test_test_skip_draws_other_held_out_images(script: ModuleType, fake_source: Path, tmp_path: Path) -> None:
    def test_files(name: str, *extra: str) -> set[Path]:
        out = tmp_path / name
        run(script, out, fake_source, "--per-class", "1", "--val-per-class", "1", *extra)
        return {p.relative_to(out / "test") for p in files(out / "test")}

    demo, other = test_files("demo", "--test-per-class", "1"), test_files("other", "--test-per-class", "2",
                                                                         "--test-skip", "1")
    assert len(demo) == 10 and len(other) == 20 and not demo & other
    assert demo | other == test_files("all", "--test-per-class", "3")  # the same draw, split where asked


def test_prints_one_summary_line(
    script: ModuleType, fake_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(script, tmp_path / "fm", fake_source, "--per-class", "1", "--val-per-class", "1")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "10 train, 10 val images, 10 classes" in lines[0]


def test_refuses_a_foreign_folder(script: ModuleType, fake_source: Path, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not made by this script"):
        run(script, tmp_path, fake_source)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_too_many_images_requested(script: ModuleType, fake_source: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="6 images, 7 requested"):
        run(script, tmp_path / "fm", fake_source, "--per-class", "4", "--val-per-class", "3")


def test_missing_files_explain_the_install(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(script, "_can_apt_install", lambda: False)
    with pytest.raises(SystemExit, match="apt-get install -y dataset-fashion-mnist") as info:
        run(script, tmp_path / "fm", tmp_path / "nowhere")
    assert info.value.code != 0


def test_installs_the_package_when_allowed(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(script, "DEFAULT_SOURCE", tmp_path / "nowhere")
    monkeypatch.setattr(script, "_can_apt_install", lambda: True)
    monkeypatch.setattr(script, "_apt_install", calls.append)
    with pytest.raises(SystemExit):  # the fake install installs nothing
        script.main(["--out", str(tmp_path / "fm"), "--source", str(tmp_path / "nowhere")])
    assert calls == ["dataset-fashion-mnist"]


@pytest.mark.slow  # real data: the IDX files of the Debian package
def test_real_fashion_mnist_sample(script: ModuleType, tmp_path: Path) -> None:
    if not script._has_idx_files(script.DEFAULT_SOURCE):
        pytest.skip(f"real data missing: no Fashion-MNIST IDX files in {script.DEFAULT_SOURCE} "
                    f"(apt-get install {script.DEBIAN_PACKAGE})")
    out = tmp_path / "fm"
    assert script.main(["--out", str(out), "--per-class", "100", "--val-per-class", "100"]) == 0
    assert len(files(out / "train")) == len(files(out / "val")) == 1000
    with Image.open(next((out / "val" / "Bag").iterdir())) as image:
        assert image.size == (28, 28) and image.mode == "L"
