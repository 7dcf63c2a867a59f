"""Predict and evaluate: both backends, every kind of input, unreadable files, the CLI."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefolders import make_image_folder
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import finetune
from finetune import runs
from finetune.cli import main
from finetune.data import build_transforms, load_rgb
from finetune.errors import UsageError
from finetune.evaluate import evaluate, labelled_images
from finetune.export import export_run
from finetune.predict import Predictor, find_images, load
from finetune.train import fit


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A fitted tiny run on a train/val folder, with a temperature and an ONNX + safetensors export."""
    root = tmp_path_factory.mktemp("predict")
    folder = make_image_folder(root / "data", per_class=12, split=True)
    result = fit(folder, "small-similar", model="test_efficientnet", pretrained=False, progress=False,
                 num_workers=0, out=root / "run", overrides={"epochs": 2, "lr": 0.05, "batch_size": 8})
    runs.write_temperature(result.run_dir, 1.3)
    export_run(result.run_dir)
    return result.run_dir


@pytest.fixture(scope="module")
def val_dir(run) -> Path:
    return Path(json.loads((run / "split.json").read_text())["root"]) / "val"


@pytest.fixture
def mixed(val_dir, tmp_path) -> Path:
    """Good images with a zero-byte file and a text file named .jpg among them."""
    folder = tmp_path / "mixed"
    shutil.copytree(val_dir / "red", folder / "red")
    shutil.copytree(val_dir / "blue", folder / "sub" / "blue")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "red" / "notes.jpg").write_text("not an image\n")
    (folder / "readme.txt").write_text("ignored: not an image extension\n")
    return folder


def test_load_chooses_the_backend(run):
    assert load(run).runner.name == "onnx"  # the run's export/model.onnx
    assert load(run, backend="torch").runner.name == "torch"
    assert load(run / "export" / "model.onnx").runner.name == "onnx"
    assert load(run / "export", backend="torch").runner.name == "torch"
    assert finetune.load is load
    predictor = load(run)
    assert predictor.labels == ["blue", "green", "red"] and predictor.temperature == 1.3
    with pytest.raises(UsageError, match="no ONNX export"):
        load(run / "checkpoints", backend="onnx")
    with pytest.raises(UsageError, match="not found"):
        load(run / "nowhere")
    with pytest.raises(UsageError, match="backend"):
        load(run, backend="tensorrt")


def test_onnx_and_torch_give_the_same_predictions(run, val_dir):
    onnx_preds = load(run).predict(val_dir, top_k=3, batch_size=4)
    torch_preds = load(run, backend="torch").predict(val_dir, top_k=3, batch_size=5)
    assert len(onnx_preds) == len(torch_preds) == 9 and all(p.ok for p in onnx_preds)
    assert [p.label for p in onnx_preds] == [p.label for p in torch_preds]
    for a, b in zip(onnx_preds, torch_preds, strict=True):
        assert a.source == b.source and abs(a.score - b.score) < 1e-4
        assert [label for label, _ in a.top_k] == [label for label, _ in b.top_k] and len(a.top_k) == 3


def test_predictions_match_the_eager_model_with_its_temperature(run, val_dir):
    classifier, config = runs.load_model(run)
    transform = build_transforms(runs.data_config(config), train=False)
    paths = sorted((val_dir / "green").iterdir())
    with torch.no_grad():
        logits = classifier(torch.stack([transform(image=load_rgb(p))["image"] for p in paths]))
    expected = (logits / 1.3).softmax(1)
    for prediction, probs in zip(load(run).predict(paths), expected, strict=True):
        assert prediction.label == config["label_names"][int(probs.argmax())]
        assert prediction.score == pytest.approx(float(probs.max()), abs=1e-4)


