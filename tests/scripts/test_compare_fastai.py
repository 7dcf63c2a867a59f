"""The helpers of scripts/compare_fastai.py; the comparison itself needs fastai and minutes, so it is not run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_fastai", REPO / "scripts" / "compare_fastai.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_fastai"] = module
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_exact_versions_and_drop_editables(script: ModuleType) -> None:
    freeze = "torch==2.14.1\n-e git+https://x#egg=finetune_kit\nfoo @ file:///tmp/foo.whl\n# note\ntimm==1.0.31\n"
    assert script.constraints_from_freeze(freeze) == "torch==2.14.1\ntimm==1.0.31\n"


def test_pth_line_adds_the_site_dir_with_its_own_pth_files(script: ModuleType, tmp_path: Path) -> None:
    line = script.pth_line(tmp_path / "it's site-packages")
    assert line.startswith("import site; site.addsitedir(") and line.endswith("\n")
    namespace: dict = {}
    exec(line.replace("import site; site.addsitedir", "added = str"), namespace)  # the path survives quoting
    assert namespace["added"] == str(tmp_path / "it's site-packages")


@pytest.mark.parametrize(("acc", "seconds", "met"), [(0.865, 24.0, True), (0.849, 24.0, False), (0.9, 24.3, False)])
def test_targets(script: ModuleType, acc: float, seconds: float, met: bool) -> None:
    result = script.targets(acc, seconds, fastai_s=242.0)
    assert result["met"] is met and result["time_max_s"] == 24.2


def test_finetune_result_reads_a_summary_and_round_trips_as_json(script: ModuleType, tmp_path: Path) -> None:
    summary = {"val": {"acc": 0.86500001}, "recipe": "small-different", "recipe_reason": "why",
               "timings": {"total_s": 21.04}, "epochs_run": 0, "precision": "bf16-mixed",
               "train_images": 1000, "val_images": 1000}
    result = script.finetune_result(summary, wall_s=23.96)
    assert (result["accuracy"], result["wall_s"], result["in_process_s"]) == (0.865, 24.0, 21.0)
    script.write_json(tmp_path / "bench" / "out.json", result)
    assert json.loads((tmp_path / "bench" / "out.json").read_text()) == result


def test_state_checksum_tells_weights_apart(script: ModuleType) -> None:
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert script.state_checksum(a) == script.state_checksum(a)
    assert script.state_checksum(a) != script.state_checksum(b)


def test_schedule_puts_finetune_rounds_around_every_fastai_run(script: ModuleType) -> None:
    variants = ["default", "no_export"]
    ft = [("finetune", "default"), ("finetune", "no_export")]
    assert script.schedule(3, variants, [True, False]) == [*ft, ("fastai", True), *ft, ("fastai", False), *ft]
    assert script.schedule(3, variants, [True]) == [*ft, ("fastai", True), *ft, *ft]
    assert script.schedule(1, ["default"], [True]) == [("finetune", "default"), ("fastai", True)]


def test_the_median_finetune_run_counts(script: ModuleType) -> None:
    runs = [{"accuracy": 0.865, "wall_s": s, "timings": {}} for s in (40.0, 30.0, 31.0)]
    result = script.summarise_finetune(runs)
    assert (result["wall_s"], result["best_wall_s"], result["wall_s_runs"]) == (31.0, 30.0, [40.0, 30.0, 31.0])
