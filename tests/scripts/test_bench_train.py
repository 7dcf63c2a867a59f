from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from imagefolders import photo_like
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PARTS = ("steps", "frozen", "frozen_forward", "cache", "allocator")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def generated_jpegs(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """Stands in for the script's make_photo_jpegs (crops of scikit-image photos: real data): five classes."""
    for i in range(count):
        folder = root / f"class{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(*size, seed=seed + i)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def test_quick_cache_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoded-image cache part only: the others train or start processes and take 30-60 s on 2 cores."""
    script = load_script()
    monkeypatch.setattr(script, "make_photo_jpegs", generated_jpegs)
    out = tmp_path / "train.json"
    assert script.main(["--quick", "--parts", "cache", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] and set(PARTS) & set(report) == {"cache"}
    cache = report["cache"]
    assert cache["train_images"] + cache["val_images"] == cache["images"] == 12
    assert len(cache["cached_epochs_s"]) == len(cache["uncached_epochs_s"]) == 2
    assert cache["cache_side"] == 256  # lite0's eval resize: floor(224 / 0.875)
    # 12 images of 256 x 320 stored at 256 x 320 (never upscaled): 12 * 256 * 320 * 3 bytes = 2.9 MB
    assert cache["cache_megabytes"] == pytest.approx(12 * 256 * 320 * 3 / 1e6, abs=0.1)


@pytest.mark.slow  # real weights: the part builds the pretrained lite0 backbone
def test_quick_frozen_forward_part(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert load_script().main(["--quick", "--parts", "frozen_forward", "--out", str(out)]) == 0
    part = json.loads(out.read_text())["frozen_forward"]
    assert part["onnx_backend_used"] == "onnx"  # the graph passed its check against eager PyTorch
    assert len(part["torch_runs"]) == len(part["onnx_runs"]) == 1  # --quick: one round of each


@pytest.mark.slow
def test_quick_run_of_every_part(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert load_script().main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(PARTS) <= set(report)
    assert {"bare_images_per_s", "lightning_images_per_s"} <= set(report["steps"])
    assert report["frozen"]["cached"]["training"].startswith("probe")
    assert "Lightning" in report["frozen"]["uncached"]["training"]
    assert report["frozen"]["cached_torch"]["features_backend"] == "torch"
    assert {"with_images_per_s", "without_images_per_s"} <= set(report["allocator"])
