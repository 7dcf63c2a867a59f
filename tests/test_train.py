"""End to end: `fit` on tiny generated folders with tiny timm models, for every registered recipe."""

import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from finetune import recipes
from finetune.cli import main
from finetune.model.classifier import Classifier
from finetune.runs import load_model
from finetune.train import fit

FAST = {"epochs": 2, "batch_size": 8, "freeze_epochs": 1, "head_stages": 2}


def _fit(folder, name, tmp_path, overrides_extra=None, **kwargs):
    overrides = dict(FAST) if recipes.get(name).trains_backbone else {"epochs": 2, "batch_size": 8, "head_stages": 2}
    overrides |= overrides_extra or {}
    return fit(folder, name, model="test_efficientnet", pretrained=False, overrides=overrides,
               out=tmp_path / "run", progress=False, num_workers=0, export=None, **kwargs)


@pytest.mark.parametrize("name", recipes.names())
def test_fit_writes_a_self_describing_run_folder(name, tiny_folder, tmp_path):
    result = _fit(tiny_folder, name, tmp_path)
    run = result.run_dir
    for f in ("recipe.toml", "classes.json", "split.json", "metrics.csv", "summary.json", "report.md",
              "model.safetensors", "config.json", "probe.png", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / f).is_file(), f
    assert (run / "curves.png").is_file() == result.recipe.trains_backbone  # the epochs' plot beside the probe's
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == name
    if result.recipe.trains_backbone:  # LP-FT: the probe replaces the head warm-up epoch, then Lightning epochs
        assert summary["training"].startswith("LP-FT") and summary["epochs_run"] == 1
    else:  # the frozen backbone ran once; the head was fitted on cached features
        assert summary["training"].startswith("probe") and summary["epochs_run"] == 0
    assert summary["probe"]["weight_decay"] in [row["weight_decay"] for row in summary["probe"]["sweep"]]
    assert (run / "probe.csv").is_file()
    assert summary["probe"]["views"] == ["images"] + ["mirror images"] * result.recipe.flip_views
    assert set(result.metrics) >= {"acc", "balanced_acc", "macro_f1", "loss"}
    assert result.test == {} and result.headline_split == "val" and summary["val"] == result.metrics == result.val
    assert "validation" in summary["selection"]
    assert summary["skipped_files"] == 0 and summary["train_images"] + summary["val_images"] == 24
    loaded = recipes.load(run / "recipe.toml")
    assert all(getattr(loaded, k) == getattr(result.recipe, k) for k in result.recipe.active_fields())

    # the export holds the best checkpoint's weights and gives the same logits
    classifier, config = load_model(run)
    assert config["label_names"] == ["blue", "green", "red"] and config["architecture"] == "test_efficientnet"
    reference = Classifier(timm.create_model("test_efficientnet", num_classes=3), 3, head=result.recipe.head,
                           head_stages=2)
    state = torch.load(run / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    reference.load_state_dict({k.removeprefix("classifier."): v for k, v in state.items()
                               if k.startswith("classifier.")})
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected = reference.eval()(x)
        if result.recipe.test_flip:  # the mean with the mirror image's logits
            expected = (expected + reference(x.flip(-1))) / 2
        assert config["finetune"]["test_flip"] == result.recipe.test_flip
        assert torch.allclose(classifier(x), expected, atol=1e-5)
        if result.recipe.head == "linear":  # plain timm, no finetune code, averaging as config.json says
            plain = timm.create_model(config["architecture"], num_classes=config["num_classes"])
            plain.load_state_dict(safetensors.torch.load_file(run / "model.safetensors"))
            logits = plain.eval()(x)
            if config["finetune"]["test_flip"]:
                logits = (logits + plain(x.flip(-1))) / 2
            assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["small-similar", "large-similar"])
def test_without_cached_features_every_epoch_runs_through_the_backbone(name, tiny_folder, tmp_path):
    result = fit(
        tiny_folder, name, model="test_efficientnet", pretrained=False, progress=False, out=tmp_path / "run",
        num_workers=0, export=None,
        overrides={"epochs": 2, "batch_size": 8, "freeze_epochs": 1, "cached_features": False})
    assert result.summary["epochs_run"] == 2 and result.summary["probe"] is None
    assert result.summary["training"] == "2 epoch(s) with Lightning"


