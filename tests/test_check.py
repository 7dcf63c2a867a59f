"""`finetune check` passes on a healthy folder and fails, with the right diagnosis, on each broken setup."""

import json

import pytest
import torch

from finetune import check as checks
from finetune import recipes
from finetune.cli import main
from finetune.model.classifier import Classifier

RECIPE = recipes.get("small-different").override({"model": "test_efficientnet", "pretrained": False,
                                                  "head_stages": 2})


@pytest.fixture
def folder(tmp_path, image_folder):
    return image_folder(tmp_path / "data", per_class=16, split=True)


def results(folder, tmp_path, recipe=RECIPE):
    return {r.name: r for r in checks.run_checks(folder, recipe, out=tmp_path / "check")}


def test_a_healthy_folder_passes_every_check(folder, tmp_path):
    got = results(folder, tmp_path)
    assert list(got) == ["first_loss", "overfit", "gradient_flow", "label_signal", "augmentations"]
    assert all(r.passed for r in got.values()), {n: (r.measured, r.diagnosis) for n, r in got.items()}
    assert (tmp_path / "check" / "augmentations.png").stat().st_size > 10_000


def test_the_cli_prints_json_and_exits_0_or_1(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checks, "OVERFIT_STEPS", 1)  # cannot reach near-zero loss in one step: check 2 fails
    code = main(["check", str(folder), "--recipe", "small-different", "--set", "model=test_efficientnet",
                 "--set", "pretrained=false", "--set", "head_stages=2", "--out", str(tmp_path / "c"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and not report["passed"]
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["overfit"]


def test_a_learning_rate_of_1_is_diagnosed(folder, tmp_path):
    recipe = recipes.get("large-different").override({"model": "test_convnext", "pretrained": False,
                                                      "lr": 1.0, "resolution": 64, "optimizer": "sgd"})
    got = results(folder, tmp_path, recipe)
    assert not got["overfit"].passed and "too high" in got["overfit"].diagnosis


def test_everything_frozen_fails_gradient_flow_and_overfitting(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(Classifier, "head_parameter_names", lambda self: [])  # not even the head trains
    got = results(folder, tmp_path)
    assert not got["gradient_flow"].passed and "no parameter is trainable" in got["gradient_flow"].diagnosis
    assert not got["overfit"].passed and "frozen" in got["overfit"].diagnosis


def test_a_head_with_huge_weights_fails_the_first_loss(folder, tmp_path, monkeypatch):
    class HugeHead(Classifier):
        def start_head_near_zero(self, seed=0):
            super().start_head_near_zero(seed)
            with torch.no_grad():
                self.multistage.fc.weight.normal_(std=10.0)

    monkeypatch.setattr(checks, "Classifier", HugeHead)
    got = results(folder, tmp_path)
    assert not got["first_loss"].passed and "too large" in got["first_loss"].diagnosis


def test_shuffled_labels_fail_the_label_signal(folder, tmp_path):
    classes = sorted(p.name for p in (folder / "train").iterdir())
    for split in ("train", "val"):
        for i, path in enumerate(sorted((folder / split).glob("*/*"))):
            path.rename(folder / split / classes[(i * 7) % len(classes)] / f"s{i}{path.suffix}")
    got = results(folder, tmp_path)
    assert not got["label_signal"].passed and "shuffled" in got["label_signal"].diagnosis