def test_inputs_paths_folders_globs_arrays_and_pil_images(run, val_dir):
    predictor = load(run)
    first = sorted((val_dir / "red").iterdir())[0]
    array = load_rgb(first)
    results = predictor.predict([first, str(val_dir / "blue"), str(val_dir / "g*" / "*.png"), array,
                                 Image.open(first)])
    sources = [p.source for p in results]
    assert sources[0] == str(first) and sources[-2:] == ["<image 3>", "<image 4>"]
    assert sum("/blue/" in s for s in sources) == 3 and sum("/green/" in s for s in sources) >= 1
    assert results[0].score == pytest.approx(results[-1].score, abs=1e-6) == pytest.approx(results[-2].score)
    assert len(predictor.predict(array)) == 1
    with pytest.raises(UsageError, match=r"\(H, W, 3\) uint8"):
        predictor.predict(array.astype(np.float32))
    with pytest.raises(UsageError, match="positive"):
        predictor.predict(first, batch_size=0)
    assert len(predictor.predict(first, top_k=10)[0].top_k) == 3  # at most the number of classes


def test_unreadable_files_are_named_and_the_others_predicted(run, mixed):
    results = load(run).predict(mixed, batch_size=2)
    bad = {Path(p.source).name: p.error for p in results if not p.ok}
    assert set(bad) == {"empty.jpg", "notes.jpg"}
    assert "empty" in bad["empty.jpg"] and "not an image" in bad["notes.jpg"]
    good = [p for p in results if p.ok]
    assert len(good) == 6 and all(p.label in ("red", "blue") for p in good)  # readme.txt is not an image


def test_find_images_reports_what_matches_nothing(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "notes.md").write_bytes(b"x")
    found = find_images([tmp_path, tmp_path / "notes.md", tmp_path / "missing*.jpg"])
    assert [(Path(s).name, not isinstance(v, str)) for s, v in found] == [
        ("a.png", True), ("notes.md", True), ("missing*.jpg", False)]  # a file named explicitly is tried


