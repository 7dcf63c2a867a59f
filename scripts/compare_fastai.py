"""Compare `finetune fit --recipe auto` with a default fastai fine-tune, side by side in one run (issue 5).

    python scripts/compare_fastai.py                            # writes bench/compare_fastai.json
    python scripts/compare_fastai.py --fastai-without-malloc-fix --out bench/compare_fastai.json

The peer: fastai 2.8's `vision_learner` + `fine_tune(2)` on the same train/val folders with the same pretrained
backbone (tf_efficientnet_lite0 and the ImageNet weights finetune embeds). The target: finetune reaches at
least 0.85 validation accuracy in at most a tenth of fastai's wall time.

fastai is no dependency of finetune. On first use this script makes `.venv-fastai/`, a venv that sees the main
venv's packages through a `.pth` file (so torch, torchvision and timm are shared, never reinstalled) and pip-installs
fastai into it, constrained to the main venv's exact versions; later runs skip that step.

Each tool runs in its own child process (a fresh interpreter, the same environment and thread settings), timed
end to end by wall clock, imports and data loading included:
- fastai: `ImageDataLoaders.from_folder(item_tfms=Resize(224), bs=64)`, then `vision_learner(dls,
  "tf_efficientnet_lite0", metrics=accuracy)` (fastai's timm path: its default head, normalisation from the
  model's mean/std) and `fine_tune(2)`, after `set_seed(0)` (finetune's default seed). The weights reach timm as
  finetune's converted file (`pretrained_cfg_overlay=dict(file=...)`, the call `finetune.create_backbone` makes)
  because timm's hub is unreachable here. It runs with glibc's allocator fix in the environment
  (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736), which finetune applies in-process.
- finetune: `finetune fit DATA --no-progress --out TMP` (the defaults, `--recipe auto`), with an empty
  FINETUNE_CACHE holding only the converted weights, so its dataset pre-flight scan starts cold; and the same
  with `--no-export` (fit exports ONNX by default and checks it, which fastai's fine_tune has no counterpart of).
  Each runs --finetune-runs times (default 3: before, between and after the fastai runs); the median run counts.

The machine may be shared: before each run the script waits (up to --max-wait seconds) for the 1-minute load
average to drop below --max-load. It records the load before and after every run, the share of the CPUs the run
kept busy (`cpu_share`) and the share that other processes used meanwhile (`others_share`, from /proc/stat). A run
during which others used more than --max-others-share was slowed by them: it is rerun (up to --retries times) and
listed as discarded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH = "tf_efficientnet_lite0"
FASTAI_REQUIREMENT = "fastai>=2.8,<2.9"
MALLOC_FIX = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
PTH_NAME = "_finetune_main_venv.pth"
TARGET_ACCURACY = 0.85
TARGET_TIME_FRACTION = 0.1  # finetune's wall time must be at most this fraction of fastai's
CHILD_TIMEOUT_S = 3600
# `finetune fit` as the user runs it, and without the export it does at the end (ONNX tracing + parity checks),
# which fastai's fine_tune has no counterpart of.
FINETUNE_VARIANTS = {"default": [], "no_export": ["--no-export"]}


# ---------------------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/scripts/test_compare_fastai.py).


def pth_line(site_packages: str | Path) -> str:
    """A .pth line that adds the main venv's site-packages *and* runs its own .pth files (editable installs)."""
    return f"import site; site.addsitedir({str(site_packages)!r})\n"


def constraints_from_freeze(freeze: str) -> str:
    """`pip freeze` output -> a constraints file pinning every `name==version` (editable/URL lines dropped)."""
    pins = [line.strip() for line in freeze.splitlines() if "==" in line and not line.lstrip().startswith(("-", "#"))]
    return "\n".join(pins) + "\n"


def targets(finetune_acc: float, finetune_s: float, fastai_s: float) -> dict:
    """Whether finetune meets issue 5's bar against the measured fastai time."""
    limit = fastai_s * TARGET_TIME_FRACTION
    accuracy_ok, time_ok = finetune_acc >= TARGET_ACCURACY, finetune_s <= limit
    return {"accuracy_min": TARGET_ACCURACY, "time_max_s": round(limit, 1), "accuracy_ok": accuracy_ok,
            "time_ok": time_ok, "met": accuracy_ok and time_ok}


