"""The divergence guard, the gradient norm and the update-to-weight ratios (model/guard.py)."""

import math
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from finetune.model.guard import WINDOW, Diverged, DivergenceGuard
from finetune.runs import read_epoch_metrics


def feed(guard, losses, module=None):
    module = module or torch.nn.Linear(2, 2)
    for step, loss in enumerate(losses):
        guard.on_train_batch_end(SimpleNamespace(global_step=step), module, {"loss": torch.tensor(loss)}, None, step)


def test_it_fires_when_the_smoothed_loss_passes_three_times_the_first_steps():
    with pytest.raises(Diverged, match="over 3 x 2.3"):
        feed(DivergenceGuard(num_classes=10), [2.3] * WINDOW + [2.3 * 4] * 10)
    with pytest.raises(Diverged, match="at step [1-4]:"):  # exploding within the first steps
        feed(DivergenceGuard(num_classes=10), [2.3, 20.0, 80.0, 300.0])
    feed(DivergenceGuard(num_classes=10), [2.3] * WINDOW + [2.3 * 2.5] * 50)  # high, but not 3x: goes on


def test_it_fires_at_once_on_nan_and_never_below_ln_c():
    with pytest.raises(Diverged, match="is nan"):
        feed(DivergenceGuard(num_classes=10), [2.3, float("nan")])
    # the first steps' loss is tiny (a probed head), but 3x ln(10) is the lowest it ever fires at
    feed(DivergenceGuard(num_classes=10), [0.05] * WINDOW + [3 * math.log(10) * 0.95] * 50)
    with pytest.raises(Diverged):
        feed(DivergenceGuard(num_classes=10), [0.05] * WINDOW + [3 * math.log(10) * 1.2] * 50)
    feed(DivergenceGuard(num_classes=10, factor=0), [2.3, float("nan"), 1e9])  # 0: off


def test_a_new_phase_takes_a_new_reference():
    guard, module = DivergenceGuard(num_classes=2), torch.nn.Linear(2, 2)
    feed(guard, [5.0] * WINDOW, module)
    module.bias.requires_grad_(False)  # other parameters train: a new phase, whose first steps set the reference
    feed(guard, [1.0] * WINDOW + [2.5] * 20, module)  # under 3 x ln(2) ... and under 3 x 1.0
    with pytest.raises(Diverged):
        feed(guard, [4.0] * 20, module)


def test_fit_stops_with_status_3_and_keeps_the_last_good_checkpoint(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=12, split=True)
    train = sorted((folder / "train").glob("*/*"))
    classes = sorted(p.name for p in (folder / "train").iterdir())
    for i, path in enumerate(train):  # labels unrelated to the colour: nothing to learn, so lr=1.0 blows up
        path.rename(folder / "train" / classes[i % len(classes)] / f"s{i}{path.suffix}")
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "finetune", "fit", str(folder), "--recipe", "large-different",
                           "--model", "test_efficientnet", "--no-pretrained", "--batch-size", "4", "--workers", "0",
                           "--set", "lr=1.0", "--set", "cached_features=false", "--set", "warmup_epochs=0",
                           "--set", "freeze_epochs=0", "--out", str(run), "--no-progress"],
                          capture_output=True, text=True, timeout=600, env={"COLUMNS": "400", **_env()})
    assert done.returncode == 3, done.stderr[-2000:]
    assert "training diverged at step" in done.stderr and "--set lr=" in done.stderr
    assert not [r for r in read_epoch_metrics(run / "metrics.csv") if "val/acc" in r]  # within the first epoch
    assert (run / "checkpoints" / "best.ckpt").is_file() and not (run / "summary.json").exists()
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def _env():
    import os

    return dict(os.environ)


def test_update_ratios_and_the_gradient_norm_are_logged_and_a_far_group_warned_once(caplog):
    import pytorch_lightning as pl
    import timm
    from test_module import loader

    from finetune import recipes
    from finetune.model.classifier import Classifier
    from finetune.model.guard import TrainingSignals
    from finetune.model.module import TransferModule

    recipe = recipes.get("large-different").override({"lr": 1.0, "warmup_epochs": 0, "ema_decay": 0.0})
    torch.manual_seed(0)
    module = TransferModule(Classifier(timm.create_model("test_efficientnet", num_classes=3), 3), recipe,
                            probed=True)
    logged = {}
    module.log = lambda name, value, **kw: logged.setdefault(name, []).append(
        float(value) if isinstance(value, (int, float, torch.Tensor)) else value)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, log_every_n_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[TrainingSignals()])
    with caplog.at_level("WARNING", logger="finetune"):
        trainer.fit(module, loader())
    assert len(logged["train/grad_norm"]) == 4 and all(v > 0 for v in logged["train/grad_norm"])
    ratios = {k: v for k, v in logged.items() if k.startswith("update_ratio/")}
    assert "update_ratio/head" in ratios and all(len(v) == 2 for v in ratios.values())  # steps 2 and 4
    warned = [r.getMessage() for r in caplog.records if "update-to-weight ratios" in r.getMessage()]
    assert len(warned) == 1 and "step 2 " in warned[0]  # the groups far at step 2 in one warning, not again at 4
    named = re.findall(r"(\S+) ([0-9.]+e[+-]\d+)", warned[0].split("too high: ")[1])
    assert named and all(ratios[f"update_ratio/{group}"][0] == pytest.approx(float(value), rel=0.05)
                         and float(value) > 1e-1 for group, value in named)
