"""Every device decision goes through `finetune.device.resolve_device`, every placement through its `Device`."""

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
from imagefolders import make_image_folder
from torch import nn

import finetune
import finetune.export
import finetune.phases.probe
import finetune.predict
import finetune.train
from finetune.cli import main
from finetune.device import Device, resolve_device
from finetune.errors import UsageError
from finetune.evaluate import evaluate
from finetune.model.classifier import Classifier
from finetune.model.probe import CachedFeatures
from finetune.phases.probe import head_scores
from finetune.predict import load
from finetune.runtime import choose_precision
from finetune.train import fit


def test_nothing_else_asks_torch_about_cuda():
    root = Path(finetune.__file__).parent
    callers = [str(p.relative_to(root)) for p in root.rglob("*.py") if "torch.cuda" in p.read_text()]
    assert callers == ["device.py"]


def test_auto_is_what_is_there_and_names_lightnings_accelerator(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)
    device = resolve_device("auto")
    assert (device.kind, device.accelerator, device.pin_memory) == ("cpu", "cpu", False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda: "Fake GPU")
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: True)
    gpu = resolve_device("auto")
    assert (gpu.kind, gpu.accelerator, gpu.pin_memory, gpu.name) == ("cuda", "gpu", True, "Fake GPU")
    assert resolve_device("cpu").kind == "cpu"  # asked for: the CPU even with a GPU there
    assert choose_precision("auto", gpu).lightning == "bf16-mixed"
    assert choose_precision("auto", Device("cuda", "old GPU", False)).lightning == "16-mixed"
    assert choose_precision("auto", Device("cpu", "CPU", False)).lightning == "32-true"


@pytest.mark.parametrize("accelerator", ["gpu", "mps", "tpu"])
def test_an_accelerator_that_is_not_there_is_a_user_error(accelerator, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)
    with pytest.raises(UsageError, match=f"--accelerator {accelerator}"):
        resolve_device(accelerator)


# --- every placement goes through the Device -----------------------------------------------------------------
# Without an accelerator, a recording device stands in for one: it is the CPU, but what it places comes back
# as a `Placed` tensor (and whatever is computed from one stays Placed, as on a GPU), and it remembers the
# modules it placed until they leave it (`Module.cpu`, as Lightning's teardown does). Checks on the
# classifier then fail wherever a real accelerator would: a placed tensor meeting a module left on the CPU,
# the head meeting features that were not placed, a result reaching numpy or the metrics without `.cpu()`.


class Placed(torch.Tensor):
    """A tensor on the recording device."""

    def cpu(self, *args, **kwargs) -> torch.Tensor:
        return super().cpu(*args, **kwargs).as_subclass(torch.Tensor)

    def numpy(self, *args, **kwargs):
        raise AssertionError("a tensor still on the device reached numpy: a .cpu() is missing")


@dataclass(frozen=True, eq=False)
class RecordingDevice(Device):
    tensors: list = field(default_factory=list)  # (shape, dtype) of every tensor placed
    modules: set = field(default_factory=set)  # the modules on the device now
    calls: list = field(default_factory=list)  # (classifier method, its input was placed)

    def holds(self, nbytes: int) -> bool:  # as a GPU with room: the probe's L-BFGS runs on it
        return True

    def place(self, x):
        if isinstance(x, nn.Module):
            self.modules.update(x.modules())
            return x
        self.tensors.append((tuple(x.shape), x.dtype))
        return x.as_subclass(Placed)


@pytest.fixture
def recording(monkeypatch) -> RecordingDevice:
    """The recording device, returned by `resolve_device` wherever fit, export and predict look it up."""
    device = RecordingDevice("cpu", "recording CPU", False)
    for module in (finetune.train, finetune.export, finetune.predict):
        monkeypatch.setattr(module, "resolve_device", lambda accelerator="auto": device)
    real_cpu = nn.Module.cpu

    def leave(module, *args, **kwargs):  # Lightning's teardown: the model goes back to the host
        device.modules.difference_update(module.modules())
        return real_cpu(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "cpu", leave)
    for name in ("forward", "head_features", "head_logits"):
        monkeypatch.setattr(Classifier, name, _checked(device, getattr(Classifier, name), name))
    return device


def _checked(device: RecordingDevice, method, name: str):
    def run(self, x):
        placed = isinstance(x, Placed)
        device.calls.append((name, placed))
        if name == "head_logits" and not placed:
            raise AssertionError("the head met features that the device did not place")
        if placed and self not in device.modules:
            raise AssertionError(f"a tensor on the device met a classifier left behind ({name})")
        return method(self, x)

    return run


def _host_only(monkeypatch, module, name: str) -> None:
    """``module.name`` refuses tensors still on the device (its results must be CPU tensors)."""
    real = getattr(module, name)

    def host(*args, **kwargs):
        result = real(*args, **kwargs)
        for value in (*args, result):
            features = getattr(value, "features", value)
            assert not isinstance(features, Placed), f"{name}: a tensor on the device, a .cpu() is missing"
        return result

    monkeypatch.setattr(module, name, host)


