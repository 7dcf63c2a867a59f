"""Command line: the only place that knows about arguments. Each command is one call of the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)
out = Console()

EPILOG = "Docs: README.md. Every command takes --help."


def _parse_set(values: Sequence[str]) -> dict[str, str]:
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"--set {item!r}: expected KEY=VALUE, for example --set lr=3e-4")
        result[key.strip()] = value.strip()
    return result


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="finetune", description="Transfer learning for image classification: fit, inspect, export.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="fine-tune a pretrained backbone on an image folder",
                       description="Fine-tune on DIR/<class>/*.jpg or DIR/{train,val[,test]}/<class>/*.jpg; "
                                   "writes a run folder with the resolved recipe, checkpoints, metrics and the "
                                   "model (model.safetensors + config.json).")
    p.add_argument("data", help="image folder")
    p.add_argument("--recipe", default="auto",
                   help="auto (default: chosen from images per class and --domain), a built-in recipe name "
                        "(see `finetune recipes`) or a .toml recipe file")
    p.add_argument("--domain", choices=("similar", "different"), default="similar",
                   help="how close the images are to ImageNet photos; used by --recipe auto (default similar)")
    p.add_argument("--model", help="timm backbone name (default: the recipe's, tf_efficientnet_lite0)")
    p.add_argument("--weights", help="local pretrained weights (.safetensors, or .pth loaded with weights_only)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="start from random weights (no transfer)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set lr=3e-4 --set head_dropout=0.2 (repeatable)")
    p.add_argument("--out", help="run folder (default runs/<data>-<recipe>[-N])")
    p.add_argument("--split", help="reuse the split.json of an earlier run")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="validation share when DIR has no val/ folder (default 0.2, stratified)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32", "16"), default="auto",
                   help="auto: bf16 + channels_last where the hardware has bf16, else fp32")
    p.add_argument("--workers", type=int, help="data-loading processes (default: from the CPU count)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    p = sub.add_parser("recipes", help="list the built-in recipes, or show one in full")
    p.add_argument("name", nargs="?", help="a recipe name")

    sub.add_parser("models", help="list backbones whose pretrained weights work offline")
    return parser


def cmd_fit(args: argparse.Namespace) -> int:
    from .train import fit

    result = fit(
        args.data, args.recipe, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        overrides=_parse_set(args.set), domain=args.domain, out=args.out, split_file=args.split,
        val_fraction=args.val_fraction, seed=args.seed, precision=args.precision, weights=args.weights,
        pretrained=args.pretrained, num_workers=args.workers, progress=args.progress,
    )
    s = result.summary
    table = Table(title=f"{s['recipe']} on {s['data_dir']}: best epoch {s['best_epoch']}")
    table.add_column("validation metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4f}")
    out.print(table)
    out.print(f"recipe: {s['recipe']} ({s['recipe_reason']})")
    out.print(f"time: {s['timings']['total_s']:.0f} s, {s['train_images_per_s']:.1f} training images/s, "
              f"{s['skipped_files']} skipped file(s)")
    out.print(f"run folder: {result.run_dir}")
    out.print(f"validation accuracy: {result.accuracy:.4f}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from . import recipes

    if args.name:
        out.print(recipes.source_text(args.name), markup=False, highlight=False)
        return 0
    table = Table(title="built-in recipes (finetune recipes NAME shows one in full)")
    for column in ("name", "backbone", "head", "epochs", "description"):
        table.add_column(column, no_wrap=column == "name")
    for name in recipes.names():
        r = recipes.get(name)
        trains = {0: "frozen", -1: "all unfrozen"}.get(r.unfreeze_stages, f"top {r.unfreeze_stages} stages")
        if r.trains_backbone:
            trains += f" after {r.freeze_epochs} epoch(s)"
        table.add_row(name, trains, r.head, str(r.epochs), r.description)
    out.print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .model.backbones import list_offline_backbones

    table = Table(title="backbones with offline ImageNet weights")
    for column in ("name", "params (M)", "input", "source", "available"):
        table.add_column(column, no_wrap=column == "name")
    for row in list_offline_backbones():
        size = "x".join(str(v) for v in row["input_size"][1:])
        table.add_row(row["name"], f"{row['params']:.1f}", size, row["source"], "yes" if row["available"] else "no")
    out.print(table)
    out.print("Any other timm name works with its own pretrained weights when reachable, "
              "with --weights FILE, or with --no-pretrained.")
    return 0


COMMANDS = {"fit": cmd_fit, "recipes": cmd_recipes, "models": cmd_models}


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("finetune").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning_fabric")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .errors import FinetuneError

    try:
        return COMMANDS[args.command](args)
    except (FinetuneError, FileExistsError, FileNotFoundError) as e:
        console.print("[bold red]error:[/]", escape(str(e)), highlight=False)
        return 2
    except argparse.ArgumentTypeError as e:
        console.print("[bold red]error:[/]", escape(str(e)), highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