def test_learns_the_tiny_task(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=12, split=True)
    result = fit(folder, "small-similar", model="test_efficientnet", pretrained=False, progress=False,
                 out=tmp_path / "run", num_workers=0, export=None, overrides={"epochs": 4, "lr": 0.05, "batch_size": 8})
    assert result.summary["split_source"] == "folders"
    assert result.accuracy == 1.0  # colour is trivially separable even on random features


def test_auto_recipe_explains_itself(tiny_folder, tmp_path):
    result = fit(tiny_folder, "auto", model="test_efficientnet", pretrained=False, epochs=1, progress=False,
                 out=tmp_path / "run", num_workers=0, export=None)
    assert result.recipe.name == "small-similar"
    assert "images per class" in result.summary["recipe_reason"]
    result = fit(tiny_folder, "auto", domain="different", model="test_efficientnet", pretrained=False, epochs=1,
                 progress=False, out=tmp_path / "run2", num_workers=0, export=None, overrides={"head_stages": 2})
    assert result.recipe.name == "small-different"


def test_rerun_with_split_file_reuses_the_split(tiny_folder, tmp_path):
    first = _fit(tiny_folder, "small-similar", tmp_path, seed=1)
    second = fit(tiny_folder, "small-similar", model="test_efficientnet", pretrained=False, epochs=1,
                 progress=False, out=tmp_path / "again", num_workers=0, export=None, seed=7,
                 split_file=first.run_dir / "split.json")
    a, b = (json.loads((r.run_dir / "split.json").read_text()) for r in (first, second))
    assert (a["train"], a["val"]) == (b["train"], b["val"]) and b["split_source"] == "file"
    assert a["split_source"] == "generated" and a["train"]


