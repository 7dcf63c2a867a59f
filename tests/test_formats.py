"""Folders written by older finetune code keep loading; folders from a newer one fail with the version.

``tests/fixtures/run-v0/`` is a run folder with its ONNX export, written by the code of before format
versions (config.json has no ``finetune.format``; that layout counts as version 1). It was made once with::

    fit(make_image_folder(root / "data", classes=3, per_class=8, size=32), "small-similar",
        model="test_efficientnet", pretrained=False, out=root / "run", progress=False, num_workers=0,
        overrides={"head": "multistage", "head_stages": 2, "epochs": 2}, export=("safetensors", "onnx"))
    export_run(root / "run", ("onnx",), out=...)   # the export/ kept: model.onnx, config.json, manifest.json

and pruned to what predict, evaluate and export read (no checkpoints, plots or export/model.safetensors).
Its split.json names a folder that no longer exists, so re-exporting it needs ``images=``.

When the format of a run or export folder changes (config.json, file names, what the model files contain):
bump ``finetune.runs.FORMAT_VERSION``; keep older folders loading, or failing with the version message;
and add a fixture written by the code of before the change (``run-v<old version>``) with a test like these.
Tests never write into tests/fixtures: they copy a fixture to ``tmp_path`` first.
"""

import json
import shutil
from pathlib import Path

import onnx
import pytest
from imagefolders import make_image_folder

from finetune import runs
from finetune.errors import FinetuneError
from finetune.evaluate import evaluate
from finetune.export import export_run
from finetune.predict import load

FIXTURES = Path(__file__).parent / "fixtures"
LABELS = ["blue", "green", "red"]


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


@pytest.fixture(scope="module")
def run_v0(tmp_path_factory) -> Path:
    return copy_fixture("run-v0", tmp_path_factory.mktemp("formats"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """New images of the fixture's three colour classes (another seed than the run was trained on)."""
    return make_image_folder(tmp_path_factory.mktemp("images") / "data", classes=3, per_class=4, size=32, seed=1)


def test_the_fixture_predates_format_versions():
    for config in ("config.json", "export/config.json"):
        assert "format" not in json.loads((FIXTURES / "run-v0" / config).read_text())["finetune"]


@pytest.mark.parametrize(("where", "backend", "runner"), [
    ("", "auto", "onnx"), ("", "torch", "torch"), ("export", "auto", "onnx"),
    ("export/model.onnx", "auto", "onnx")])
def test_an_old_run_and_its_export_predict(run_v0, images, where, backend, runner):
    predictor = load(run_v0 / where, backend)
    assert predictor.runner.name == runner and predictor.labels == LABELS
    assert predictor.config["finetune"]["format"] == runs.FORMAT_VERSION  # no version: today's layout
    predictions = predictor.predict(images)
    assert len(predictions) == 12 and all(p.ok for p in predictions)
    assert [p.label for p in predictions] == [Path(p.source).parent.name for p in predictions]


def test_an_old_run_evaluates(run_v0, images, tmp_path):
    result = evaluate(run_v0, images, out=tmp_path / "eval", backend="torch")
    assert result.images == 12 and result.accuracy == 1.0
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_an_old_run_exports_again(run_v0, images, tmp_path):
    run = copy_fixture("run-v0", tmp_path)
    manifest = export_run(run, ("onnx",), out=tmp_path / "export", images=sorted(images.rglob("*.png")))
    assert manifest["formats"]["onnx"]["parity"]["passed"]
    config = json.loads((tmp_path / "export" / runs.CONFIG_NAME).read_text())
    assert config["finetune"]["format"] == runs.FORMAT_VERSION  # the export records the layout it has
    assert [p.label for p in load(tmp_path / "export").predict(images)] == [
        p.label for p in load(run_v0).predict(images)]


def set_format(config_file: Path, version: object) -> None:
    config = json.loads(config_file.read_text())
    config["finetune"]["format"] = version
    config_file.write_text(json.dumps(config))


def test_a_newer_run_fails_with_the_version_and_the_fix(tmp_path, images):
    run = copy_fixture("run-v0", tmp_path)
    set_format(run / runs.CONFIG_NAME, runs.FORMAT_VERSION + 1)
    message = (rf"has format version {runs.FORMAT_VERSION + 1}; this finetune \(.*\) reads versions up to "
               rf"{runs.FORMAT_VERSION}: upgrade finetune")
    for attempt in (lambda: load(run), lambda: load(run, backend="torch"), lambda: runs.load_model(run),
                    lambda: evaluate(run, images, out=tmp_path / "e"), lambda: export_run(run, ("onnx",)),
                    lambda: runs.write_temperature(run, 2.0)):
        with pytest.raises(runs.FormatVersionError, match=message) as caught:
            attempt()
        assert isinstance(caught.value, FinetuneError) and "\n" not in str(caught.value)


def test_a_newer_export_fails_with_the_version(tmp_path):
    export = copy_fixture("run-v0", tmp_path) / "export"
    set_format(export / runs.CONFIG_NAME, runs.FORMAT_VERSION + 1)
    with pytest.raises(runs.FormatVersionError, match=f"{runs.CONFIG_NAME} has format version"):
        load(export)
    model = onnx.load(str(export / "model.onnx"))  # a lone model.onnx carries its config in its metadata
    entry = next(e for e in model.metadata_props if e.key == "config")
    config = json.loads(entry.value)
    config["finetune"]["format"] = runs.FORMAT_VERSION + 1
    entry.value = json.dumps(config)
    onnx.save(model, str(tmp_path / "newer.onnx"))
    with pytest.raises(runs.FormatVersionError, match="newer.onnx has format version"):
        load(tmp_path / "newer.onnx")


def test_a_damaged_version_is_named(tmp_path):
    run = copy_fixture("run-v0", tmp_path)
    set_format(run / runs.CONFIG_NAME, "two")
    with pytest.raises(runs.FormatVersionError, match="format version 'two', which no finetune writes"):
        load(run, backend="torch")
