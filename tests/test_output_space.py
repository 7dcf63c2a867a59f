"""The output folder check (unwritable, a file in the way, short of space) and the size estimate of a run
folder against the real files of a tiny model."""

import io
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from finetune import output_space, runs
from finetune.errors import UsageError
from finetune.model.classifier import Classifier
from finetune.output_space import MARGIN_BYTES, MARGIN_FRACTION, check_output_space, human_bytes, run_bytes_needed


def test_writable_folder_with_space_passes(tmp_path: Path):
    check_output_space(tmp_path / "runs" / "data-small", 1)
    assert not (tmp_path / "runs").exists()  # the check creates nothing
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a 0o500 folder")
def test_read_only_folder_is_refused(tmp_path: Path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(UsageError, match=f"output folder {folder / 'run'}: cannot write in {folder}"):
            check_output_space(folder / "run", 1)
    finally:
        folder.chmod(0o700)


def test_denied_access_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # the 0o500 test above is skipped as root; this one covers the same branch by what os.access answers
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(UsageError, match=r"cannot write in .* \(permission denied\); make it writable"):
        check_output_space(tmp_path / "a" / "b", 1)


def test_failed_probe_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # a read-only mount: os.access may say yes (root), creating a file fails
    def refuse(**kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(output_space.tempfile, "TemporaryFile", refuse)
    with pytest.raises(UsageError, match=r"cannot write in .* \(Read-only file system\)"):
        check_output_space(tmp_path / "run", 1)


@pytest.mark.parametrize("below", ["", "run"])
def test_file_in_the_way_is_refused(tmp_path: Path, below: str):
    (tmp_path / "taken").write_text("")
    location = tmp_path / "taken" / below
    with pytest.raises(UsageError, match=f"{tmp_path / 'taken'} is a file, not a folder") as err:
        check_output_space(location, 1)
    assert "\n" not in str(err.value)


def test_short_of_space_names_needed_and_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    usage = namedtuple("usage", "total used free")
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: seen.append(path) or usage(10**12, 0, 300 * 10**6))
    with pytest.raises(UsageError) as err:
        check_output_space(tmp_path / "run", 1_234_000_000)
    assert str(err.value) == (f"output folder {tmp_path / 'run'}: the run needs 1.23 GB, 300 MB free on {tmp_path}; "
                              "free some space or choose another --out on a larger disk")
    assert seen == [tmp_path]
    check_output_space(tmp_path / "run", 300 * 10**6)  # exactly enough


@pytest.mark.parametrize(("n", "text"), [(512, "512 B"), (999_499, "999 kB"), (999_500, "1 MB"),
                                         (1_234_567_890, "1.23 GB"), (5 * 10**18, "5000 PB")])
def test_human_bytes(n: int, text: str):
    assert human_bytes(n) == text


def _checkpoint_bytes(classifier: Classifier, optimizer: str) -> int:
    """A Lightning-layout checkpoint of ``classifier`` after one optimiser step, as torch.save writes it."""
    params = list(classifier.parameters())
    opt = torch.optim.AdamW(params) if optimizer == "adamw" else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    classifier(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save({"state_dict": {f"classifier.{k}": v for k, v in classifier.state_dict().items()},
                "optimizer_states": [opt.state_dict()], "epoch": 1, "global_step": 1}, buffer)
    return len(buffer.getvalue())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_estimate_covers_a_real_run_folder(optimizer: str):
    classifier = Classifier(timm.create_model("test_efficientnet", pretrained=False, num_classes=5), 5)
    weights = sum(t.numel() for t in classifier.state_dict().values())
    trained = sum(p.numel() for p in classifier.parameters())
    checkpoint = _checkpoint_bytes(classifier, optimizer)
    safetensors_bytes = len(safetensors.torch.save(runs.export_state_dict(classifier)))
    pt2 = io.BytesIO()
    torch.export.save(torch.export.export(classifier.eval(), (torch.randn(1, 3, 32, 32),)), pt2)
    # best.ckpt, last.ckpt and one being replaced; model.safetensors, export/model.safetensors, model.pt2
    real = 3 * checkpoint + 2 * safetensors_bytes + len(pt2.getvalue())
    estimate = run_bytes_needed(weights, trained, optimizer=optimizer, formats=("safetensors", "pt2"))
    assert real <= estimate
    counted = (estimate - MARGIN_BYTES) / (1 + MARGIN_FRACTION)  # the sum before the margin: each part counted once
    assert 0.8 * real < counted < 1.2 * real, counted / real


def test_estimate_counts_each_part():
    base = run_bytes_needed(10**8)
    assert run_bytes_needed(10**8, 10**8, optimizer="adamw") > run_bytes_needed(10**8, 10**8, optimizer="sgd") > base
    assert run_bytes_needed(10**8, 10**8) == base  # no optimiser: the checkpoints hold weights only
    assert run_bytes_needed(10**8, formats="onnx,torchscript") > run_bytes_needed(10**8, formats=("onnx",)) > base
    assert run_bytes_needed(10**8, checkpoints=3) > base
    assert run_bytes_needed(10**8, cached_features=1000 * 2 * 512) > base
