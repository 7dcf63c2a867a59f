"""`finetune tune`: a hyperparameter search (finetune/tune.py) on an image folder."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from .. import arguments as check
from .data import DATA_DIR

SAMPLERS = ("tpe", "random")


def add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="hyperparameter search (Optuna): many short fits, the best recipe as a file",
                       description="Runs fits of DIR with recipe fields drawn by Optuna (the fields that act on the "
                                   "recipe's training path), scores each on validation accuracy, prunes hopeless "
                                   "ones, and writes STUDY/best.toml for `finetune fit --recipe`. The study is "
                                   "kept in STUDY/study.db: running the same command again continues it.")
    p.set_defaults(handler=cmd_tune)
    p.add_argument("data", metavar="DIR", help="image folder")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (default 20)")
    p.add_argument("--budget-minutes", type=float, help="stop starting trials that would end after this many "
                                                        "minutes (default: no limit)")
    p.add_argument("--recipe", default="auto", help="auto (default: as fit would choose), a recipe name or file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a fixed recipe field, not searched (repeatable)")
    p.add_argument("--out", help="the study folder (default runs/tune-<DIR name>); an existing one is continued")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="tpe (default: random for the first 5 trials, then Optuna's TPE) or random")
    p.add_argument("--epochs-per-trial", type=int, default=3,
                   help="fine-tuning recipes: epochs per trial after the recipe's warm-up (default 3)")
    p.add_argument("--models", help="probe recipes: the backbones to try, comma-separated (default: the recipe's "
                                    "and every other one with weights on this machine: `finetune models`)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the fits and the sampler (default 0)")
    p.add_argument("--workers", type=int, help="data loader workers (default: from the CPU count)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_tune(args: argparse.Namespace) -> int:
    from .fit import parse_set

    check.existing_dir("DIR", args.data, DATA_DIR)
    check.positive_int("--trials", args.trials, maximum=10_000, example=20)
    if args.budget_minutes is not None and not check.finite_float("--budget-minutes", args.budget_minutes) > 0:
        raise check.UsageError(f"--budget-minutes {args.budget_minutes}: must be a positive number of minutes; "
                               "for example --budget-minutes 10")
    check.positive_int("--epochs-per-trial", args.epochs_per_trial, maximum=1000, example=3)
    check.seed("--seed", args.seed)
    if args.workers is not None:
        check.non_negative_int("--workers", args.workers, maximum=check.MAX_PROCESSES)
    overrides = parse_set(args.set)
    check.recipe_overrides("--set", args.recipe, overrides)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if args.models is not None and not models:
        raise check.UsageError(f"--models {args.models!r}: no backbone named; for example --models "
                               "tf_efficientnet_lite0,mobilenetv2_100")
    from ..tune import tune
    from . import out, quiet_lightning

    if not args.verbose:
        quiet_lightning()  # importing pytorch_lightning just set its logger back to INFO

    def on_trial(record: dict[str, Any]) -> None:
        if args.json:
            return
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["params"].items())
        score = f"val acc {record['value']:.4f}" if record["state"] == "complete" else f"pruned: {record['why']}"
        again = f" (again: trial {record['retry_of']} was killed)" if "retry_of" in record else ""
        out.print(escape(f"trial {record['number']}{again}: {score} in {record['seconds']:.1f} s ({params})"),
                  highlight=False, soft_wrap=True)

    result = tune(args.data, trials=args.trials, recipe=args.recipe, overrides=overrides, out=args.out,
                  budget_minutes=args.budget_minutes, sampler=args.sampler, seed=args.seed,
                  epochs_per_trial=args.epochs_per_trial, models=models, num_workers=args.workers, on_trial=on_trial)
    if args.json:
        out.print_json(json.dumps({"study_dir": str(result.study_dir), "best_trial": result.best_trial,
                                   "best_value": result.best_value, "best_params": result.best_params,
                                   "best_recipe": str(result.best_recipe), "stopped": result.stopped,
                                   "trials": result.trials}))
        return 0
    table = Table(title=escape(f"finetune tune {args.data}: {result.stopped}"))
    for column in ("trial", "state", "val acc", "seconds", "values"):
        table.add_column(column)
    for r in result.trials:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        mark = " *" if r["number"] == result.best_trial else ""
        table.add_row(f"{r['number']}{mark}", r["state"], value, f"{r['seconds'] or 0:.1f}", escape(values))
    out.print(table)
    out.print(escape(f"best: trial {result.best_trial}, validation accuracy {result.best_value:.4f}; its recipe: "
                     f"{result.best_recipe}, the plot: {result.study_dir / 'tune.png'}"), highlight=False,
              soft_wrap=True)
    out.print(escape(f"held-out score: finetune fit {args.data} --recipe {result.best_recipe} --seed {args.seed}"),
              highlight=False, soft_wrap=True)
    return 0
