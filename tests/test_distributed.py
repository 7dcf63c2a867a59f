"""A real two-process DDP fit on CPU processes (gloo), through the head warm-up and the unfreezing, against one
process on the same global batch."""

import csv
import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from finetune.data.sampling import EpochSampler
from finetune.runs import read_val_predictions

# no randomness beyond the data order: no augmentation, dropout or stochastic depth; SGD, whose step is linear
# in the gradient (Adam's first steps are sign(gradient) x lr, which float rounding can flip for tiny gradients)
DETERMINISTIC = ["--recipe", "large-different", "--model", "test_efficientnet", "--no-pretrained",
                 "--set", "cached_features=false", "--set", "hflip=0", "--set", "color_jitter=0",
                 "--set", "scale_min=1", "--set", "head_dropout=0", "--set", "drop_path=0",
                 "--set", "optimizer=sgd", "--set", "lr=0.05", "--epochs", "2", "--set", "freeze_epochs=1",
                 "--precision", "fp32", "--workers", "0", "--no-export", "--no-progress", "--accelerator", "cpu"]
# DDP averages the ranks' gradients and SyncBatchNorm sums their statistics: the same sums as one process,
# in another order. Measured: 1.1e-6 on the BatchNorm running variances, the largest difference; without
# synchronised BatchNorm the running statistics differ by 0.5.
TOLERANCE = 1e-4


def _fit(folder, out, *extra):
    done = subprocess.run([sys.executable, "-m", "finetune", "fit", str(folder), *DETERMINISTIC, "--out", str(out),
                           *extra], capture_output=True, text=True, cwd=out.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ddp_processes_train_like_one_process_on_the_same_global_batch(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=16, size=32, split=True)  # 36 training images
    ddp = _fit(folder, tmp_path / "ddp", "--devices", "2", "--strategy", "ddp", "--batch-size", "6")
    one = _fit(folder, tmp_path / "one", "--batch-size", "12")

    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    processes = summary["processes"]
    assert processes["world"] == 2 and processes["strategy"] == "DDPStrategy" and processes["global_batch"] == 12
    first, second = processes["final_weights_sha256"]
    assert first == second  # both ranks ended with identical weights and buffers

    ddp_state = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    one_state = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ddp_state["global_step"] == one_state["global_step"] == 6  # 3 global batches x 2 epochs
    assert ddp_state["callbacks"]["StagedFinetuning"]["phase"] == "finetune"  # it went through the unfreezing
    for name, value in one_state["state_dict"].items():
        other = ddp_state["state_dict"][name]
        if value.is_floating_point():
            assert (value - other).abs().max() <= TOLERANCE, name
        else:
            assert torch.equal(value, other), name
    one_val = json.loads((tmp_path / "one" / "summary.json").read_text())["val"]
    assert summary["val"] == pytest.approx(one_val, abs=TOLERANCE)

    # rank 0 alone wrote one complete run folder
    run = tmp_path / "ddp"
    for name in ("fit.json", "recipe.toml", "split.json", "classes.json", "metrics.csv", "curves.png",
                 "summary.json", "report.md", "model.safetensors", "config.json", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.partial")) and not (tmp_path / "runs").exists()
    with (run / "metrics.csv").open() as f:
        validated = [row for row in csv.DictReader(f) if row.get("val/acc")]
    assert [row["epoch"] for row in validated] == ["0", "1", "2"]  # each epoch once, then the final score
    assert ddp.stdout.count("run folder:") == one.stdout.count("run folder:") == 1


def test_each_rank_takes_its_share_of_the_global_order():
    one = list(EpochSampler(10, seed=3))
    ranks = [list(EpochSampler(10, seed=3, rank=r, world=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]  # padded to 12 by repeating the start of the order
    merged = [item for step in zip(*ranks, strict=True) for item in step]
    assert merged[:10] == one  # the same images with the same augmentation seeds, position by position
    assert [i for i, _ in merged[10:]] == [i for i, _ in one[:2]]


def test_a_resumed_epoch_leaves_out_what_it_trained_on():
    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume(2, 4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # only once: the next pass over epoch 2 is whole again
    sampler.set_epoch(3)
    assert list(sampler) != full


def test_two_processes_shard_the_frozen_passes_and_share_one_probe(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=16, size=32, split=True)
    probe = ["--recipe", "small-different", "--model", "test_efficientnet", "--no-pretrained", "--precision",
             "fp32", "--feature-backend", "torch", "--workers", "0", "--no-export", "--no-progress",
             "--accelerator", "cpu"]
    for out, extra in (("ddp", ["--devices", "2"]), ("one", [])):
        done = subprocess.run([sys.executable, "-m", "finetune", "fit", str(folder), *probe, "--out",
                               str(tmp_path / out), *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    ddp, one = (json.loads((tmp_path / out / "summary.json").read_text()) for out in ("ddp", "one"))
    assert ddp["processes"]["world"] == 2 and one["processes"]["world"] == 1
    # the same features, gathered from two shares: the same probe up to the order of the L-BFGS sums
    assert ddp["probe"]["weight_decay"] == one["probe"]["weight_decay"]
    assert ddp["val"] == pytest.approx(one["val"], abs=TOLERANCE)
    heads = [safetensors.torch.load_file(tmp_path / out / "probe.safetensors") for out in ("ddp", "one")]
    for name in ("weight", "bias", "mean", "std"):
        assert (heads[0][name] - heads[1][name]).abs().max() <= TOLERANCE, name
    assert torch.equal(heads[0]["val_labels"].sort().values, heads[1]["val_labels"].sort().values)
    # the report's predictions name the image of each row: the ranks' shares in turn, the same image's logits
    saved = [read_val_predictions(tmp_path / out) for out in ("ddp", "one")]
    assert saved[0].files != saved[1].files and sorted(saved[0].files) == sorted(saved[1].files)
    one_logits = dict(zip(saved[1].files, saved[1].logits, strict=True))
    for file, logits in zip(saved[0].files, saved[0].logits, strict=True):
        assert abs(logits - one_logits[file]).max() <= 1e-3, file
