"""Every device decision goes through `finetune.device.resolve_device`."""

from pathlib import Path

import pytest

import finetune
from finetune.device import Device, resolve_device
from finetune.errors import UsageError
from finetune.runtime import choose_precision


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