def test_folders_are_walked_as_fit_walks_them(tmp_path):
    """Hidden files and quarantined files (`finetune doctor --quarantine`) are passed over, as in fit."""
    for name in ("cat/a.png", "cat/.b.png", "_quarantine/corrupt/cat/c.png", "cat/_quarantine/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [Path(s).relative_to(tmp_path).as_posix() for s, _ in find_images([tmp_path])] == ["cat/a.png"]
    assert labelled_images(tmp_path, ["cat", "dog"]) == [(tmp_path / "cat" / "a.png", "cat")]


def test_tta_averages_the_image_and_its_mirror(run, val_dir):
    predictor = load(run)
    pixels = np.stack([predictor.preprocess(load_rgb(p)) for p in sorted((val_dir / "blue").iterdir())])
    mirrored = np.ascontiguousarray(pixels[..., ::-1])
    expected = (predictor.probabilities(pixels) + predictor.probabilities(mirrored)) / 2
    assert np.allclose(predictor.probabilities(pixels, tta=True), expected, atol=1e-6)
    plain = load(run).predict(val_dir / "blue")
    tta = load(run).predict(val_dir / "blue", tta=True)
    assert predictor.config["finetune"]["test_flip"]  # small-similar: the model itself averages with the mirror
    assert np.allclose([p.score for p in plain], [p.score for p in tta], atol=1e-5)  # so --tta adds nothing
    assert np.allclose(predictor.runner(pixels), predictor.runner(mirrored), atol=1e-5)  # mirror-invariant


def test_predict_streams_batch_by_batch(run, val_dir):
    predictor = load(run)
    calls = []
    runner = predictor.runner
    predictor.runner = lambda pixels: calls.append(len(pixels)) or runner(pixels)
    stream = predictor.predict_iter(val_dir, batch_size=2)
    next(stream)
    assert calls == [2]  # only the first batch has run
    assert len(list(stream)) == 8 and calls == [2, 2, 2, 2, 1]


def test_evaluate_reproduces_the_validation_metrics(run, val_dir, tmp_path):
    result = evaluate(run, val_dir, out=tmp_path / "eval")
    # the same metrics computed independently: eager fp32 model, validation transform, torchmetrics
    classifier, config = runs.load_model(run)
    transform = build_transforms(runs.data_config(config), train=False)
    split = json.loads((run / "split.json").read_text())
    paths = [Path(split["root"]) / rel for rel, _ in split["val"]]
    labels = torch.tensor([label for _, label in split["val"]])
    with torch.no_grad():
        preds = classifier(torch.stack([transform(image=load_rgb(p))["image"] for p in paths])).argmax(1)
    assert result.images == len(paths) == 9 and result.skipped == []
    assert result.accuracy == pytest.approx(float((preds == labels).float().mean()))
    assert result.macro_f1 == pytest.approx(float(MulticlassF1Score(3, average="macro")(preds, labels)))
    assert result.balanced_accuracy == pytest.approx(float(MulticlassAccuracy(3, average="macro")(preds, labels)))
    per_class = {r["label"]: r for r in result.per_class()}
    assert sum(r["support"] for r in per_class.values()) == 9
    out = tmp_path / "eval"
    for name in ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png", "predictions.csv"):
        assert (out / name).is_file(), name
    rows = list(csv.reader((out / "confusion.csv").open()))
    assert rows[0] == ["true \\ predicted", "blue", "green", "red"] and len(rows) == 4
    assert np.array(rows[1:])[:, 1:].astype(int).sum() == 9
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == result.accuracy


def test_evaluate_names_unknown_classes_and_split_layouts(run, val_dir, tmp_path):
    with pytest.raises(UsageError, match="split layout"):
        evaluate(run, val_dir.parent, out=tmp_path / "e")
    (tmp_path / "odd" / "purple").mkdir(parents=True)
    with pytest.raises(UsageError, match="purple"):
        evaluate(run, tmp_path / "odd", out=tmp_path / "e")


def test_evaluate_skips_unreadable_files(run, mixed, tmp_path):
    (mixed / "empty.jpg").rename(mixed / "red" / "empty.jpg")
    shutil.move(mixed / "sub" / "blue", mixed / "blue")
    shutil.rmtree(mixed / "sub")
    result = evaluate(load(run, backend="torch"), mixed, out=tmp_path / "e")
    assert result.images == 6 and {Path(p).name for p, _ in result.skipped} == {"empty.jpg", "notes.jpg"}


def test_cli_predict_formats_and_exit_status(run, mixed, tmp_path, capsys):
    assert main(["predict", str(run), str(mixed)]) == 1  # some files could not be read
    captured = capsys.readouterr()
    assert "label" in captured.out and captured.out.count("mixed/") == 6
    assert "empty.jpg" in captured.err and "notes.jpg" in captured.err

    assert main(["predict", str(run), str(mixed), "--format", "csv", "--top-k", "2", "--backend", "torch"]) == 1
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 8 and {"path", "label", "score", "top2_label", "top2_score", "error"} <= set(rows[0])
    assert sum(bool(r["error"]) for r in rows) == 2

    target = tmp_path / "p.json"
    assert main(["predict", str(run / "export"), str(mixed / "red"), "--format", "json", "--output",
                 str(target), "--tta"]) == 1
    items = json.loads(target.read_text())
    assert len(items) == 4 and sum(i["error"] is None for i in items) == 3

    assert main(["predict", str(run), str(mixed / "sub")]) == 0


def test_cli_evaluate(run, val_dir, tmp_path, capsys):
    assert main(["evaluate", str(run), str(val_dir), "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "accuracy:" in printed and "macro-F1" in printed and (tmp_path / "e" / "confusion.png").is_file()
    assert main(["evaluate", str(run), str(val_dir.parent)]) == 2
    assert main(["evaluate", str(run), str(val_dir), "--backend", "torch"]) == 0
    assert (run / "eval-val" / "metrics.json").is_file()  # the default: next to the model it evaluates


def test_predictor_repr_names_the_backend(run):
    assert "backend=onnx" in repr(load(run)) and isinstance(load(run), Predictor)