def finetune_result(summary: dict, wall_s: float) -> dict:
    """The comparison's view of a finetune run's summary.json."""
    test = summary.get("test") or {}
    return {"accuracy": round(summary["val"]["acc"], 4), "test_accuracy": round(test["acc"], 4) if test else None,
            "wall_s": round(wall_s, 1), "recipe": summary["recipe"],
            "recipe_reason": summary["recipe_reason"], "in_process_s": round(summary["timings"]["total_s"], 1),
            "timings": summary["timings"], "epochs_run": summary["epochs_run"], "precision": summary["precision"],
            "train_images": summary["train_images"], "val_images": summary["val_images"]}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Setup: data and the fastai venv.


def _run(command: list, **kwargs) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(map(str, command))}` failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def ensure_data(data: Path, python: Path) -> None:
    if (data / "train").is_dir() and (data / "val").is_dir():
        return
    print(f"making {data} with scripts/make_fashion_mnist.py", file=sys.stderr)
    _run([python, REPO / "scripts/make_fashion_mnist.py", "--out", data, "--per-class", "100",
          "--val-per-class", "100", "--test-per-class", "100"])


def _python_says(python: Path, code: str) -> str:
    return _run([python, "-c", code]).strip()


def _pip_location(python: Path, package: str) -> str | None:
    shown = subprocess.run([str(python), "-m", "pip", "show", "--disable-pip-version-check", package],
                           capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("Location:")), None)


def ensure_fastai_venv(venv: Path, main_python: Path) -> dict:
    """`venv` with fastai installed on top of the main venv's packages; idempotent. Returns what it found."""
    main_site = _python_says(main_python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv}", file=sys.stderr)
        _run([main_python, "-m", "venv", venv])  # venv builds on the base interpreter of the main venv
    own_site = Path(_python_says(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    pth = own_site / PTH_NAME
    if not pth.is_file() or pth.read_text() != pth_line(main_site):
        pth.write_text(pth_line(main_site))
    torch_at = _pip_location(python, "torch")  # pip itself must see torch as installed, in the main venv
    if torch_at is None or Path(torch_at).resolve() != Path(main_site).resolve():
        raise SystemExit(f"pip in {venv} sees torch at {torch_at}, not in the main venv's {main_site}")
    installed = _python_says(python, "import importlib.metadata as m\ntry: print(m.version('fastai'))\n"
                                     "except m.PackageNotFoundError: print('')")
    if not installed:
        print(f"installing {FASTAI_REQUIREMENT} into {venv} (constrained to the main venv's versions)",
              file=sys.stderr)
        freeze = _run([main_python, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"])
        with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="main-venv-") as constraints:
            constraints.write(constraints_from_freeze(freeze))
            constraints.flush()
            _run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", constraints.name,
                  FASTAI_REQUIREMENT])
    for shared in ("torch", "torchvision", "timm"):  # pip must have added none of these to the fastai venv
        if list(own_site.glob(f"{shared}-*.dist-info")):
            raise SystemExit(f"{shared} was installed into {own_site}; it must come from {main_site}")
    return {"venv": str(venv), "shares": main_site, "torch_from": torch_at,
            "fastai": _python_says(python, "import importlib.metadata as m; print(m.version('fastai'))"),
            "installed_now": not installed}


# ---------------------------------------------------------------------------------------------------------
# The children.


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_for_quiet(max_load: float, max_wait: float) -> dict:
    started = time.monotonic()
    while os.getloadavg()[0] >= max_load and time.monotonic() - started < max_wait:
        time.sleep(10)
    return {"load_average": _load(), "waited_s": round(time.monotonic() - started), "max_load": max_load,
            "quiet": os.getloadavg()[0] < max_load}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every finished descendant (data-loader workers too)
    return usage.ru_utime + usage.ru_stime


def _machine_busy_s() -> float:
    """CPU seconds spent by everything on the machine since boot (Linux /proc/stat, all CPUs, not idle/iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def timed_child(command: list, env: dict, log: Path) -> tuple[float, dict]:
    """Run `command` to completion; wall seconds, its CPU seconds, and what shows how much of the machine it had:
    `others_share`, the CPU time everything else used meanwhile as a share of the machine's capacity."""
    before, cpu, busy = _load(), _children_cpu_s(), _machine_busy_s()
    started = time.perf_counter()
    with open(log, "w") as sink:
        code = subprocess.run([str(c) for c in command], env=env, stdout=sink, stderr=subprocess.STDOUT,
                              timeout=CHILD_TIMEOUT_S, cwd=REPO).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"`{' '.join(map(str, command))}` failed ({code}); its log ends:\n"
                         f"{log.read_text()[-4000:]}")
    cpu, busy = _children_cpu_s() - cpu, _machine_busy_s() - busy
    capacity = wall * (os.cpu_count() or 1)
    return wall, {"cpu_s": round(cpu, 1), "cpu_share": round(cpu / capacity, 2),
                  "others_share": round(max(busy - cpu, 0.0) / capacity, 3), "load_before": before,
                  "load_after": _load()}


def run_fastai(python: Path, data: Path, weights: Path, tmp: Path, malloc_fix: bool) -> dict:
    out = tmp / f"fastai-{int(malloc_fix)}.json"
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_FIX} | (MALLOC_FIX if malloc_fix else {})
    command = [python, Path(__file__).resolve(), "--_fastai-child", out, "--data", data, "--weights-file", weights]
    wall, load = timed_child(command, env, tmp / f"fastai-{int(malloc_fix)}.log")
    return {**json.loads(out.read_text()), "wall_s": round(wall, 1), "malloc_fix": malloc_fix, **load}


def run_finetune(main_python: Path, data: Path, weights: Path, tmp: Path, extra: list[str]) -> dict:
    cache = tmp / "finetune-cache"  # cold pre-flight scan; the converted weights are ready, as for fastai
    cache.mkdir()
    shutil.copy2(weights, cache / weights.name)
    env = dict(os.environ, FINETUNE_CACHE=str(cache))
    run_dir = tmp / "finetune-run"
    command = [main_python.parent / "finetune", "fit", data, "--no-progress", "--out", run_dir, *extra]
    wall, load = timed_child(command, env, tmp / "finetune.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**finetune_result(summary, wall), "command": " ".join(map(str, command[1:])), **load}


def fastai_child(out: Path, data: Path, weights_file: Path, epochs: int = 2, size: int = 224, bs: int = 64,
                 seed: int = 0) -> None:
    """Runs in the fastai venv: a default fastai fine-tune, as in fastai's docs, on ARCH with `weights_file`."""
    started = time.perf_counter()
    import torch
    from fastai.vision.all import Callback, ImageDataLoaders, Resize, accuracy, set_seed, vision_learner

    imported = time.perf_counter()
    set_seed(seed)  # finetune's default seed; fastai's default is unseeded, which makes every run differ
    dls = ImageDataLoaders.from_folder(data, train="train", valid="val", item_tfms=Resize(size), bs=bs)
    # A string arch takes fastai's timm path (create_timm_model, TimmBody, default head, _timm_norm); extra
    # keywords go to timm.create_model, which loads the offline weights exactly as finetune.create_backbone does.
    learn = vision_learner(dls, ARCH, metrics=accuracy, pretrained_cfg_overlay={"file": str(weights_file)})
    checksum = state_checksum(learn.model[0].model)

    class EpochLog(Callback):  # recorder.values only keeps the last fit; fine_tune makes two
        order, rows = 51, []

        def after_epoch(self):
            self.rows.append([round(float(v), 4) for v in self.recorder.values[-1]])

    learn.add_cb(EpochLog())
    ready = time.perf_counter()
    learn.fine_tune(epochs)
    finished = time.perf_counter()
    train_loss, valid_loss, acc = learn.recorder.values[-1]
    import fastai
    import fastcore

    write_json(out, {
        "accuracy": round(float(acc), 4), "valid_loss": round(float(valid_loss), 4),
        "epochs": EpochLog.rows, "epoch_columns": ["train_loss", "valid_loss", "accuracy"],
        "in_process_s": {"imports": round(imported - started, 1), "data_and_model": round(ready - imported, 1),
                         "fine_tune": round(finished - ready, 1), "total": round(finished - started, 1)},
        "backbone_checksum": checksum, "head": str(learn.model[1]).splitlines()[1:],
        "after_batch": [type(t).__name__ + (f"(mean={t.mean.flatten().tolist()}, std={t.std.flatten().tolist()})"
                                            if hasattr(t, "mean") else "") for t in dls.after_batch.fs],
        "train_images": len(dls.train_ds), "val_images": len(dls.valid_ds), "batch_size": bs, "seed": seed,
        "torch_threads": torch.get_num_threads(), "num_workers": dls.train.fake_l.num_workers,
        "versions": {"fastai": fastai.__version__, "fastcore": fastcore.__version__, "torch": torch.__version__},
    })


def state_checksum(model) -> float:
    """Sum of every floating tensor in the state dict: equal sums mean the same weights were loaded."""
    return round(sum(float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point()), 6)


def reference_backbone(main_python: Path) -> tuple[Path, float, int, dict]:
    """finetune's weight file for ARCH, the checksum of `create_backbone(ARCH, num_classes=0)`, torch threads."""
    code = (
        "import json, sys, timm, torch, finetune\n"
        "sys.path.insert(0, 'scripts'); from compare_fastai import state_checksum\n"
        "from finetune.model.offline_sources import offline_weights\n"
        f"m = finetune.create_backbone({ARCH!r}, pretrained=True, num_classes=0)\n"
        f"print(json.dumps([str(offline_weights({ARCH!r})), state_checksum(m), torch.get_num_threads(),\n"
        "  {'finetune': finetune.__version__, 'torch': torch.__version__, 'timm': timm.__version__,\n"
        "   'torchvision': __import__('torchvision').__version__}]))"
    )
    weights, checksum, threads, versions = json.loads(_run([main_python, "-c", code], cwd=REPO).splitlines()[-1])
    return Path(weights), checksum, threads, versions


# ---------------------------------------------------------------------------------------------------------


def schedule(rounds: int, variants: list[str], fastai_malloc_fix: list[bool]) -> list[tuple[str, str | bool]]:
    """Rounds of finetune runs (one per variant) before, between and after the fastai runs, so that a change of
    load hits both tools."""
    finetune_round = [("finetune", variant) for variant in variants]
    order = list(finetune_round) if rounds else []
    done = 1 if rounds else 0
    for fix in fastai_malloc_fix:
        order.append(("fastai", fix))
        if done < rounds:
            order += finetune_round
            done += 1
    return order + finetune_round * (rounds - done)


def summarise_finetune(runs: list[dict]) -> dict:
    """The median run (by wall time) stands for finetune; every run is kept."""
    median = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
    return {**{k: v for k, v in median.items() if k not in ("timings",)},
            "wall_s_runs": [r["wall_s"] for r in runs], "best_wall_s": min(r["wall_s"] for r in runs),
            "accuracy_runs": [r["accuracy"] for r in runs], "runs": runs}


def run_uncontended(folder: Path, args: argparse.Namespace, run) -> dict:
    """`run(tmp)` after waiting for a quiet machine; again (up to --retries times) when another job took the CPUs
    from it. The kept result lists the discarded attempts."""
    discarded: list[dict] = []
    for attempt in range(1 + args.retries):
        quiet = wait_for_quiet(args.max_load, args.max_wait)
        print(f"  load {quiet['load_average']} after waiting {quiet['waited_s']} s ...", file=sys.stderr)
        tmp = folder / str(attempt)
        tmp.mkdir(parents=True)
        result = {**run(tmp), "quiet_wait": quiet}
        result["contended"] = result["others_share"] > args.max_others_share
        print(f"  {result['accuracy']:.4f} in {result['wall_s']} s (cpu share {result['cpu_share']}, other jobs "
              f"{result['others_share']}"
              f"{', contended' if result['contended'] else ''})", file=sys.stderr)
        if not result["contended"] or attempt == args.retries:
            return {**result, "discarded_attempts": discarded}
        discarded.append({k: result[k] for k in ("wall_s", "cpu_share", "others_share", "load_before", "load_after",
                                                 "accuracy")})
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.fastai_child:
        fastai_child(args.fastai_child, args.data, args.weights_file)
        return 0
    variants = args.finetune_variants.split(",")
    if set(variants) - FINETUNE_VARIANTS.keys():
        raise SystemExit(f"--finetune-variants {args.finetune_variants!r}: choose from {list(FINETUNE_VARIANTS)}")
    main_python = args.python.absolute()  # not resolved: the venv's python is a link to the base interpreter
    data = args.data.absolute()
    ensure_data(data, main_python)
    setup = ensure_fastai_venv(args.fastai_venv.absolute(), main_python)
    weights, checksum, threads, versions = reference_backbone(main_python)
    fastai_python = args.fastai_venv.absolute() / "bin" / "python"
    start_load = _load()
    finetune_runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    fastai_runs: dict[bool, dict] = {}
    with tempfile.TemporaryDirectory(prefix="compare-fastai-") as tmp_name:
        order = schedule(args.finetune_runs, variants, [True] + [False] * args.fastai_without_malloc_fix)
        for i, (tool, variant) in enumerate(order):
            print(f"finetune fit ({variant})" if tool == "finetune" else
                  f"fastai fine_tune(2){'' if variant else ' without the allocator fix'}", file=sys.stderr)
            result = run_uncontended(Path(tmp_name) / str(i), args, lambda tmp, tool=tool, variant=variant: (
                run_finetune(main_python, data, weights, tmp, FINETUNE_VARIANTS[variant]) if tool == "finetune"
                else run_fastai(fastai_python, data, weights, tmp, malloc_fix=variant)))
            if tool == "finetune":
                finetune_runs[variant].append(result)
            else:
                fastai_runs[variant] = result
    fa = fastai_runs[True]
    report = {
        "command": "python scripts/compare_fastai.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": str(args.data), "backbone": ARCH, "weights_file": str(weights),
        "same_pretrained_weights": fa["backbone_checksum"] == checksum,
        "fastai": fa, "fastai_without_malloc_fix": fastai_runs.get(False),
        "finetune": {variant: summarise_finetune(runs) for variant, runs in finetune_runs.items()},
        "time_ratio_fastai_over_finetune": {},
        "targets": {},  # against fastai with the allocator fix, as finetune applies it too
        "targets_against_fastai_without_malloc_fix": {},
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "machine": platform.machine(), "torch_threads": threads, "load_average_start": start_load},
        "versions": {**versions, "python": platform.python_version(), **fa["versions"]},
        "fastai_venv": setup,
    }
    for variant, ft in report["finetune"].items():
        report["time_ratio_fastai_over_finetune"][variant] = round(fa["wall_s"] / ft["wall_s"], 1)
        report["targets"][variant] = targets(ft["accuracy"], ft["wall_s"], fa["wall_s"])
        if False in fastai_runs:
            report["targets_against_fastai_without_malloc_fix"][variant] = targets(
                ft["accuracy"], ft["wall_s"], fastai_runs[False]["wall_s"])
        t = report["targets"][variant]
        print(f"finetune ({variant}) {ft['accuracy']:.4f} in {ft['wall_s']} s (median of {len(finetune_runs[variant])})"
              f" vs fastai {fa['accuracy']:.4f} in {fa['wall_s']} s "
              f"({report['time_ratio_fastai_over_finetune'][variant]}x): targets {'met' if t['met'] else 'NOT met'}")
    write_json(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "data/fashion-mnist",
                   help="train/ and val/ image folders (made with make_fashion_mnist.py when missing)")
    p.add_argument("--out", type=Path, default=REPO / "bench/compare_fastai.json")
    p.add_argument("--python", type=Path, default=REPO / ".venv/bin/python", help="the main venv's python")
    p.add_argument("--fastai-venv", type=Path, default=REPO / ".venv-fastai")
    p.add_argument("--fastai-without-malloc-fix", action="store_true",
                   help="also run fastai without the glibc allocator fix (about 6 more minutes)")
    p.add_argument("--finetune-runs", type=int, default=3,
                   help="runs of each finetune variant, placed before, between and after the fastai runs; the "
                        "median counts")
    p.add_argument("--finetune-variants", default=",".join(FINETUNE_VARIANTS),
                   help="comma-separated: default (fit's defaults), no_export (--no-export)")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="before each run, wait for a 1-minute load average below this")
    p.add_argument("--max-wait", type=float, default=600, help="seconds to wait for it at most, each time")
    p.add_argument("--max-others-share", type=float, default=0.1,
                   help="a run during which other jobs used more than this share of the CPUs was slowed by them")
    p.add_argument("--retries", type=int, default=2, help="reruns of a run slowed by other jobs")
    p.add_argument("--_fastai-child", dest="fastai_child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--weights-file", type=Path, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    sys.exit(main())
