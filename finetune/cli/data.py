"""`finetune inspect`, `finetune doctor`, `finetune check` and `finetune lr-find`: the commands that look at an
image folder before training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .. import arguments as check
from ..arguments import MAX_PROCESSES
from ..errors import UsageError

DATA_DIR = "an image folder DIR/<class>/<images> (or the root of --labels paths)"
LABELS = "a labels CSV with path,label[,split] rows"


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="measure data size and domain gap, and say which recipe auto would pick",
                       description="Prints the measurements `fit --recipe auto` acts on, without training: images "
                                   "per class against the small/large threshold, and the domain gap (how far the "
                                   "images are from ImageNet, from the backbone's BatchNorm statistics).")
    p.set_defaults(handler=cmd_inspect)
    p.add_argument("data", metavar="DIR", help="image folder")
    p.add_argument("--model", help="timm backbone with pretrained weights (default tf_efficientnet_lite0)")
    p.add_argument("--labels", metavar="FILE.csv", help="labels CSV (path,label[,split]) instead of folders")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_inspect(args: argparse.Namespace) -> int:
    check.existing_dir("DIR", args.data, DATA_DIR)
    if args.labels is not None:
        check.existing_file("--labels", args.labels, LABELS)
    from ..recipe_choice import inspect_dataset
    from ..recipes import SMALL_DATA_IMAGES_PER_CLASS
    from . import out

    result = inspect_dataset(args.data, model=args.model, labels=args.labels)
    if args.json:
        out.print_json(json.dumps(result.to_dict()))
        return 0
    table = Table(title=escape(f"{result.data_dir}"))
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_row("classes", str(len(result.classes)), "")
    table.add_row("train / val / test images", f"{result.train_images} / {result.val_images} / {result.test_images}",
                  "")
    table.add_row("training images per class", f"{result.images_per_class:.1f}", f"{SMALL_DATA_IMAGES_PER_CLASS}")
    gap = result.domain_gap
    table.add_row(f"domain gap ({result.model})", "n/a" if gap is None else f"{gap.score:.3f}",
                  "" if gap is None else f"{gap.threshold}")
    out.print(table)
    out.print(f"recipe auto would choose: [bold]{result.recipe}[/] ({escape(result.reason)})")
    return 0


def add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="find, explain and quarantine bad files in an image folder",
                       description="Scan DIR (any layout fit accepts) for unreadable, dangerous, mislabelled, "
                                   "leaking and unbalanced data. Exit status 0 when nothing blocks training, "
                                   "1 otherwise.")
    p.set_defaults(handler=cmd_doctor)
    p.add_argument("data", metavar="DIR", help="image folder")
    p.add_argument("--labels", metavar="FILE.csv", help="check the files of a labels CSV (path,label[,split])")
    p.add_argument("--json", action="store_true", help="print the report as JSON (a list of findings and counts)")
    p.add_argument("--quarantine", action="store_true",
                   help="move blocking files into DIR/_quarantine/<kind>/ with a manifest (nothing is deleted)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="as for fit: the split checked for leakage, in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="as for fit: 0 .. 2**32-1")
    p.add_argument("--workers", type=int, help="decoding processes (default: one per CPU, 0: none)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="re-check every file (results are cached by path, size and modification time)")
    p.add_argument("--max-rows", type=int, default=200, help="findings shown in the table, 0 or more (default 200)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def check_doctor(args: argparse.Namespace) -> None:
    check.existing_dir("DIR", args.data, DATA_DIR)
    if args.labels is not None:
        check.existing_file("--labels", args.labels, LABELS)
    check.fraction("--val-fraction", args.val_fraction)
    check.seed("--seed", args.seed)
    if args.workers is not None:
        check.non_negative_int("--workers", args.workers, MAX_PROCESSES)
    check.non_negative_int("--max-rows", args.max_rows, example=200)


def cmd_doctor(args: argparse.Namespace) -> int:
    check_doctor(args)
    from ..data import doctor
    from ..data.labels import read_labels_csv

    options = {"workers": args.workers, "cache": args.cache, "progress": args.progress and not args.json}
    if args.labels:
        splits = read_labels_csv(args.labels, args.data, val_fraction=args.val_fraction, seed=args.seed)
        report = doctor.diagnose_splits(splits, **options)
    else:
        report = doctor.diagnose(args.data, val_fraction=args.val_fraction, seed=args.seed, **options)
    if args.quarantine:
        doctor.quarantine(report)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))  # ensure_ascii: any file name survives
    else:
        print_doctor(report, args.max_rows)
    return 0 if report.ok else 1


def print_doctor(report, max_rows: int) -> None:
    from . import out

    _print_findings(report, max_rows)
    classes = Table(title=f"usable images per class (imbalance ratio {report.imbalance_ratio:.1f})")
    splits = list(report.class_counts)
    classes.add_column("class")
    for split in splits:
        classes.add_column(split, justify="right")
    names = sorted({name for counts in report.class_counts.values() for name in counts})
    for name in names:
        classes.add_row(escape(name), *(str(report.class_counts[s].get(name, "-")) for s in splits))
    out.print(classes)
    from ..data.doctor import display_path

    for move in report.quarantined:
        out.print(f"quarantined {escape(display_path(move['from']))} -> {escape(display_path(move['to']))}",
                  highlight=False)
    counts = report.counts()
    verdict = "nothing blocks training" if report.ok else f"{len(report.unresolved)} blocking problem(s)"
    out.print(f"{report.files} image files in {report.seconds:.1f} s ({report.cache_hits} cached): "
              f"{counts['blocking']} blocking, {counts['warning']} warnings, {counts['info']} info; {verdict}",
              highlight=False)


def _print_findings(report, max_rows: int) -> None:
    """The findings (at most ``max_rows``) and one fix per kind."""
    from ..data.doctor import display_path
    from . import out

    if not report.findings:
        return
    colours = {"blocking": "red", "warning": "yellow", "info": "cyan"}
    table = Table(title=escape(f"finetune doctor {display_path(report.root)}"))
    for column in ("severity", "kind", "path", "problem"):
        table.add_column(column, overflow="fold", no_wrap=column in ("severity", "kind"))
    for f in report.findings[:max_rows]:
        severity = f"[{colours[f.severity]}]{f.severity}[/]"
        table.add_row(severity, f.kind, escape(display_path(f.path)), escape(display_path(f.message)))
    out.print(table)
    if len(report.findings) > max_rows:
        out.print(f"... {len(report.findings) - max_rows} more findings (--max-rows, or --json for all)")
    fixes = Table(title="how to fix")
    fixes.add_column("kind", no_wrap=True)
    fixes.add_column("fix", overflow="fold")
    for kind, fix in dict.fromkeys((f.kind, f.fix) for f in report.findings):
        fixes.add_row(kind, escape(fix))
    out.print(fixes)


def add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="sanity checks before a real fit: first loss, overfitting a tiny subset, "
                                     "gradient flow, label signal, augmentations",
                       description="Runs the checks of finetune/check.py for the recipe fit would use and prints a "
                                   "pass/fail table. Exit status 0 when every check passes, 1 when one fails, "
                                   "2 for a usage error.")
    p.set_defaults(handler=cmd_check)
    p.add_argument("data", metavar="DIR", help="image folder")
    p.add_argument("--recipe", default="auto", help="auto (default: as fit would choose), a recipe name or file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    p.add_argument("--out", help="where the augmentation grid goes (default runs/<DIR name>-check)")
    p.add_argument("--seed", type=int, default=0, help="random seed, 0 .. 2**32-1 (default 0)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def cmd_check(args: argparse.Namespace) -> int:
    from .fit import parse_set

    check.existing_dir("DIR", args.data, DATA_DIR)
    check.seed("--seed", args.seed)
    overrides = parse_set(args.set)
    check.recipe_overrides("--set", args.recipe, overrides)
    from .. import recipes
    from ..check import run_checks, to_json
    from . import out

    if str(args.recipe) == "auto":
        from ..recipe_choice import inspect_dataset

        name = inspect_dataset(args.data, seed=args.seed).recipe
    else:
        name = args.recipe
    recipe = recipes.get(name).override(overrides)
    folder = Path(args.out) if args.out else Path("runs") / f"{Path(args.data).resolve().name}-check"
    results = run_checks(args.data, recipe, out=folder, seed=args.seed)
    if args.json:
        out.print_json(json.dumps({"recipe": recipe.name, "passed": all(r.passed for r in results),
                                   "checks": to_json(results)}))
    else:
        table = Table(title=escape(f"finetune check {args.data} ({recipe.name})"))
        for column in ("check", "result", "measured", "diagnosis"):
            table.add_column(column)
        for r in results:
            table.add_row(r.name, "[green]pass[/]" if r.passed else "[bold red]FAIL[/]", escape(r.measured),
                          escape(r.diagnosis))
        out.print(table)
    return 0 if all(r.passed for r in results) else 1


def add_lr_find(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lr-find", help="learning-rate range test: plot the loss against the rate, suggest an lr",
                       description="Trains the model as fit's first epoch would (after the probe, for the large-* "
                                   "recipes) for up to --num-steps batches while the learning rate grows from 1e-6 "
                                   "to 1 (Lightning's lr finder), then restores it. Writes lr_find.png, "
                                   "lr_find.csv and lr_find.json into --out and prints the suggested rate (the "
                                   "middle of the longest valley of the smoothed loss) with the fit command that "
                                   "uses it; `fit --set lr=auto` runs the same sweep itself. Exit status 0, 1 when "
                                   "the curve has no valley, 2 for a usage error (a recipe without a learning "
                                   "rate: small-* with cached features).")
    p.set_defaults(handler=cmd_lr_find)
    p.add_argument("data", metavar="DIR", help="image folder")
    p.add_argument("--recipe", default="auto", help="auto (default: as fit would choose), a recipe name or file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    p.add_argument("--out", help="where the plot and the curve go (default runs/<DIR name>-lr-find)")
    p.add_argument("--seed", type=int, default=0, help="random seed, 0 .. 2**32-1 (default 0)")
    p.add_argument("--num-steps", type=int, default=100, metavar="N",
                   help="training batches of the sweep at most, 20 or more (default 100; it stops early once the "
                        "loss blows up)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def cmd_lr_find(args: argparse.Namespace) -> int:
    import shlex

    from .fit import parse_set

    check.existing_dir("DIR", args.data, DATA_DIR)
    check.seed("--seed", args.seed)
    check.positive_int("--num-steps", args.num_steps, example=100)
    if args.num_steps < 20:
        raise UsageError(f"--num-steps {args.num_steps}: the suggestion needs a curve of at least 20 steps; "
                               "for example --num-steps 100")
    if args.out is not None:
        check.output_dir("--out", args.out)
    overrides = check.auto_lr(parse_set(args.set))[1]  # lr-find ignores the recipe's lr: it sweeps it
    check.recipe_overrides("--set", args.recipe, overrides)
    if str(args.recipe) != "auto":
        check.has_learning_rate(f"--recipe {args.recipe}", check.recipe("--recipe", args.recipe).override(overrides))
    from ..train import lr_find
    from . import out, quiet_lightning

    if not args.verbose:
        quiet_lightning()  # importing pytorch_lightning just set its logger back to INFO
    folder = Path(args.out) if args.out else Path("runs") / f"{Path(args.data).resolve().name}-lr-find"
    finding = lr_find(args.data, args.recipe, overrides=overrides, out=folder, seed=args.seed,
                      steps=args.num_steps, progress=args.progress and not args.json)
    command = ["finetune", "fit", args.data] + (["--recipe", str(args.recipe)] if str(args.recipe) != "auto" else [])
    command += [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    command += ["--set", f"lr={finding.lr:.2g}"]
    if args.json:
        out.print_json(json.dumps(finding.to_summary() | {"folder": str(folder), "command": shlex.join(command)}))
        return 0
    stopped = " (stopped early: the loss blew up)" if finding.stopped_early else ""
    out.print(f"lr-find on {escape(finding.recipe)}: {len(finding.lrs)} of {finding.steps} steps{stopped}, lr "
              f"{finding.lrs[0]:.2g} to {finding.lrs[-1]:.2g}, training {finding.trained}, in "
              f"{finding.seconds:.0f} s", highlight=False)
    out.print(f"suggested lr [bold]{finding.lr:.2g}[/] ({finding.rule}: the middle of the longest valley of the "
              f"smoothed loss); plot {escape(str(folder / 'lr_find.png'))}", highlight=False)
    out.print(f"use it: {escape(shlex.join(command))}", highlight=False)
    return 0
