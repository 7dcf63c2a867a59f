"""`finetune fit`: the parser, the argument check and the final table (what the numbers are, and which split
selected the model)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from ..arguments import FIT_STRATEGIES, check_fit_arguments, existing_dir
from ..device import ACCELERATORS
from ..errors import UsageError
from ..formats import DEFAULT_FORMATS

# fit()'s parameters as the command line spells them, for the errors of check_fit_arguments
OPTION_NAMES = {
    "data_dir": "DIR", "recipe": "--recipe", "overrides": "--set", "val_fraction": "--val-fraction",
    "seed": "--seed", "num_workers": "--workers", "epochs": "--epochs", "batch_size": "--batch-size",
    "labels": "--labels", "split_file": "--split", "weights": "--weights", "out": "--out", "domain": "--domain",
    "precision": "--precision", "feature_backend": "--feature-backend", "export": "--export",
    "devices": "--devices", "num_nodes": "--num-nodes", "strategy": "--strategy",
    "checkpoint_every": "--checkpoint-every",
}
SPLIT_NAMES = {"val": "validation", "test": "test"}


def add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fine-tune a pretrained backbone on an image folder",
                       description="Fine-tune on DIR/<class>/*.jpg or DIR/{train,val[,test]}/<class>/*.jpg; "
                                   "writes a run folder with the resolved recipe, checkpoints, metrics and the "
                                   "model (model.safetensors + config.json).")
    p.set_defaults(handler=cmd_fit)
    p.add_argument("data", metavar="DIR", nargs="?", help="image folder (not with --resume)")
    p.add_argument("--recipe", default="auto",
                   help="auto (default: chosen from images per class and --domain), a built-in recipe name "
                        "(see `finetune recipes`) or a .toml recipe file")
    p.add_argument("--domain", choices=("auto", "similar", "different"), default="auto",
                   help="how close the images are to ImageNet photos, for --recipe auto; auto (default) measures "
                        "it from the backbone's BatchNorm statistics (see `finetune inspect`)")
    p.add_argument("--model", help="timm backbone name (default: the recipe's, tf_efficientnet_lite0)")
    p.add_argument("--ensemble", metavar="BACKBONE,BACKBONE,...",
                   help="several frozen backbones side by side, their features concatenated under one head: "
                        "the first is --model, the others the recipe field ensemble (frozen-backbone recipes)")
    p.add_argument("--weights", help="local pretrained weights (.safetensors, or .pth loaded with weights_only)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="start from random weights (no transfer)")
    p.add_argument("--epochs", type=int, help="training epochs, at least 1 (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="images per batch, at least 1 (default: the recipe's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set lr=3e-4 --set head_dropout=0.2 (repeatable)")
    p.add_argument("--out", help="run folder, new or empty (default runs/<data>-<recipe>[-N])")
    p.add_argument("--split", help="reuse the split.json of an earlier run")
    p.add_argument("--labels", metavar="FILE.csv",
                   help="path,label[,split] rows instead of class folders; paths relative to DIR")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="validation share in (0, 1) when DIR has no val/ folder (default 0.2, stratified)")
    p.add_argument("--seed", type=int, default=0, help="random seed, 0 .. 2**32-1 (default 0)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32", "16"), default="auto",
                   help="auto: bf16 + channels_last where the hardware has bf16, else fp32")
    p.add_argument("--feature-backend", choices=("auto", "onnx", "torch"), default="auto",
                   help="what runs the frozen backbone's one-off passes (domain gap, cached features): auto is "
                        "onnxruntime on a CPU (faster there: docs/benchmarks.md), PyTorch on a GPU")
    p.add_argument("--workers", type=int, help="data-loading processes, 0 or more (default: from the CPU count)")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="auto",
                   help="where to compute: auto (a CUDA GPU, else Apple MPS, else the CPU), cpu, gpu or mps")
    p.add_argument("--devices", type=int, default=1,
                   help="devices (GPUs, or CPU processes) per machine; more than 1 trains with --strategy")
    p.add_argument("--num-nodes", type=int, default=1, help="machines, each with --devices (torchrun or SLURM)")
    p.add_argument("--strategy", choices=FIT_STRATEGIES, default="auto",
                   help="Lightning's multi-device strategy: auto (ddp), ddp, fsdp (CUDA only)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also write the resumable checkpoint every N optimizer steps (default: after each epoch)")
    p.add_argument("--resume", metavar="RUN",
                   help="continue the interrupted run RUN with the arguments it was started with (give no DIR)")
    p.add_argument("--export", default=",".join(DEFAULT_FORMATS),
                   metavar="FORMATS",
                   help="formats exported (and parity-checked) into RUN/export at the end: any of safetensors, "
                        "onnx, pt2 (torch.export) (default safetensors,onnx)")
    p.add_argument("--no-export", dest="export", action="store_const", const="", help="skip the export")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="one log line per phase instead of progress bars")


def parse_set(values: Sequence[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items -> {KEY: VALUE}; the recipe parses the values."""
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE; for example --set lr=3e-4")
        result[key.strip()] = value.strip()
    return result


