"""Command line: the only place that knows about arguments.

Each command checks its arguments with `finetune.arguments` before anything heavy is imported, built or
written, then makes one call of the Python API and prints the result. One room per kind of command, each with
one parser builder per command next to the command itself:

    fit.py        fit
    data.py       inspect, doctor, check, lr-find (commands on an image folder)
    trained.py    export, predict, evaluate, report (commands on a trained model)
    listings.py   recipes, models
    tune.py       tune (a hyperparameter search on an image folder)

The commands print through this package's `out` and `console`, looked up when they run (``from . import out``
inside the function), so that a test can swap them.
"""

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

from . import data, fit, listings, trained, tune

console = Console(stderr=True)
out = Console()

EPILOG = "Docs: README.md. Every command takes --help."


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="finetune", description="Transfer learning for image classification: fit, inspect, export.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fit.add_fit(sub)
    listings.add_recipes(sub)
    listings.add_models(sub)
    data.add_inspect(sub)
    data.add_doctor(sub)
    data.add_check(sub)
    data.add_lr_find(sub)
    tune.add_tune(sub)
    trained.add_export(sub)
    trained.add_predict(sub)
    trained.add_evaluate(sub)
    trained.add_report(sub)
    listings.add_cache(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("finetune").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        quiet_lightning()
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning_fabric")


def quiet_lightning() -> None:
    """Lightning's INFO lines (devices found, logger tips) say nothing about this run that fit does not."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user error (`FinetuneError`) is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..errors import FinetuneError, Interrupted

    try:
        return args.handler(args)
    except (FinetuneError, FileExistsError, FileNotFoundError, argparse.ArgumentTypeError) as e:
        # soft_wrap: one line whatever the terminal's width, so that it can be grepped and quoted
        console.print("[bold red]error:[/]", escape(str(e)), highlight=False, soft_wrap=True)
        return getattr(e, "exit_status", 2)  # 3: training diverged (model/guard.py)
    except Interrupted as e:
        console.print(escape(str(e)), highlight=False, soft_wrap=True)
        return 128 + e.signum  # the shell's code for "ended by this signal"
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def run() -> None:
    """The ``finetune`` console script: ``main()``, then an exit that skips the interpreter's teardown.

    Tearing down the module graph of torch, torchvision and timm at exit takes 0.9 s for torch alone and about
    2 s for what ``fit`` imports, on a 2-core CPU: time a user waits for nothing once the command has written,
    closed and flushed everything. Library ``atexit`` handlers run first, as in a normal exit; only the
    module teardown is skipped. An exception out of ``main()`` takes the normal exit path, with its traceback.
    """
    import atexit

    code = main()
    atexit._run_exitfuncs()  # what a normal exit runs first: logging.shutdown, temporary-directory cleanup, ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
