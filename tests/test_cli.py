"""The command line: one parser builder per command, user errors as one line and exit status 2, the fit table,
the recipe listing and the predict writers. (tests/test_cli_fuzz.py throws generated bad values at it.)"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from imagefolders import make_image_folder
from rich.console import Console

from finetune import arguments, cli, recipes
from finetune.cli import build_parser, main
from finetune.cli.fit import headline, print_fit_result, selection
from finetune.errors import RecipeError, UsageError
from finetune.predict_output import WRITERS

COMMANDS = ("fit", "inspect", "recipes", "models", "doctor", "check", "lr-find", "tune", "export", "predict",
            "evaluate", "report", "cache")


def _subparsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_command_has_its_own_parser_and_handler():
    subparsers = _subparsers()
    assert set(subparsers) == set(COMMANDS)
    for name, parser in subparsers.items():
        assert callable(parser.get_default("handler")), name


def test_export_formats_are_named_for_what_they_write():
    fit_help = _subparsers()["fit"].format_help()
    assert "pt2" in fit_help and "torchscript" not in fit_help
    export_help = " ".join(_subparsers()["export"].format_help().split())
    assert "pt2" in export_help and "alias of pt2" in export_help


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("cli") / "data", classes=2, per_class=2, size=8)


@pytest.mark.parametrize(("argv", "fragments"), [
    (["check", "{data}/nowhere"], ["nowhere"]),
    (["fit", "{data}", "--ensemble", "tf_efficientnet_lite0"], ["--ensemble", "two or more"]),
    (["fit", "{data}", "--ensemble", "a,b", "--model", "c"], ["--ensemble", "drop --model"]),
    (["fit", "{data}", "--ensemble", "tf_efficientnet_lite0,mobilenetv2_100", "--recipe", "large-different"],
     ["ensemble combines frozen backbones"]),
    (["check", "{data}", "--set", "lr=-1"], ["lr=-1"]),
    (["fit", "{data}", "--val-fraction", "1.5"], ["--val-fraction 1.5", "between 0 and 1"]),
    (["fit", "{data}", "--val-fraction", "nan"], ["--val-fraction nan", "finite"]),
    (["fit", "{data}", "--seed", "-3"], ["--seed -3", "between 0 and"]),
    (["fit", "{data}", "--workers", "-1"], ["--workers -1", "0 or more"]),
    (["fit", "{data}", "--epochs", "0"], ["--epochs 0", "at least 1"]),
    (["fit", "{data}", "--set", "lr=abc"], ["--set", "lr", "'abc'"]),
    (["fit", "{data}", "--set", "head_stages=0"], ["--set", "head_stages=0", "at least 1"]),
    (["fit", "{data}", "--set", "lr"], ["--set 'lr'", "KEY=VALUE"]),
    (["fit", "{data}", "--weights", "{data}"], ["--weights", "is a folder, not a file"]),
    (["fit", "{data}", "--split", "{data}"], ["--split", "is a folder, not a file"]),
    (["fit", "{data}/red/0.png"], ["DIR", "is a file, not a folder"]),
    (["fit", "{data}", "--export", "pickle"], ["--export pickle", "pt2"]),
    (["fit", "{data}", "--out", "{data}"], ["--out", "not empty"]),
    (["doctor", "{data}", "--max-rows", "-1"], ["--max-rows -1"]),
    (["predict", "{data}", "x.png"], ["MODEL", "config.json"]),
    (["predict", "{data}/red/0.png", "x.png"], ["MODEL", "not an .onnx model"]),
    (["evaluate", "{data}/nowhere", "{data}"], ["MODEL", "does not exist"]),
    (["export", "{data}"], ["RUN", "no trained model"]),
    (["report", "{data}"], ["RUN", "{data}", "no summary.json"]),
    (["recipes", "no-such-recipe"], ["no-such-recipe", "built-in recipes"]),
])
def test_user_errors_are_one_line_and_exit_2(argv, fragments, folder, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "console", Console(stderr=True, width=60))  # narrow: the line must not wrap
    assert main([a.format(data=folder) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(f.format(data=folder) in lines[0] for f in fragments), lines[0]
    assert not (tmp_path / "runs").exists()


def test_fit_arguments_in_python_are_named_as_python_parameters(folder):
    arguments.check_fit_arguments(data_dir=folder, recipe="small-similar", overrides={"lr": "3e-4"}, epochs=2)
    with pytest.raises(UsageError, match=r"val_fraction=1\.5"):
        arguments.check_fit_arguments(data_dir=folder, val_fraction=1.5)
    with pytest.raises(UsageError, match=r"num_workers=-1"):
        arguments.check_fit_arguments(data_dir=folder, num_workers=-1)
    with pytest.raises(UsageError, match=r"epochs=2\.5.*whole number"):
        arguments.check_fit_arguments(data_dir=folder, epochs=2.5)
    with pytest.raises(RecipeError, match="overrides: .*head_stages"):
        arguments.check_fit_arguments(data_dir=folder, overrides={"head_stages": 0})


def test_auto_leaves_a_value_some_recipes_accept_to_the_chosen_recipe(folder):
    # freeze_epochs=9 is beyond small-similar's 8 epochs but fine for large-different's 15
    arguments.check_fit_arguments(data_dir=folder, overrides={"freeze_epochs": 9})
    with pytest.raises(RecipeError, match="freeze_epochs"):
        arguments.check_fit_arguments(data_dir=folder, recipe="small-similar", overrides={"freeze_epochs": 9})


@dataclass
class FakeFitResult:
    """The FitResult the lead is adding: val, test, headline_split and summary["selection"]."""

    val: dict
    test: dict
    summary: dict
    run_dir: Path = Path("runs/x")

    @property
    def headline_split(self) -> str:
        return "test" if self.test else "val"


def _summary(**extra) -> dict:
    return {"recipe": "small-different", "data_dir": "data/x", "recipe_reason": "chosen by the user",
            "timings": {"total_s": 12.0}, "train_images_per_s": 80.0, "skipped_files": 0, "best_epoch": None,
            **extra}


def _printed(result, monkeypatch) -> str:
    monkeypatch.setattr(cli, "out", Console(file=io.StringIO(), width=200))
    print_fit_result(result)
    return cli.out.file.getvalue()


def test_fit_table_has_a_column_per_split_and_a_labelled_headline(monkeypatch):
    result = FakeFitResult(val={"acc": 0.865, "macro_f1": 0.8}, test={"acc": 0.845, "macro_f1": 0.79},
                           summary=_summary(selection="weight decay chosen on validation accuracy"))
    text = _printed(result, monkeypatch)
    assert "small-different on data/x: model selected by weight decay chosen on validation accuracy" in text
    assert "validation" in text and "test" in text and "0.8450" in text and "None" not in text
    assert text.strip().splitlines()[-1] == "test accuracy (held out): 0.8450"

    no_test = FakeFitResult(val={"acc": 0.865}, test={}, summary=_summary(selection="best epoch 7 of 10"))
    text = _printed(no_test, monkeypatch)
    assert text.strip().splitlines()[-1] == "validation accuracy (also used for selection; no test split): 0.8650"


def test_fit_table_reads_todays_fit_result_too(monkeypatch):
    today = SimpleNamespace(metrics={"acc": 0.9}, summary=_summary(test={}, probe={"weight_decay": 1e-4}),
                            run_dir=Path("runs/x"), accuracy=0.9)
    text = _printed(today, monkeypatch)
    assert "best epoch None" not in text and "model selected by validation accuracy" in text
    assert headline(today).startswith("validation accuracy (also used for selection")
    assert selection({"best_epoch": 3, "epochs_run": 5}) == "best epoch 3 of 5 on validation accuracy"


def test_recipes_name_shows_the_recipe_as_toml(capsys):
    assert main(["recipes", "small-similar"]) == 0
    text = capsys.readouterr().out
    first, rest = text.split("\n", 1)
    assert first.startswith("# ") and "training path" in first
    assert rest == recipes.get("small-similar").to_toml()


@dataclass
class _Prediction:
    source: str
    label: str | None = None
    score: float | None = None
    top_k: tuple = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"path": self.source, "label": self.label, "error": self.error}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_prediction_writers_stream_rows_and_return_failures(fmt):
    stream = [_Prediction("a.png", "red", 0.9, (("red", 0.9), ("blue", 0.1))), _Prediction("b.png", error="bad")]
    sink = io.StringIO()
    failed = WRITERS[fmt](sink, 5, ["blue", "red"]).write_all(stream)
    assert [p.source for p in failed] == ["b.png"]
    text = sink.getvalue()
    assert "a.png" in text and "red" in text
    if fmt == "json":
        assert [row["path"] for row in json.loads(text)] == ["a.png", "b.png"]
    if fmt == "csv":
        assert text.splitlines()[0] == "path,label,score,top1_label,top1_score,top2_label,top2_score,error"


def test_python_dash_m_runs_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "finetune.cli", "fit", str(tmp_path / "nowhere")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "nowhere" in done.stderr and "Traceback" not in done.stderr
