"""lr-find (phases/lr_find.py): Lightning's range test on the module as the epochs would start it, the valley rule,
the plot and files, `finetune lr-find`, and `fit --set lr=auto` training at the rate it found."""

import json
import math

import pytest
import pytorch_lightning as pl
import timm
import torch

from finetune import recipes
from finetune.cli import main
from finetune.data import ImageFolderDataModule, scan_image_folder
from finetune.device import resolve_device
from finetune.errors import UsageError
from finetune.model.classifier import Classifier, param_groups
from finetune.model.module import TransferModule
from finetune.phases import lr_find
from finetune.runtime import choose_precision
from finetune.train import _resumed, fit

TINY = {"model": "test_efficientnet", "pretrained": False, "resolution": 32, "batch_size": 8}
# every stage trains, with layer decay and a moving average; SGD, whose high rates blow the loss up clearly
RECIPE = recipes.get("large-different").override(TINY | {"optimizer": "sgd"})
CPU = resolve_device("cpu")
FP32 = choose_precision("fp32", CPU)
TINY_SET = [item for key, value in TINY.items() for item in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from imagefolders import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("lr_find") / "data", per_class=16, split=True)


def _module(folder, recipe=RECIPE, probed=True) -> tuple[TransferModule, ImageFolderDataModule]:
    torch.manual_seed(0)
    splits = scan_image_folder(folder, seed=0)
    classifier = Classifier(timm.create_model("test_efficientnet", num_classes=3), 3)
    config = timm.data.resolve_model_data_config(classifier.backbone) | {"input_size": (3, 32, 32)}
    datamodule = ImageFolderDataModule(splits, config, batch_size=recipe.batch_size, num_workers=0)
    return TransferModule(classifier, recipe, probed=probed), datamodule


@pytest.fixture(scope="module")
def swept(folder):
    """One sweep, with every optimiser step's group rates, and the module's state before it."""
    module, datamodule = _module(folder)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags = [p.requires_grad for p in module.classifier.parameters()]
    rates, step = [], pl.LightningModule.optimizer_step

    def spy(self, epoch, batch_idx, optimizer, closure=None):
        rates.append([g["lr"] for g in optimizer.param_groups])
        return step(self, epoch, batch_idx, optimizer, closure)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pl.LightningModule, "optimizer_step", spy)
        finding = lr_find.find_lr(module, datamodule, RECIPE, device=CPU, precision=FP32, steps=30, progress=False)
    return finding, module, before, flags, rates


def test_the_sweep_has_a_curve_and_a_suggestion_within_its_range(swept):
    finding = swept[0]
    assert 15 <= len(finding.lrs) == len(finding.losses) <= 30
    assert finding.lrs[0] == lr_find.MIN_LR and finding.lrs == sorted(finding.lrs)
    assert all(math.isfinite(v) for v in finding.smoothed)
    assert lr_find.MIN_LR <= finding.suggested <= lr_find.MAX_LR and finding.lr == float(f"{finding.suggested:.2g}")
    assert finding.suggested == finding.lrs[finding.index] and finding.failure == ""
    assert finding.trained == "the head and every stage of the backbone"  # after a probe: all of LP-FT's stages


def test_too_high_rates_show_as_a_rising_loss(swept):
    finding = swept[0]
    lowest = min(finding.smoothed)
    assert finding.smoothed.index(lowest) < len(finding.smoothed) - 1 and finding.smoothed[-1] > 1.5 * lowest
    assert finding.suggested < finding.lrs[finding.smoothed.index(lowest)]  # the suggestion is before the blow-up


def test_the_sweep_leaves_the_weights_buffers_and_trainable_flags_as_they_were(swept):
    _, module, before, flags, _ = swept
    after = module.state_dict()
    assert after.keys() == before.keys() and any(k.startswith("ema.") for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in module.classifier.parameters()] == flags
    assert module.sweep is None


def test_every_group_steps_at_its_share_of_the_swept_rate(swept):
    finding, module, _, _, rates = swept
    ratios = module.lr_ratios()
    stages = [g.name for g in module.group_specs]
    assert ratios[stages.index("head")] == 1.0
    top = max(int(n.removeprefix("stage").split(".")[0]) for n in stages if n.startswith("stage"))
    assert ratios[stages.index(f"stage{top}")] == pytest.approx(RECIPE.backbone_lr_scale)
    assert ratios[stages.index(f"stage{top - 1}")] == pytest.approx(RECIPE.backbone_lr_scale * RECIPE.layer_decay)
    assert len(rates) == len(finding.lrs)
    for swept_lr, groups in zip(finding.lrs, rates, strict=True):
        assert groups == pytest.approx([swept_lr * r for r in ratios])


def test_before_a_head_warm_up_only_the_head_is_swept(folder):
    recipe = RECIPE.override({"cached_features": False})  # no probe: the first epoch trains the head alone
    module, _ = _module(folder, recipe, probed=False)
    module.group_specs = param_groups(module.classifier, lr=recipe.lr, backbone_lr_scale=recipe.backbone_lr_scale,
                                      layer_decay=recipe.layer_decay, weight_decay=recipe.weight_decay,
                                      unfreeze_stages=recipe.unfreeze_stages, freeze_epochs=module.start_epoch)
    ratios = [(g.name, r) for g, r in zip(module.group_specs, module.lr_ratios(), strict=True)]
    assert {r for name, r in ratios if name.startswith("head")} == {1.0}
    assert {r for name, r in ratios if name.startswith("stage")} == {0.0}


def _curve(losses):
    lrs = [1e-6 * 10 ** (6 * i / (len(losses) - 1)) for i in range(len(losses))]
    return lrs, losses


