"""Exports: every format loads back the way a consumer loads it and predicts what the trained model predicts."""

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from imagefolders import make_image_folder

from finetune import export, runs
from finetune.cli import main
from finetune.device import CPU
from finetune.errors import UsageError
from finetune.export import DEFAULT_FORMATS, FORMATS, ExportError, export_run, parse_formats
from finetune.model.surgery import FixedPadConv, fix_same_padding
from finetune.serving import ServingModel, load_pt2
from finetune.train import fit

ALL = ("safetensors", "onnx", "pt2")


def fit_tiny(root: Path, head: str) -> Path:
    recipe = "small-similar" if head == "linear" else "small-different"
    folder = root / "data"
    if not folder.exists():
        make_image_folder(folder)
    result = fit(folder, recipe, model="test_efficientnet", pretrained=False, epochs=1, progress=False,
                 num_workers=0, out=root / f"run-{head}", overrides={"head_stages": 2, "batch_size": 8})
    return result.run_dir


TEMPERATURE = 1.7  # what calibration would have stored; every export must carry it


@pytest.fixture(scope="module")
def runs_by_head(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    fitted = {head: fit_tiny(root, head) for head in ("linear", "multistage")}
    for run in fitted.values():
        runs.write_temperature(run, TEMPERATURE)
    return fitted


@pytest.fixture(scope="module")
def exported(runs_by_head, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every format of both heads, exported once."""
    out = tmp_path_factory.mktemp("exports")
    return {head: (out / head, export_run(run, ALL, out / head)) for head, run in runs_by_head.items()}


@pytest.mark.parametrize("head", ["linear", "multistage"])
def test_every_format_passes_the_parity_check(exported, runs_by_head, head):
    out, manifest = exported[head]
    assert set(manifest["formats"]) == set(ALL)
    for fmt, entry in manifest["formats"].items():
        figures = entry["parity"]
        assert figures["passed"] and set(figures["batch_sizes"]) == {"1", "7"}, fmt
        for bs in figures["batch_sizes"].values():
            assert bs["top1_agreement"] == 1.0 and bs["max_abs_prob_diff"] <= 1e-4, fmt
        for name, info in entry["files"].items():
            data = (out / name).read_bytes()
            assert info["bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["head"] == head and manifest["input"]["dtype"] == "uint8"
    # the check ran on the run's own validation images (6 here, repeated to fill a batch of 7)
    split = json.loads((runs_by_head[head] / "split.json").read_text())
    val = {str(Path(split["root"]) / rel) for rel, _ in split["val"]}
    assert len(manifest["parity_images"]) == 7 and set(manifest["parity_images"]) == val
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "manifest.json", "model.onnx", "model.pt2", "model.safetensors"])  # no staging left


def test_plain_timm_reloads_the_safetensors_export_without_finetune(exported, tmp_path):
    out, _ = exported["linear"]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 160, 160)
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import json, sys, safetensors.torch, timm, torch
cfg = json.load(open({str(out / 'config.json')!r}))
model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"])
model.load_state_dict(safetensors.torch.load_file({str(out / 'model.safetensors')!r}))
assert not any(m.startswith("finetune") for m in sys.modules), "finetune was imported"
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
with torch.no_grad():
    y = model.eval()(x)
    if cfg["finetune"].get("test_flip"):  # as docs/export.md says: average with the mirror image's logits
        y = (y + model(x.flip(-1))) / 2
torch.save(y, {str(tmp_path / 'y.pt')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    classifier, config = runs.load_model(out)
    with torch.no_grad():
        expected = classifier(x)
    assert torch.allclose(torch.load(tmp_path / "y.pt", weights_only=True), expected, atol=1e-5)
    assert config["pretrained_cfg"]["input_size"] == [3, 160, 160]
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(config["pretrained_cfg"])


def test_onnx_contract_dynamic_batch_uint8_metadata(exported, runs_by_head):
    out, _ = exported["linear"]
    session = export.onnx_session(out / "model.onnx")
    (image_input,) = session.get_inputs()
    assert image_input.name == "images" and image_input.type == "tensor(uint8)"
    assert isinstance(image_input.shape[0], str) and image_input.shape[1:] == [3, 160, 160]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    meta = session.get_modelmeta().custom_metadata_map
    config = json.loads((runs_by_head["linear"] / "config.json").read_text())
    assert json.loads(meta["label_names"]) == config["label_names"] == ["blue", "green", "red"]
    assert float(meta["temperature"]) == runs.temperature(config)
    assert json.loads(meta["config"])["architecture"] == "test_efficientnet"
    batch = np.random.default_rng(0).integers(0, 256, (5, 3, 160, 160), dtype=np.uint8)
    logits, probs = session.run(None, {"images": batch})
    assert logits.shape == probs.shape == (5, 3) and np.allclose(probs.sum(1), 1, atol=1e-6)


def test_the_temperature_is_inside_every_export(exported):
    out, manifest = exported["linear"]
    assert manifest["temperature"] == TEMPERATURE
    assert runs.temperature(json.loads((out / "config.json").read_text())) == TEMPERATURE
    batch = np.random.default_rng(1).integers(0, 256, (2, 3, 160, 160), dtype=np.uint8)
    logits, probs = export.onnx_session(out / "model.onnx").run(None, {"images": batch})
    assert np.allclose(probs, torch.from_numpy(logits / TEMPERATURE).softmax(1).numpy(), atol=1e-6)
    pt2_logits, pt2_probs = load_pt2(out / "model.pt2")(torch.from_numpy(batch))
    assert np.allclose(pt2_probs.detach().numpy(), probs, atol=1e-5)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # set only while loading


def test_a_failed_parity_check_is_an_error_and_writes_nothing(runs_by_head, tmp_path, monkeypatch):
    real = export.WRITERS["onnx"]

    def drifting(classifier, config, staging, device):
        files, run, details = real(classifier, config, staging, device)
        return files, lambda pixels: tuple(o + 1e-3 for o in run(pixels)), details

    monkeypatch.setitem(export.WRITERS, "onnx", drifting)
    with pytest.raises(ExportError, match="onnx export .* does not predict what the trained model predicts"):
        export_run(runs_by_head["linear"], ("onnx",), tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.onnx" not in names and "manifest.json" not in names
    assert not any(name.startswith(".") for name in names)  # no staging folder or temporary file left


def test_an_interrupted_export_keeps_the_previous_files(runs_by_head, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_run(runs_by_head["linear"], ("safetensors",), out)
    before = (out / "model.safetensors").read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "load_file", interrupt)  # after the new file is written to staging
    with pytest.raises(KeyboardInterrupt):
        export_run(runs_by_head["linear"], ("safetensors",), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]


def test_parity_images_can_be_given_when_the_data_has_moved(runs_by_head, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs_by_head["linear"], run)
    split = json.loads((run / "split.json").read_text())
    images = [Path(split["root"]) / rel for rel, _ in split["val"]]
    split["root"] = str(tmp_path / "moved")
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(ExportError, match="--images"):
        export_run(run, ("safetensors",), tmp_path / "out")
    manifest = export_run(run, ("safetensors",), tmp_path / "out", images=images[:3])
    assert manifest["parity_images"][:3] == [str(p) for p in images[:3]]


def test_parse_formats():
    assert parse_formats("onnx, torchscript,ONNX") == ("onnx", "pt2")  # torchscript: an alias, writes .pt2
    assert parse_formats("torch.export") == ("pt2",)
    assert parse_formats(",".join(DEFAULT_FORMATS)) == DEFAULT_FORMATS and set(DEFAULT_FORMATS) <= set(FORMATS)
    assert parse_formats(["safetensors"]) == ("safetensors",)
    with pytest.raises(UsageError, match="unknown export format 'tflite'"):
        parse_formats("onnx,tflite")


def test_cli_export(runs_by_head, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(runs_by_head["multistage"]), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.pt2" in printed and "100%" in printed
    assert (out / "model.pt2").is_file() and (out / "manifest.json").is_file()
    assert main(["export", str(runs_by_head["multistage"]), "--format", "pickle", "--out", str(out)]) == 2
    assert "pickle" in capsys.readouterr().err


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_done_when_on_fashion_mnist_with_lite0(tmp_path, capsys):
    """The issue's acceptance check on the real backbone: export, parity, plain timm, predict, evaluate."""
    from finetune.calibration import collect_logits
    from finetune.data import ImageFolderDataModule, scan_image_folder
    from finetune.evaluate import evaluate

    data = tmp_path / "fashion-mnist"
    try:
        _load_script("make_fashion_mnist").main(["--out", str(data), "--per-class", "30", "--val-per-class", "10"])
    except SystemExit as exc:
        pytest.skip(f"Fashion-MNIST IDX files are absent: {exc.code}")
    report = {}
    for recipe in ("small-similar", "small-different"):
        result = fit(data, recipe, epochs=2, progress=False, num_workers=1, out=tmp_path / recipe)
        manifest = export_run(result.run_dir, ALL)  # raises if any format fails its parity check
        report[recipe] = {fmt: e["parity"]["batch_sizes"] for fmt, e in manifest["formats"].items()}
        report[recipe]["val_acc_run"] = result.accuracy
        classifier, config = runs.load_model(result.run_dir)
        splits = scan_image_folder(data)
        loader = ImageFolderDataModule(splits, runs.data_config(config), batch_size=50, num_workers=0).val_dataloader()
        logits, labels = collect_logits(classifier, loader)
        fp32_acc = float((logits.argmax(1) == labels).float().mean())
        for backend in ("onnx", "torch"):
            evaluation = evaluate(result.run_dir, data / "val", backend=backend, out=tmp_path / f"eval-{backend}")
            assert evaluation.accuracy == pytest.approx(fp32_acc, abs=1e-6), backend  # fp32 mean
            # the run may have validated with bf16 autocast, which moves a few borderline images
            assert abs(evaluation.accuracy - result.accuracy) <= 0.05
            report[recipe][f"evaluate_acc_{backend}"] = evaluation.accuracy
        report[recipe]["val_acc_fp32"] = fp32_acc

    run = tmp_path / "small-similar"
    outputs = {}
    capsys.readouterr()
    for backend in ("onnx", "torch"):
        assert main(["predict", str(run), str(data / "val"), "--format", "csv", "--backend", backend]) == 0
        outputs[backend] = [(r["path"], r["label"]) for r in csv.DictReader(io.StringIO(capsys.readouterr().out))]
    assert len(outputs["onnx"]) == 100 and outputs["onnx"] == outputs["torch"]

    x = torch.rand(2, 3, 224, 224)
    torch.save(x, tmp_path / "x.pt")
    export_dir = run / "export"
    code = f"""
import json, sys, safetensors.torch, timm, torch
cfg = json.load(open({str(export_dir / 'config.json')!r}))
model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"])
model.load_state_dict(safetensors.torch.load_file({str(export_dir / 'model.safetensors')!r}))
assert not any(m.startswith("finetune") for m in sys.modules)
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
with torch.no_grad():
    y = model.eval()(x)
    if cfg["finetune"].get("test_flip"):  # as docs/export.md says: average with the mirror image's logits
        y = (y + model(x.flip(-1))) / 2
torch.save(y, {str(tmp_path / 'y.pt')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    classifier, _ = runs.load_model(run)
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt", weights_only=True), classifier(x), atol=1e-5)

    mixed = tmp_path / "mixed"
    shutil.copytree(data / "val" / "Bag", mixed)
    (mixed / "zero.jpg").write_bytes(b"")
    (mixed / "text.jpg").write_text("just text\n")
    assert main(["predict", str(run), str(mixed)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count(str(mixed)) == 10 and "zero.jpg" in captured.err and "text.jpg" in captured.err

    # a second architecture family, random weights: parity does not depend on training
    mobile = fit(data, "small-similar", model="mobilenetv2_100", pretrained=False, epochs=1, progress=False,
                 num_workers=1, out=tmp_path / "mobilenet", limit_batches=2)
    manifest = export_run(mobile.run_dir, ALL)
    report["mobilenetv2_100"] = {fmt: e["parity"]["batch_sizes"] for fmt, e in manifest["formats"].items()}
    with capsys.disabled():
        print("\n" + json.dumps(report, indent=1))


def _tf_padded(size: int = 96):
    """A classifier with TensorFlow "same" padding (timm's Conv2dSame) and its config, random weights."""
    import timm

    from finetune.model.classifier import Classifier

    classifier = Classifier(timm.create_model("tf_efficientnet_lite0", num_classes=3), 3).eval()
    data_config = timm.data.resolve_model_data_config(classifier.backbone) | {"input_size": (3, size, size)}
    return classifier, runs.model_config(classifier, "tf_efficientnet_lite0", ["a", "b", "c"], data_config)


def test_fixed_same_padding_computes_what_conv2d_same_computes():
    from timm.layers import Conv2dSame

    classifier, _ = _tf_padded()
    same = [m for m in classifier.modules() if isinstance(m, Conv2dSame)]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = classifier(x)
        fixed = fix_same_padding(classifier, x)
        calls = []  # Conv2dSame.forward (padding computed from the shape) must no longer run
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in same]
        got = fixed(x)
    for hook in hooks:
        hook.remove()
    assert same and not calls
    assert sum(isinstance(m, FixedPadConv) for m in fixed.modules()) == len(same)
    assert torch.allclose(got, want, atol=1e-5)


def test_onnx_export_takes_the_quick_path_and_falls_back_to_dynamo(tmp_path, monkeypatch):
    import onnx

    classifier, config = _tf_padded()
    quick = tmp_path / "quick"
    quick.mkdir()
    _, run, details = export._write_onnx(classifier, config, quick, CPU)
    assert "fixed TF padding" in details["exporter"]
    graph = onnx.load(str(quick / export.ONNX_NAME))
    assert not {n.op_type for n in graph.graph.node} & {"Shape", "Size"}  # no shape arithmetic at run time
    batch = np.random.default_rng(0).integers(0, 256, (5, 3, 96, 96), dtype=np.uint8)
    with torch.no_grad():
        want = ServingModel.from_config(classifier, config)(torch.from_numpy(batch))[0].numpy()
    assert np.allclose(run(batch)[0], want, atol=1e-4)
    # A graph that still computes its padding from the input's shape is not taken: the dynamo exporter is.
    monkeypatch.setattr(export, "fix_same_padding", lambda model, example: model)
    slow = tmp_path / "slow"
    slow.mkdir()
    _, run, details = export._write_onnx(classifier, config, slow, CPU)
    assert details["exporter"] == "torch.onnx.export (dynamo)"
    assert np.allclose(run(batch)[0], want, atol=1e-4)
