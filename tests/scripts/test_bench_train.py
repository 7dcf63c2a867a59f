from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_quick_steps_and_cache(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert load_script().main(["--quick", "--parts", "steps,cache", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] and "frozen" not in report and "allocator" not in report
    steps, cache = report["steps"], report["cache"]
    assert steps["bare_images_per_s"] > 0 and steps["lightning_images_per_s"] > 0 and steps["ratio"] > 0
    assert len(cache["cached_epochs_s"]) == 2 and cache["cache_megabytes"] > 0
    assert cache["later_over_first"] < 1  # even at 12 small images, a cached epoch beats the one that fills


@pytest.mark.slow
def test_quick_run_of_every_part(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert load_script().main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"steps", "frozen", "cache", "allocator"} <= set(report)
    assert report["frozen"]["cached"]["training"].startswith("probe")
    assert "Lightning" in report["frozen"]["uncached"]["training"]
    assert report["allocator"]["with_images_per_s"] > 0 and report["allocator"]["without_images_per_s"] > 0
