"""The built wheel works on its own: installed into a fresh venv, run from outside the source tree."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from imagefolders import make_image_folder

from finetune import recipes

REPO = Path(__file__).resolve().parents[1]


def run(*command: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def build_wheel(out: Path, cwd: Path) -> Path:
    """`pip wheel` of the checkout; without build isolation when hatchling is installed (no network), else pip
    fetches hatchling from the index into an isolated build environment."""
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", out, REPO, cwd=cwd)
    (wheel,) = out.glob("finetune_kit-*.whl")
    return wheel


def venv_with_dev_packages(root: Path, cwd: Path) -> Path:
    """A fresh venv that sees the dev environment's packages (torch, timm, ...) through a .pth file, so
    installing the wheel with --no-deps needs no network. The dev environment's own .pth files (its editable
    install of the checkout) are not processed: a .pth line only adds a path."""
    run(sys.executable, "-m", "venv", root, cwd=cwd)
    purelib = run(root / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                  cwd=cwd).strip()
    Path(purelib, "dev-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


@pytest.mark.slow  # builds a wheel and a venv, and may fetch hatchling from PyPI: a minute or more
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    wheel = build_wheel(tmp_path / "dist", cwd=work)
    venv = venv_with_dev_packages(tmp_path / "venv", cwd=work)
    run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=work)

    imported = run(venv / "bin" / "python", "-c", "import finetune; print(finetune.__file__)", cwd=work).strip()
    assert Path(imported).is_relative_to(venv) and not Path(imported).is_relative_to(REPO), imported

    listing = run(venv / "bin" / "finetune", "recipes", cwd=work)
    assert all(name in listing for name in recipes.names()) and len(recipes.names()) == 4

    data = make_image_folder(work / "data", per_class=8)
    run(venv / "bin" / "finetune", "fit", data, "--model", "test_efficientnet", "--no-pretrained", "--epochs", "1",
        "--set", "head_stages=2", "--no-export", "--no-progress", "--workers", "0", "--out", work / "run", cwd=work)
    assert (work / "run").is_dir()
    assert {"config.json", "summary.json"} <= {p.name for p in (work / "run").iterdir()}, sorted(
        p.name for p in (work / "run").iterdir())
