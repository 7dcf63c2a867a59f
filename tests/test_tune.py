"""`finetune tune` (finetune/tune.py): what it searches, what it writes, pruning, the budget, and a study that
goes on after its process was killed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import optuna
import pytest
import safetensors.torch
import torch

from finetune import recipes
from finetune.cli import main
from finetune.phases import probe as probe_phase
from finetune.train import fit
from finetune.tune import _Pruning, plot_search, search_space, tune

TINY = {"model": "test_efficientnet", "pretrained": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from imagefolders import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=12, split=True)


@pytest.mark.parametrize("name", recipes.names())
@pytest.mark.parametrize("cached", [True, False])
def test_every_searched_field_acts_on_the_recipe_s_training_path(name, cached):
    recipe = recipes.get(name).override({"cached_features": cached})
    space = search_space(recipe, ["tf_efficientnet_lite0", "mobilenetv2_100"])
    for param in space:  # head_stages acts once head is multistage: the condition it is searched under
        assert param.name in recipe.override(dict(param.when)).active_fields(), param.name
    names = {p.name for p in space}
    if recipe.trains_epochs:
        assert {"lr", "weight_decay", "label_smoothing", "scale_min"} <= names
    else:
        assert {"probe_weight_decay", "flip_views", "feature_views", "head", "model"} <= names


def test_a_probe_study_writes_a_best_recipe_that_fit_reproduces(folder, tmp_path, caplog):
    held_out = tmp_path / "data"  # the module's folder, with a test split the search must not read
    shutil.copytree(folder, held_out)
    for image in sorted((held_out / "train").glob("*/*"))[::4]:
        (held_out / "test" / image.parent.name).mkdir(parents=True, exist_ok=True)
        image.rename(held_out / "test" / image.parent.name / image.name)
    folder = held_out
    caplog.set_level(logging.INFO, logger="finetune")
    study = tmp_path / "study"
    keys, computed = [], []
    real_key, real_compute = probe_phase._pass_key, probe_phase._compute
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe_phase, "_pass_key", lambda *a: keys.append(real_key(*a)) or keys[-1])
        mp.setattr(probe_phase, "_compute", lambda *a, **k: computed.append(a[2]) or real_compute(*a, **k))
        result = tune(folder, trials=4, recipe="small-different", overrides=TINY | {"head": "linear"}, out=study,
                      seed=3, num_workers=0)
    # each pass (train, mirror, augmented views, val) is computed once, whatever number of trials use it
    assert len(computed) == len(set(keys)) < len(keys)
    summary = json.loads((study / "tune.json").read_text())
    trials = summary["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 4 and summary["stopped"] == "4 trial(s) finished"
    losses = {round(json.loads((study / "trials" / f"{t['number']:03d}" / "summary.json").read_text())["val"]["loss"],
                    6) for t in trials}
    assert len(losses) == 4  # every trial changed something that acts
    best = recipes.load(result.best_recipe)
    for key, value in result.best_params.items():
        assert getattr(best, key) == value
    again = fit(folder, result.best_recipe, out=tmp_path / "refit", seed=3, progress=False, export=None,
                num_workers=0)
    kept = json.loads((study / "trials" / f"{result.best_trial:03d}" / "summary.json").read_text())["val"]
    assert again.val["acc"] == result.best_value == kept["acc"]
    # no trial read the test split (and none said that its images were left out); the refit scores it
    assert all(json.loads((study / "trials" / f"{t['number']:03d}" / "summary.json").read_text())["test"] == {}
               for t in trials)
    assert json.loads((study / "split.json").read_text())["test"] == [] and again.test["acc"] > 0
    assert "not in split file" not in caplog.text and "left out of the search" in caplog.text
    assert again.val["loss"] == pytest.approx(kept["loss"], rel=1e-4)
    header = result.best_recipe.read_text().splitlines()[:2]
    assert f"trial {result.best_trial}" in header[0] and "finetune fit" in header[1]
    assert (study / "trials.csv").read_text().count("\n") == 5


@pytest.mark.parametrize("recipe, first, then", [
    ("small-similar", {"feature_views": 1}, {"feature_views": 1}),  # the same passes again, augmented view included
    ("small-different", {"head_stages": 3}, {"head_stages": 1}),  # another layout: a slice of the same wide pass
    ("small-different", {"head_stages": 2}, {"head": "linear"}),
])
def test_remembered_features_are_the_ones_a_fit_computes(folder, tmp_path, recipe, first, then):
    def run(out, overrides):
        return fit(folder, recipe, overrides=TINY | overrides, out=tmp_path / out, progress=False, export=None,
                   num_workers=0)

    plain = run("plain", then)
    computed = []
    real = probe_phase._compute
    with pytest.MonkeyPatch.context() as mp, probe_phase.remembered_features():
        mp.setattr(probe_phase, "_compute", lambda *a, **k: computed.append(a[2]) or real(*a, **k))
        run("first", first)
        passes = len(computed)
        again = run("again", then)
    assert len(computed) == passes  # nothing computed for the second fit
    # one pass through the wide graph against one through the layout's own: the same up to float rounding
    features = [safetensors.torch.load_file(tmp_path / out / "probe.safetensors")["val_features"]
                for out in ("plain", "again")]
    assert features[0].shape == features[1].shape
    assert torch.allclose(features[0], features[1], rtol=1e-4, atol=1e-5)
    assert again.val["acc"] == plain.val["acc"]


def test_remembered_features_written_to_a_folder_serve_a_later_process(folder, tmp_path):
    def run(out):
        return fit(folder, "small-similar", overrides=TINY | {"feature_views": 1}, out=tmp_path / out,
                   progress=False, export=None, num_workers=0)

    stored = tmp_path / "features"
    computed = []
    real = probe_phase._compute
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe_phase, "_compute", lambda *a, **k: computed.append(a[2]) or real(*a, **k))
        with probe_phase.remembered_features(stored):
            first = run("first")
        passes = len(computed)
        files = sorted(stored.glob("*.safetensors"))
        assert passes and len(files) == passes  # train, its mirror, one augmented view, val
        with probe_phase.remembered_features(stored):  # nothing in memory: as a new process
            again = run("again")
        assert len(computed) == passes
        files[0].write_bytes(b"torn")  # a file that cannot be read is computed again and replaced
        with probe_phase.remembered_features(stored):
            third = run("third")
        assert len(computed) == passes + 1 and probe_phase._read_pass(files[0]) is not None
    assert first.val == again.val == third.val


def test_the_median_rule_stops_a_trial_below_the_others():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for value in (0.8, 0.9):
        trial = study.ask()
        trial.report(value, 0)
        study.tell(trial, value)
    trainer = SimpleNamespace(callback_metrics={"val/acc": torch.tensor(0.2)}, sanity_checking=False, current_epoch=0,
                              should_stop=False)
    pruning = _Pruning(study.ask())
    pruning.on_validation_end(trainer, None)
    assert trainer.should_stop and "below the median" in pruning.pruned
    trainer = SimpleNamespace(callback_metrics={"val/acc": torch.tensor(0.95)}, sanity_checking=False,
                              current_epoch=0, should_stop=False)
    pruning = _Pruning(study.ask())
    pruning.on_validation_end(trainer, None)
    assert not trainer.should_stop and not pruning.pruned


def test_diverging_trials_are_pruned_and_a_study_without_a_finished_trial_says_so(folder, tmp_path):
    overrides = TINY | {"lr": 1.0, "cached_features": False, "warmup_epochs": 0, "freeze_epochs": 0, "batch_size": 4}
    with pytest.raises(Exception, match="no trial of the study"):
        tune(folder, trials=2, recipe="large-different", overrides=overrides, out=tmp_path / "s", num_workers=0,
             epochs_per_trial=2)
    storage = f"sqlite:///{tmp_path / 's' / 'study.db'}"
    trials = optuna.load_study(study_name="finetune", storage=storage).trials
    assert trials and all(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    assert all(t.user_attrs["why"].startswith("diverged") for t in trials)


def test_the_budget_stops_the_search_before_a_trial_would_overrun_it(folder, tmp_path):
    result = tune(folder, trials=50, recipe="small-similar", overrides=TINY, out=tmp_path / "s", num_workers=0,
                  budget_minutes=0.001)
    assert len(result.trials) == 1 and result.stopped.startswith("budget")


def test_the_plot_has_a_panel_per_field_with_its_trials(tmp_path):
    rows = [{"number": i, "state": "complete" if i < 3 else "pruned", "value": 0.5 + i / 10 if i < 3 else None,
             "last_reported": 0.3 if i == 3 else None,
             "params": {"lr": 10 ** -(i + 2), "unfreeze_stages": [1, -1, 2, 1][i]}} for i in range(4)]
    fig = plot_search(rows, tmp_path / "tune.png", log_scaled=["lr"], title="t")
    assert (tmp_path / "tune.png").stat().st_size > 5000
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_xlabel() for ax in axes] == ["lr", "unfreeze_stages"]
    for ax in axes:
        assert ax.get_ylabel() == "validation accuracy"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["complete (3)", "pruned (1)"]
        assert sum(len(c.get_offsets()) for c in ax.collections) == 4
    assert axes[0].get_xscale() == "log"
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["-1", "1", "2"]


@pytest.mark.parametrize("argv, message", [
    (["--trials", "0"], "--trials 0"),
    (["--budget-minutes", "-1"], "--budget-minutes -1"),
    (["--set", "nope=1"], "nope"),
    (["--models", ","], "--models"),
])
def test_bad_arguments_are_one_line_and_status_2(folder, argv, message, capsys):
    assert main(["tune", str(folder), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_killed_study_goes_on_and_runs_the_killed_trial_again(folder, tmp_path):
    study = tmp_path / "study"
    command = [sys.executable, "-m", "finetune", "tune", str(folder), "--recipe", "small-similar", "--trials", "3",
               "--set", "model=test_efficientnet", "--set", "pretrained=false", "--workers", "0", "--out", str(study)]
    env = {**os.environ, "COLUMNS": "200"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:  # kill it inside trial 1
        if (study / "trials" / "001").is_dir():
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-2000:]
    with sqlite3.connect(study / "study.db") as db:
        assert db.execute("select state from trials where number = 1").fetchall() == [("RUNNING",)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "again: trial 1 was killed" in done.stdout
    trials = json.loads((study / "tune.json").read_text())["trials"]
    states = {t["number"]: t["state"] for t in trials}
    assert states[1] == "fail" and sum(s == "complete" for s in states.values()) == 3
    retry = next(t for t in trials if t["retry_of"] == 1)
    assert retry["state"] == "complete" and retry["params"] == trials[1]["params"]