@pytest.mark.parametrize("recipe, overrides", [
    ("small-similar", {}),
    # fine-tuning wrecked by its learning rate: the probed head is kept and scored on the test split after
    # Lightning's teardown moved the model back to the host (the divergence guard, off, would stop it first)
    ("large-similar", {"lr": 1.0, "backbone_lr_scale": 1.0, "freeze_epochs": 1, "divergence_factor": 0}),
])
def test_fit_places_features_head_and_parity_inputs_through_the_device(recipe, overrides, recording, tmp_path,
                                                                      image_folder, monkeypatch):
    folder = image_folder(tmp_path / "data", per_class=8, split=True)
    image_folder(folder / "test", per_class=4, seed=5)
    _host_only(monkeypatch, finetune.phases.probe, "extract_features")
    _host_only(monkeypatch, finetune.phases.probe, "metrics_from_logits")
    result = fit(folder, recipe, model="test_efficientnet", pretrained=False, progress=False, num_workers=0,
                 out=tmp_path / "run", feature_backend="torch", export="safetensors", accelerator="gpu",
                 overrides={"epochs": 2, "batch_size": 8, "head_stages": 2} | overrides)
    assert result.test and result.summary["probe"]["features_backend"] == "torch"
    if recipe.startswith("large"):
        assert "was kept" in result.summary["training"]
    calls = {name: {placed for n, placed in recording.calls if n == name} for name in ("head_features", "head_logits")}
    assert calls == {"head_features": {True}, "head_logits": {True}}  # every frozen pass and head score
    manifest = json.loads((result.run_dir / "export" / "manifest.json").read_text())
    n, size = len(manifest["parity_images"]), tuple(manifest["input"]["shape"][1:])
    placed = Counter(recording.tensors)
    train_rows = result.summary["train_images"] * len(result.summary["probe"]["views"])
    assert placed[((train_rows, result.summary["probe"]["feature_dim"]), torch.float32)] == 1  # L-BFGS's features
    assert placed[((n, *size), torch.float32)] == 1  # the eager reference of the parity check
    assert placed[((1, *size), torch.uint8)] == n and placed[((7, *size), torch.uint8)] == n // 7  # safetensors
    assert manifest["formats"]["safetensors"]["parity"]["passed"] and manifest["parity_device"] == "recording CPU"


def test_head_scores_places_a_head_that_left_the_device(recording):
    classifier = Classifier(timm.create_model("test_efficientnet", num_classes=3), 3)
    recording.place(classifier)
    classifier.cpu()  # as after Lightning's epochs
    cached = CachedFeatures(torch.randn(5, classifier.backbone.num_features), torch.tensor([0, 1, 2, 0, 1]))
    logits, metrics = head_scores(classifier, cached, recording)
    assert type(logits) is torch.Tensor and logits.shape == (5, 3) and 0 <= metrics["acc"] <= 1


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("device")
    folder = make_image_folder(root / "data", per_class=8, split=True)
    result = fit(folder, "small-similar", model="test_efficientnet", pretrained=False, progress=False, num_workers=0,
                 out=root / "run", export=None, overrides={"epochs": 1, "batch_size": 8})
    return result.run_dir, folder / "val"


def test_predict_and_evaluate_run_the_torch_engine_on_the_device(cpu_run, recording, tmp_path):
    run, val = cpu_run
    predictor = load(run, backend="torch", accelerator="gpu")
    predictions = predictor.predict(val, batch_size=4)
    evaluation = evaluate(predictor, val, out=tmp_path / "eval", batch_size=4)
    assert len(predictions) == evaluation.images == 6 and all(p.ok for p in predictions)
    assert predictor.runner.model in recording.modules
    assert [shape[0] for shape, dtype in recording.tensors if dtype == torch.uint8] == [4, 2] * 2
    assert recording.calls and all(placed for _, placed in recording.calls)


def test_predict_evaluate_and_export_take_one_device_and_an_accelerator_that_is_there(cpu_run, capsys,
                                                                                      monkeypatch):
    run, val = cpu_run
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for command in (["predict", str(run), str(val)], ["evaluate", str(run), str(val)], ["export", str(run)]):
        capsys.readouterr()
        assert main([*command, "--devices", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--devices 2" in err and "one device" in err and len(err.splitlines()) == 1
        assert main([*command, "--accelerator", "gpu"]) == 2
        assert "--accelerator gpu" in capsys.readouterr().err
    assert main(["predict", str(run), str(val), "--devices", "1", "--accelerator", "cpu", "--format", "csv"]) == 0


def test_the_probe_moves_features_to_an_accelerator_only_when_half_its_free_memory_holds_them(monkeypatch):
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda: (1000, 4000))
    gpu = Device("cuda", "Fake GPU", True)
    assert gpu.holds(500) and not gpu.holds(501)
    assert not resolve_device("cpu").holds(1)  # nothing to move on the CPU
