from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTS = ("steps", "frozen", "frozen_forward", "cache", "allocator")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_quick_cache_part(tmp_path: Path) -> None:
    """The decoded-image cache part only: the others train or start processes and take 30-60 s on 2 cores."""
    out = tmp_path / "train.json"
    assert load_script().main(["--quick", "--parts", "cache", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] and set(PARTS) & set(report) == {"cache"}
    cache = report["cache"]
    assert len(cache["cached_epochs_s"]) == 2 and cache["cache_megabytes"] > 0
    assert cache["later_over_first"] < 1  # even at 12 small images, a cached epoch beats the one that fills


def test_quick_frozen_forward_part(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert load_script().main(["--quick", "--parts", "frozen_forward", "--out", str(out)]) == 0
    part = json.loads(out.read_text())["frozen_forward"]
    assert part["onnx_backend_used"] == "onnx"  # the graph passed its check against eager PyTorch
    assert part["torch_images_per_s"] > 0 and part["onnx_images_per_s"] > 0 and part["onnx_setup_s"] > 0


@pytest.mark.slow
def test_quick_run_of_every_part(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert load_script().main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(PARTS) <= set(report)
    assert report["steps"]["bare_images_per_s"] > 0 and report["steps"]["lightning_images_per_s"] > 0
    assert report["frozen"]["cached"]["training"].startswith("probe")
    assert "Lightning" in report["frozen"]["uncached"]["training"]
    assert report["frozen"]["cached_torch"]["features_backend"] == "torch"
    assert report["allocator"]["with_images_per_s"] > 0 and report["allocator"]["without_images_per_s"] > 0