def test_cli_fit_and_errors(tiny_folder, tmp_path, capsys):
    code = main(["fit", str(tiny_folder), "--recipe", "small-similar", "--model", "test_efficientnet",
                 "--no-pretrained", "--epochs", "1", "--set", "batch_size=8", "--out", str(tmp_path / "cli"),
                 "--no-progress", "--workers", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation accuracy (also used for selection; no test split):" in printed
    assert f"report: {tmp_path / 'cli' / 'report.html'}" in printed.replace("\n", "")
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["export"]["onnx"]["passed"]  # fit exports and parity-checks by default
    assert (tmp_path / "cli" / "export" / "model.onnx").is_file()
    assert main(["fit", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["fit", str(tiny_folder), "--set", "lr=fast", "--out", str(tmp_path / "x")]) == 2
    assert "lr" in capsys.readouterr().err
    assert main(["fit", str(tiny_folder), "--out", str(tmp_path / "cli")]) == 2  # not empty: nothing lost
    assert "already exists" in capsys.readouterr().err


def test_console_script_flushes_everything_and_keeps_the_exit_code(tiny_folder, tmp_path):
    """`finetune` (cli.run) skips the interpreter's teardown: output through a pipe, the run folder, atexit
    handlers and the exit status must all survive that."""
    script = ("import atexit, pathlib, sys\n"
              "marker = pathlib.Path(sys.argv.pop())\n"
              "atexit.register(lambda: marker.write_text('ran'))\n"
              "from finetune.cli import run\n"
              "run()\n")
    out = tmp_path / "run"
    fit = ["fit", str(tiny_folder), "--recipe", "small-similar", "--model", "test_efficientnet", "--no-pretrained",
           "--out", str(out), "--no-progress", "--workers", "0"]
    done = subprocess.run([sys.executable, "-c", script, *fit, str(tmp_path / "atexit")], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().splitlines()[-1].startswith("validation accuracy (")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert json.loads((out / "summary.json").read_text())["export"]["onnx"]["passed"]
    assert (out / "report.md").is_file() and (out / "export" / "manifest.json").is_file()
    failed = subprocess.run([sys.executable, "-c", script, "fit", str(tmp_path / "nowhere"), str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode == 2 and "nowhere" in failed.stderr


def test_cli_recipes_and_models(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in recipes.names())
    assert main(["recipes", "large-different"]) == 0
    assert "layer_decay" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "tf_efficientnet_lite0" in capsys.readouterr().out


def test_unreadable_files_are_skipped_named_and_counted(tiny_folder, tmp_path):
    (tiny_folder / "red" / "empty.jpg").write_bytes(b"")
    (tiny_folder / "green" / "notes.png").write_text("not an image")
    good = (tiny_folder / "blue" / "0.png").read_bytes()
    (tiny_folder / "blue" / "truncated.png").write_bytes(good[: len(good) // 2])
    result = fit(tiny_folder, "small-similar", model="test_efficientnet", pretrained=False, epochs=2,
                 progress=False, out=tmp_path / "run", num_workers=0, export=None,
                 overrides={"batch_size": 1}, max_unusable_fraction=0.5)  # 3 of 27 is above the default 10%
    summary = result.summary
    bad = {"empty.jpg", "notes.png", "truncated.png"}
    assert summary["skipped_files"] == 3
    assert {p.rsplit("/", 1)[-1] for p in summary["skipped"]} == bad
    assert set(summary["preflight"]["excluded"]) == set(summary["skipped"])  # found before any compute


def test_lp_ft_keeps_the_probed_model_when_no_fine_tuned_epoch_beats_it(tiny_folder, tmp_path):
    # a learning rate that wrecks the network in its first steps: the probed head must win and be kept
    result = _fit(tiny_folder, "large-similar", tmp_path, overrides_extra={"lr": 1.0, "backbone_lr_scale": 1.0,
                                                                                "divergence_factor": 0})
    summary = result.summary
    assert summary["probe"] is not None and "was kept" in summary["training"]
    probe_acc = max(row["val_acc"] for row in summary["probe"]["sweep"])
    assert result.accuracy == pytest.approx(probe_acc) and summary["best_epoch"] is None
    best = torch.load(result.run_dir / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    assert best["finetune"]["phase"] == "probe"
    classifier, _ = load_model(result.run_dir)  # the export holds the probed model too
    state = {k.removeprefix("classifier."): v for k, v in best["state_dict"].items() if k.startswith("classifier.")}
    assert all(torch.equal(v, state[k]) for k, v in classifier.state_dict().items())


def test_a_test_split_is_the_headline_and_validation_only_selects(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=8, split=True)
    image_folder(folder / "test", per_class=4, seed=5)
    result = _fit(folder, "small-similar", tmp_path)
    summary = result.summary
    assert result.headline_split == "test" and summary["headline"]["split"] == "test"
    assert result.accuracy == result.test["acc"] == summary["test"]["acc"] and result.metrics is result.test
    assert result.val == summary["val"] and summary["test_images"] == 12
    report = (result.run_dir / "report.md").read_text()
    assert "test (held out)" in report and "validation (used for selection)" in report


def _overlapping_colours(root, counts, seed):
    """Two classes whose colours overlap (each image's colour is its class colour plus a random shift), so
    that the majority class wins every doubtful image unless the classes weigh the same in the loss."""
    rng = np.random.default_rng(seed)
    for name, base in (("warm", (150, 110, 90)), ("cool", (110, 120, 150))):
        (root / name).mkdir(parents=True)
        for i in range(counts[name]):
            colour = np.array(base) + rng.normal(0, 45, 3)
            pixels = np.clip(colour + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_imbalanced_probe_weighs_classes_and_selects_on_balanced_accuracy(tmp_path):
    data = tmp_path / "data"
    _overlapping_colours(data / "train", {"warm": 80, "cool": 8}, seed=0)  # 10:1
    _overlapping_colours(data / "val", {"warm": 30, "cool": 30}, seed=1)
    scores = {}
    for balance in ("auto", "none"):
        result = fit(data, "small-similar", model="test_efficientnet", pretrained=False, progress=False,
                     out=tmp_path / balance, num_workers=0, export=None, overrides={"balance": balance})
        scores[balance] = result.val["balanced_acc"]
        summary = result.summary
        weighted = balance == "auto"
        assert summary["probe"]["class_weighted_loss"] == weighted
        assert summary["probe"]["selected_on"] == ("val_balanced_acc" if weighted else "val_acc")
        assert summary["balance"]["applied"]["probe"].startswith("class-weighted" if weighted else "unweighted")
    assert scores["auto"] > scores["none"] + 0.05, scores
