"""Resume: a run killed mid-epoch (SIGKILL: nothing runs at exit) and resumed ends exactly as an uninterrupted
run; SIGTERM stops cleanly with a resumable checkpoint and the command that resumes it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from finetune.phases.resume import ResumePoint
from finetune.runs import read_epoch_metrics

# augmentation, dropout and stochastic depth on (large-different's): the resumed run must draw what the
# uninterrupted one drew. fp32 on the CPU with the same thread count is deterministic.
RUN = ["--recipe", "large-different", "--model", "test_efficientnet", "--no-pretrained",
       "--epochs", "3", "--set", "freeze_epochs=1", "--batch-size", "6",
       "--precision", "fp32", "--workers", "0", "--no-export", "--no-progress", "--accelerator", "cpu",
       "--checkpoint-every", "1"]
BATCHES = 6  # 36 training images / 6
WIDE = {**os.environ, "COLUMNS": "500"}  # log lines unwrapped


UNCACHED = ["--set", "cached_features=false"]  # every epoch through the network: the head warm-up is an epoch too


def _command(folder, out, *extra):
    return [sys.executable, "-m", "finetune", "fit", str(folder), *RUN, "--out", str(out), *extra]


def _kill_mid_epoch_after_unfreezing(folder, out) -> ResumePoint:
    """Start the run, SIGKILL it once its checkpoint is inside an epoch of the fine-tuning phase."""
    process = subprocess.Popen(_command(folder, out, *UNCACHED), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if last.is_file():
                point = ResumePoint.read(last)
                if point.epoch >= 1 and 1 <= point.batches_done <= BATCHES - 3:
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-3000:]
    return ResumePoint.read(last)  # a step or two later than when seen: the run went on while we looked


def test_a_killed_run_resumes_to_the_same_weights_bitwise(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=16, size=32, split=True)
    whole = subprocess.run(_command(folder, tmp_path / "whole", *UNCACHED), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = _kill_mid_epoch_after_unfreezing(folder, tmp_path / "killed")
    assert killed.epoch >= 1 and 0 < killed.batches_done < BATCHES, killed  # after the phase change, mid-epoch
    state = torch.load(killed.path, weights_only=True)
    assert state["callbacks"]["StagedFinetuning"]["phase"] == "finetune"
    assert not (tmp_path / "killed" / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "finetune", "fit", "--resume", str(tmp_path / "killed")],
                             capture_output=True, text=True, timeout=600, env=WIDE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {tmp_path / 'killed'} from epoch {killed.epoch + 1}" in resumed.stderr

    for name in ("model.safetensors",):
        a = safetensors.torch.load_file(tmp_path / "whole" / name)
        b = safetensors.torch.load_file(tmp_path / "killed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3 * BATCHES
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["val"] == \
        json.loads((tmp_path / "killed" / "summary.json").read_text())["val"]
    # the epochs before the kill are still in metrics.csv (Lightning's CSVLogger deletes it when it starts): the
    # resumed run picks its best epoch among all of them, as the uninterrupted one did
    scores = [[(r["epoch"], r["val/acc"]) for r in read_epoch_metrics(tmp_path / run / "metrics.csv") if "val/acc" in r]
              for run in ("whole", "killed")]
    assert scores[0] == scores[1] and len(scores[0]) >= 3  # the 3 epochs (and the final validation's row)


def test_sigterm_saves_a_resumable_checkpoint_and_the_resumed_run_reuses_the_probe(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=16, size=32, split=True)
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    printed = tmp_path / "stdout.txt"
    with printed.open("w") as stdout_file:  # LP-FT: the probe, then epochs
        process = subprocess.Popen(_command(folder, out), stdout=stdout_file, stderr=subprocess.PIPE, text=True,
                                   env=WIDE)
        # the phase line is logged once training has started (the signal handlers are in place): the stop comes
        # after the first step whatever the machine's speed, not in a race with the run's last steps
        seen = []
        for line in process.stderr:
            seen.append(line)
            if "finetune phase," in line:
                process.send_signal(signal.SIGTERM)
                break
        stderr = "".join(seen) + process.stderr.read()
        process.wait(timeout=120)
    stdout = printed.read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert f"resume with: finetune fit --resume {out}" in stdout + stderr
    assert ResumePoint.read(last).batches_done >= 1 and not (out / "summary.json").exists()
    assert (out / "probe.safetensors").is_file()

    resumed = subprocess.run([sys.executable, "-m", "finetune", "fit", "--resume", str(out)], capture_output=True,
                             text=True, timeout=600, env=WIDE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "validation features reused from" in resumed.stderr and "probe features:" not in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"].startswith("LP-FT") and summary["epochs_run"] == 2


@pytest.mark.parametrize("args, message", [
    (["fit", "--resume", "nowhere"], "--resume nowhere"),
    (["fit"], "give the image folder DIR"),
])
def test_resume_usage_errors(args, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr


def test_resume_refuses_a_recipe_edited_since_the_checkpoint(tmp_path, image_folder):
    folder = image_folder(tmp_path / "data", per_class=16, size=32, split=True)
    out = tmp_path / "run"
    first = subprocess.run(_command(folder, out, *UNCACHED, "--epochs", "1"), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "summary.json").unlink()  # as if it had been stopped after its last checkpoint
    recipe = out / "recipe.toml"
    recipe.write_text(recipe.read_text().replace("lr = 0.001", "lr = 0.01"))
    done = subprocess.run([sys.executable, "-m", "finetune", "fit", "--resume", str(out)], capture_output=True,
                          text=True, timeout=600, env=WIDE)
    assert done.returncode == 2 and "no longer matches the recipe its checkpoint trained with (lr)" in done.stderr