def check_fit(args: argparse.Namespace) -> dict[str, str]:
    """Every argument of `fit`, checked before torch is imported; returns the parsed ``--set`` overrides."""
    if args.resume is not None:
        if args.data is not None:
            raise UsageError(f"--resume {args.resume} continues that run on the data it was started with; "
                             f"drop DIR ({args.data})")
        existing_dir("--resume", args.resume, "the folder of an interrupted `finetune fit` run")
        return {}
    if args.data is None:
        raise UsageError("finetune fit: give the image folder DIR (or --resume RUN to continue a run)")
    overrides = parse_set(args.set)
    if args.ensemble is not None:
        names = [name.strip() for name in args.ensemble.split(",")]
        if len(names) < 2 or not all(names):
            raise UsageError(f"--ensemble {args.ensemble}: give two or more backbone names separated by commas, "
                             "e.g. --ensemble tf_efficientnet_lite0,mobilenetv2_100")
        if args.model is not None or "ensemble" in overrides:
            raise UsageError("--ensemble names every backbone, the first being the model: drop --model and "
                             "--set ensemble=...")
        args.model, overrides["ensemble"] = names[0], ",".join(names[1:])
    check_fit_arguments(
        data_dir=args.data, recipe=args.recipe, overrides=overrides, model=args.model, pretrained=args.pretrained,
        val_fraction=args.val_fraction, seed=args.seed, num_workers=args.workers, epochs=args.epochs,
        batch_size=args.batch_size, labels=args.labels, split_file=args.split, weights=args.weights, out=args.out,
        domain=args.domain, precision=args.precision, feature_backend=args.feature_backend, export=args.export,
        devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
        checkpoint_every=args.checkpoint_every, names=OPTION_NAMES,
    )
    return overrides


def cmd_fit(args: argparse.Namespace) -> int:
    overrides = check_fit(args)
    from ..train import fit
    from . import quiet_lightning

    if not args.verbose:
        quiet_lightning()  # importing pytorch_lightning just set its logger back to INFO
    result = fit(
        args.data, args.recipe, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        overrides=overrides, domain=args.domain, out=args.out, split_file=args.split,
        val_fraction=args.val_fraction, seed=args.seed, precision=args.precision,
        feature_backend=args.feature_backend, weights=args.weights,
        pretrained=args.pretrained, num_workers=args.workers, progress=args.progress, accelerator=args.accelerator,
        devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
        checkpoint_every=args.checkpoint_every, resume=args.resume, export=args.export or None, labels=args.labels,
    )
    if result.summary:  # rank 0 of a multi-process run, or the only process
        print_fit_result(result)
    return 0


def fit_splits(result: Any) -> dict[str, Mapping[str, float]]:
    """The metrics of each evaluated split, validation first; test only when the data had a test split.

    Reads the FitResult with ``.val``/``.test`` and also the older one with ``.metrics`` (validation) and
    ``summary["test"]``."""
    val = getattr(result, "val", None) or result.metrics
    test = getattr(result, "test", None) or result.summary.get("test") or {}
    return {"val": val, "test": test} if test else {"val": val}


def selection(summary: Mapping[str, Any]) -> str:
    """How the model was selected, in words (the summary says so; older summaries only have a best epoch)."""
    if summary.get("selection"):
        return str(summary["selection"])
    best = summary.get("best_epoch")
    if best is not None:
        return f"best epoch {best} of {summary.get('epochs_run', '?')} on validation accuracy"
    return "validation accuracy (the probe's settings)" if summary.get("probe") else "validation accuracy"


def headline(result: Any) -> str:
    """The last line: test accuracy when there is a held-out test split, else validation, labelled as such."""
    splits = fit_splits(result)
    split = getattr(result, "headline_split", None) or ("test" if "test" in splits else "val")
    accuracy = splits[split]["acc"]
    if split == "test":
        return f"test accuracy (held out): {accuracy:.4f}"
    return f"validation accuracy (also used for selection; no test split): {accuracy:.4f}"


def print_fit_result(result: Any) -> None:
    from . import out

    s = result.summary
    splits = fit_splits(result)
    title = f"{s['recipe']} on {s['data_dir']}: model selected by {selection(s)}"
    table = Table(title=escape(title), min_width=len(title))  # as wide as its title: the title on one line
    table.add_column("metric")
    for split in splits:
        table.add_column(SPLIT_NAMES.get(split, split), justify="right")
    for key in dict.fromkeys(k for metrics in splits.values() for k in metrics):
        table.add_row(key, *(_number(metrics.get(key)) for metrics in splits.values()))
    out.print(table)
    out.print(f"recipe: {s['recipe']} ({s['recipe_reason']})", markup=False, highlight=False)
    timings = s.get("timings", {})
    out.print(f"time: {timings.get('total_s', 0):.0f} s, {_number(s.get('train_images_per_s'), '.1f')} "
              f"training images/s, {s.get('skipped_files', 0)} skipped file(s)", highlight=False)
    if s.get("inference"):
        views, backbones = s["inference"]["views"], s["inference"]["backbones"]
        out.print(f"each prediction: {' + '.join(views)} through {' + '.join(backbones)} "
                  f"({s['inference']['backbone_passes_per_image']} backbone pass(es) per image)", markup=False,
                  highlight=False)
    out.print(f"run folder: {result.run_dir}", markup=False, highlight=False)
    if (result.run_dir / "report.html").is_file():
        out.print(f"report: {result.run_dir / 'report.html'} (and report.md)", markup=False, highlight=False)
    out.print(headline(result), highlight=False)


def _number(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)