def test_the_valley_rule_picks_the_falling_part_of_the_curve():
    lrs, losses = _curve([2.0 - 0.04 * i for i in range(40)] + [0.4 + 0.3 * i for i in range(20)])  # falls, blows up
    _, index, failure = lr_find.suggest(lrs, losses)
    assert failure == "" and 10 <= index < 40
    noise = [0.05 * math.sin(7 * i) for i in range(60)]  # after a probe: flat, then blowing up
    _, index, _ = lr_find.suggest(*_curve([1.2 + n for n in noise[:45]] + [1.2 + 0.4 * i for i in range(15)]))
    assert index < 45


@pytest.mark.parametrize("losses, cause", [
    ([1.0 + 0.05 * i for i in range(60)], "never kept falling"),
    ([2.0, 1.9, 1.8, 1.7, 1.6, math.nan] + [1.0] * 54, "turned NaN"),
])
def test_a_curve_without_a_valley_fails_with_its_cause(losses, cause):
    lrs, losses = _curve(losses)
    smoothed, index, failure = lr_find.suggest(lrs, losses)
    assert index is None and cause in failure
    finding = lr_find.LrFinding("r", lrs, losses, smoothed, None, None, None, failure, "the head", 1e-6, 1.0, 60, 1.0)
    with pytest.raises(lr_find.LrFindFailed, match=cause) as raised:
        finding.checked()
    assert raised.value.exit_status == 1


def test_the_plot_and_the_files(tmp_path):
    lrs, losses = _curve([2.0 - 0.04 * i for i in range(40)] + [0.4 + 0.3 * i for i in range(20)])
    smoothed, index, failure = lr_find.suggest(lrs, losses)
    finding = lr_find.LrFinding("large-different", lrs, losses, smoothed, index, lrs[index],
                                float(f"{lrs[index]:.2g}"), failure, "the head", 1e-6, 1.0, 100, 12.0)
    fig = lr_find.write_lr_find(finding, tmp_path, "lr-find: large-different on data")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "learning rate" in ax.get_xlabel() and "loss" in ax.get_ylabel()
    assert ax.get_title().startswith("lr-find")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["loss of each step"].get_ydata()) == losses
    marked = [line for label, line in lines.items() if label.startswith("suggested lr")]
    assert len(marked) == 1 and list(marked[0].get_xdata()) == [lrs[index]]
    assert f"{finding.lr:.2g}" in marked[0].get_label() and "valley" in marked[0].get_label()
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    rows = (tmp_path / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,loss,smoothed_loss" and len(rows) == 61
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["lr"] == finding.lr and saved["rule"] == "valley" and saved["stopped_early"]
    assert saved["curve"]["lr"] == lrs and len(saved["curve"]["smoothed_loss"]) == 60


def test_the_command_writes_its_files_and_prints_the_fit_command(folder, tmp_path, capsys):
    out = tmp_path / "lrf"
    code = main(["lr-find", str(folder), "--recipe", "large-different", *TINY_SET, "--out", str(out),
                 "--num-steps", "20", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"lr_find.png", "lr_find.csv", "lr_find.json"}
    assert printed["recipe"] == "large-different" and 0 < printed["lr"] <= 1
    assert printed["command"].endswith(f"--set lr={printed['lr']:.2g}") and "--recipe large-different" in \
        printed["command"]


@pytest.mark.parametrize("command, message", [
    (["lr-find", "{folder}", "--recipe", "small-similar"], "--set cached_features=false"),
    (["lr-find", "{folder}", "--recipe", "large-similar", "--num-steps", "5"], "at least 20 steps"),
    (["fit", "{folder}", "--recipe", "small-different", "--set", "lr=auto"], "no learning rate to find"),
    (["fit", "{folder}", "--recipe", "large-similar", "--set", "lr=auto", "--devices", "2"], "one process"),
])
def test_usage_errors_exit_2(command, message, folder, capsys):
    assert main([part.format(folder=folder) for part in command]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_auto_is_a_value_of_lr_only(folder):
    from finetune.arguments import auto_lr

    assert auto_lr({"lr": " Auto ", "epochs": "3"}) == (True, {"epochs": "3"})
    assert auto_lr({"lr": "1e-3"}) == (False, {"lr": "1e-3"})
    with pytest.raises(UsageError, match="no learning rate"):
        fit(folder, recipes.get("small-similar"), overrides={"lr": "auto"})


def test_fit_with_lr_auto_trains_at_the_rate_lr_find_suggests(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(lr_find, "STEPS", 20)
    run = tmp_path / "run"
    result = fit(folder, "large-different", model="test_efficientnet", pretrained=False, out=run, progress=False,
                 overrides={"lr": "auto", "epochs": 2, "freeze_epochs": 1, "batch_size": 4, "resolution": 32},
                 num_workers=0, export=None, limit_batches=2)
    summary = json.loads((run / "summary.json").read_text())
    found = summary["lr_find"]["lr"]
    assert summary["lr_find"]["plot"] == "lr_find.png" and (run / "lr_find.png").is_file()
    assert summary["lr_find"]["rule"] == "valley" and summary["lr_find"]["suggested"] == pytest.approx(found, rel=0.05)
    assert result.recipe.lr == found == recipes.load(run / "recipe.toml").lr  # a resume reads this number
    assert "suggested by lr-find" in (run / "recipe.toml").read_text().splitlines()[0]
    report = (run / "report.md").read_text()  # the report shows the sweep that chose the rate
    assert f"trained at {found:.2g}" in report and "(lr_find.png)" in report
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["recipe"]["lr"] == found
    assert checkpoint["lr_schedulers"][0]["base_lrs"][0] == found  # the head's group trained at it
    (run / "summary.json").unlink()  # as if interrupted: a resume keeps the rate, it does not sweep again
    assert "lr" not in _resumed(run, progress=False).overrides
