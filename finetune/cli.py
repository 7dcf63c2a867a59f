"""Command line: the only place that knows about arguments. Each command is one call of the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

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
    p.add_argument("--domain", choices=("auto", "similar", "different"), default="auto",
                   help="how close the images are to ImageNet photos, for --recipe auto; auto (default) measures "
                        "it from the backbone's BatchNorm statistics (see `finetune inspect`)")
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
    p.add_argument("--labels", metavar="FILE.csv",
                   help="path,label[,split] rows instead of class folders; paths relative to DIR")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="validation share when DIR has no val/ folder (default 0.2, stratified)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32", "16"), default="auto",
                   help="auto: bf16 + channels_last where the hardware has bf16, else fp32")
    p.add_argument("--feature-backend", choices=("auto", "onnx", "torch"), default="auto",
                   help="what runs the frozen backbone's one-off passes (domain gap, cached features): auto is "
                        "onnxruntime on a CPU (6x faster than fp32 PyTorch on AVX2), PyTorch on a GPU")
    p.add_argument("--workers", type=int, help="data-loading processes (default: from the CPU count)")
    p.add_argument("--export", default="safetensors,onnx", metavar="FORMATS",
                   help="formats exported (and parity-checked) into RUN/export at the end: any of safetensors, "
                        "onnx, torchscript (default safetensors,onnx)")
    p.add_argument("--no-export", dest="export", action="store_const", const="", help="skip the export")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    p = sub.add_parser("recipes", help="list the built-in recipes, or show one in full")
    p.add_argument("name", nargs="?", help="a recipe name")

    sub.add_parser("models", help="list backbones whose pretrained weights work offline")

    p = sub.add_parser("inspect", help="measure data size and domain gap, and say which recipe auto would pick",
                       description="Prints the measurements `fit --recipe auto` acts on, without training: images "
                                   "per class against the small/large threshold, and the domain gap (how far the "
                                   "images are from ImageNet, from the backbone's BatchNorm statistics).")
    p.add_argument("data", help="image folder")
    p.add_argument("--model", help="timm backbone with pretrained weights (default tf_efficientnet_lite0)")
    p.add_argument("--labels", metavar="FILE.csv", help="labels CSV (path,label[,split]) instead of folders")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("doctor", help="find, explain and quarantine bad files in an image folder",
                       description="Scan DIR (any layout fit accepts) for unreadable, dangerous, mislabelled, "
                                   "leaking and unbalanced data. Exit status 0 when nothing blocks training, "
                                   "1 otherwise.")
    p.add_argument("data", help="image folder")
    p.add_argument("--labels", metavar="FILE.csv", help="check the files of a labels CSV (path,label[,split])")
    p.add_argument("--json", action="store_true", help="print the report as JSON (a list of findings and counts)")
    p.add_argument("--quarantine", action="store_true",
                   help="move blocking files into DIR/_quarantine/<kind>/ with a manifest (nothing is deleted)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="as for fit: the split checked for leakage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="decoding processes (default: one per CPU, 0: none)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="re-check every file (results are cached by path, size and modification time)")
    p.add_argument("--max-rows", type=int, default=200, help="findings shown in the table (default 200)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    p = sub.add_parser("export", help="export a run's model, each format checked against the trained model",
                       description="Write RUN's model as safetensors (timm hub layout), ONNX and/or torch.export "
                                   "into --out (default RUN/export). Each export is compared with the trained "
                                   "model on validation images of the run at batch sizes 1 and 7; a mismatch is "
                                   "an error and nothing is written for that format.")
    p.add_argument("run", help="run folder written by `finetune fit`")
    p.add_argument("--format", default="safetensors,onnx",
                   help="comma-separated: safetensors, onnx, pt2 (torch.export; 'torchscript' is an alias, "
                        "TorchScript itself being deprecated). Default safetensors,onnx")
    p.add_argument("--out", help="export folder (default RUN/export)")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="images for the parity check (files, folders, globs); default: the run's validation images")

    p = sub.add_parser("predict", help="predict the class of images with a run or an export",
                       description="Predict files, folders (recursively) or globs. Uses onnxruntime when MODEL has "
                                   "an ONNX export, torch otherwise. Unreadable files are named on stderr and do "
                                   "not stop the others; the exit status is then 1.")
    p.add_argument("model", help="run folder, export folder or .onnx file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    p.add_argument("--top-k", type=int, default=3, help="how many labels to show per image (default 3)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    p.add_argument("--output", help="write CSV/JSON to this file instead of standard output")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", action="store_true", help="average over the image and its horizontal mirror")
    p.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for inference (default: one per usable core)")

    p = sub.add_parser("evaluate", help="score a model on a labelled folder",
                       description="Accuracy, macro-F1, balanced accuracy, per-class precision/recall/F1 and the "
                                   "confusion matrix (CSV and PNG) of MODEL on DIR/<class>/<images>.")
    p.add_argument("model", help="run folder, export folder or .onnx file")
    p.add_argument("data", help="labelled folder DIR/<class>/<images>, e.g. data/x/val")
    p.add_argument("--out", help="where to write the report (default MODEL/eval-<DIR name>)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", action="store_true", help="average over the image and its horizontal mirror")
    p.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto")
    return parser


def cmd_fit(args: argparse.Namespace) -> int:
    from .train import fit

    if not args.verbose:
        _quiet_lightning()  # importing pytorch_lightning just set its logger back to INFO

    result = fit(
        args.data, args.recipe, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        overrides=_parse_set(args.set), domain=args.domain, out=args.out, split_file=args.split,
        val_fraction=args.val_fraction, seed=args.seed, precision=args.precision,
        feature_backend=args.feature_backend, weights=args.weights,
        pretrained=args.pretrained, num_workers=args.workers, progress=args.progress,
        export=args.export or None,
        labels=args.labels,
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
    for column in ("name", "backbone", "head", "training", "description"):
        table.add_column(column, no_wrap=column == "name")
    for name in recipes.names():
        r = recipes.get(name)
        trains = {0: "frozen", -1: "all unfrozen"}.get(r.unfreeze_stages, f"top {r.unfreeze_stages} stages")
        if r.trains_backbone:
            trains += f" after {r.freeze_epochs} epoch(s)"
        if r.cached_features and not r.trains_backbone:
            schedule = "probe (L-BFGS on cached features)"
        elif r.cached_features and r.freeze_epochs:
            schedule = f"probe, then {r.epochs - r.freeze_epochs} epochs"
        else:
            schedule = f"{r.epochs} epochs"
        table.add_row(name, trains, r.head, schedule, r.description)
    out.print(table)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .recipe_choice import inspect_dataset

    result = inspect_dataset(args.data, model=args.model, labels=args.labels)
    if args.json:
        out.print_json(json.dumps(result.to_dict()))
        return 0
    table = Table(title=f"{result.data_dir}")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_row("classes", str(len(result.classes)), "")
    table.add_row("train / val / test images", f"{result.train_images} / {result.val_images} / {result.test_images}",
                  "")
    from .recipes import SMALL_DATA_IMAGES_PER_CLASS

    table.add_row("training images per class", f"{result.images_per_class:.1f}", f"{SMALL_DATA_IMAGES_PER_CLASS}")
    gap = result.domain_gap
    table.add_row(f"domain gap ({result.model})", "n/a" if gap is None else f"{gap.score:.3f}",
                  "" if gap is None else f"{gap.threshold}")
    out.print(table)
    out.print(f"recipe auto would choose: [bold]{result.recipe}[/] ({escape(result.reason)})")
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


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run
    from .predict import find_images

    images = None
    if args.images:
        images = [path for _, path in find_images(args.images) if not isinstance(path, str)]
    manifest = export_run(args.run, args.format, args.out, images=images)
    table = Table(title=f"export of {args.run}: parity with the trained model on {len(manifest['parity_images'])} "
                        "images")
    for column in ("format", "file", "MB", "top-1 agree", "max |dp| bs 1", "max |dp| bs 7"):
        table.add_column(column, justify="left" if column in ("format", "file") else "right", no_wrap=True)
    for fmt, entry in manifest["formats"].items():
        sizes = entry["parity"]["batch_sizes"]
        agreement = min(f["top1_agreement"] for f in sizes.values())
        for name, info in entry["files"].items():
            table.add_row(fmt, name, f"{info['bytes'] / 1e6:.1f}", f"{agreement:.0%}",
                          *(f"{sizes[bs]['max_abs_prob_diff']:.1e}" if bs in sizes else "-" for bs in ("1", "7")))
    out.print(table)
    folder = args.out or f"{args.run}/export"
    out.print(f"export folder: {folder} (manifest.json has the input contract and these figures)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import load

    predictor = load(args.model, args.backend, threads=args.threads)
    console.print(f"{predictor.config['architecture']}, {len(predictor.labels)} classes, "
                  f"backend {predictor.backend.name}", highlight=False)
    stream = predictor.predict_iter(args.paths, top_k=args.top_k, batch_size=args.batch_size, tta=args.tta)
    sink = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115 - closed below
    try:
        writer = {"table": _PredictionTable, "csv": _PredictionCsv, "json": _PredictionJson}[args.format]
        failed = writer(sink, args.top_k, predictor.labels).write_all(stream)
    finally:
        if args.output:
            sink.close()
    for prediction in failed:
        console.print(f"[yellow]unreadable:[/] {escape(prediction.source)}: {escape(prediction.error or '')}",
                      highlight=False, soft_wrap=True)
    if failed:
        console.print(f"{len(failed)} file(s) could not be read", highlight=False)
    return 1 if failed else 0


class _PredictionWriter:
    """Writes predictions as they stream in; returns the failed ones."""

    def __init__(self, sink, top_k: int, labels: list[str]) -> None:
        self.sink, self.labels = sink, labels
        self.top_k = min(top_k, len(labels))

    def write_all(self, stream) -> list:
        failed = []
        self.start()
        for prediction in stream:
            if prediction.ok:
                self.row(prediction)
            else:
                failed.append(prediction)
                self.failure(prediction)
        self.end()
        return failed

    def start(self) -> None: ...
    def row(self, prediction) -> None: ...
    def failure(self, prediction) -> None: ...
    def end(self) -> None: ...


class _PredictionTable(_PredictionWriter):
    """Aligned columns, path last so that long paths do not break the alignment."""

    def start(self) -> None:
        self.console = Console(file=self.sink) if self.sink is not sys.stdout else out
        self.width = max(len("label"), *(len(label) for label in self.labels))
        alternatives = f"next {self.top_k - 1}" if self.top_k > 1 else ""
        self.alt_width = (self.top_k - 1) * (self.width + 8)
        self._print(f"{'label':<{self.width}}  score  {alternatives:<{self.alt_width}}  path", style="bold")

    def row(self, p) -> None:
        others = "".join(f"{label:<{self.width}} {score:5.3f}  " for label, score in p.top_k[1:])
        self._print(f"{p.label:<{self.width}}  {p.score:5.3f}  {others:<{self.alt_width}}  {p.source}")

    def _print(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


class _PredictionCsv(_PredictionWriter):
    def start(self) -> None:
        import csv

        self.writer = csv.writer(self.sink)
        ranks = [f"top{i}_{field}" for i in range(1, self.top_k + 1) for field in ("label", "score")]
        self.writer.writerow(["path", "label", "score", *ranks, "error"])

    def row(self, p) -> None:
        ranks = [v for label, score in p.top_k for v in (label, f"{score:.6f}")]
        ranks += [""] * (2 * self.top_k - len(ranks))
        self.writer.writerow([p.source, p.label, f"{p.score:.6f}", *ranks, ""])

    def failure(self, p) -> None:
        self.writer.writerow([p.source, "", "", *[""] * (2 * self.top_k), p.error])


class _PredictionJson(_PredictionWriter):
    """A JSON array, written element by element."""

    def start(self) -> None:
        self.count = 0
        self.sink.write("[")

    def row(self, p) -> None:
        import json

        self.sink.write(("," if self.count else "") + "\n  " + json.dumps(p.to_dict()))
        self.count += 1

    failure = row

    def end(self) -> None:
        self.sink.write("\n]\n" if self.count else "]\n")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .predict import evaluate

    result = evaluate(args.model, args.data, out=args.out, batch_size=args.batch_size, tta=args.tta,
                      backend=args.backend)
    table = Table(title=f"{args.model} on {args.data}: {result.images} images")
    for column in ("class", "precision", "recall", "F1", "images"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in result.per_class():
        table.add_row(row["label"], f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    out.print(table)
    out.print(f"accuracy: {result.accuracy:.4f}   macro-F1: {result.macro_f1:.4f}   "
              f"balanced accuracy: {result.balanced_accuracy:.4f}")
    for path, reason in result.skipped:
        console.print(f"[yellow]unreadable:[/] {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)
    out.print(f"report: {Path(result.files['metrics.json']).parent} (metrics.json, per_class.csv, confusion.csv, "
              "confusion.png, predictions.csv)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from .data import doctor
    from .data.labels import read_labels_csv

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
        _print_doctor(report, args.max_rows)
    return 0 if report.ok else 1


def _print_doctor(report, max_rows: int) -> None:
    from .data.doctor import display_path

    colours = {"blocking": "red", "warning": "yellow", "info": "cyan"}
    table = Table(title=f"finetune doctor {display_path(report.root)}")
    for column in ("severity", "kind", "path", "problem"):
        table.add_column(column, overflow="fold", no_wrap=column in ("severity", "kind"))
    for f in report.findings[:max_rows]:
        severity = f"[{colours[f.severity]}]{f.severity}[/]"
        table.add_row(severity, f.kind, escape(display_path(f.path)), escape(display_path(f.message)))
    if report.findings:
        out.print(table)
    if len(report.findings) > max_rows:
        out.print(f"... {len(report.findings) - max_rows} more findings (--max-rows, or --json for all)")
    fixes = Table(title="how to fix")
    fixes.add_column("kind", no_wrap=True)
    fixes.add_column("fix", overflow="fold")
    for kind, fix in dict.fromkeys((f.kind, f.fix) for f in report.findings):
        fixes.add_row(kind, escape(fix))
    if report.findings:
        out.print(fixes)
    classes = Table(title=f"usable images per class (imbalance ratio {report.imbalance_ratio:.1f})")
    splits = list(report.class_counts)
    classes.add_column("class")
    for split in splits:
        classes.add_column(split, justify="right")
    names = sorted({name for counts in report.class_counts.values() for name in counts})
    for name in names:
        classes.add_row(escape(name), *(str(report.class_counts[s].get(name, "-")) for s in splits))
    out.print(classes)
    for move in report.quarantined:
        out.print(f"quarantined {escape(display_path(move['from']))} -> {escape(display_path(move['to']))}",
                  highlight=False)
    counts = report.counts()
    verdict = "nothing blocks training" if report.ok else f"{len(report.unresolved)} blocking problem(s)"
    out.print(f"{report.files} image files in {report.seconds:.1f} s ({report.cache_hits} cached): "
              f"{counts['blocking']} blocking, {counts['warning']} warnings, {counts['info']} info; {verdict}",
              highlight=False)


COMMANDS = {"fit": cmd_fit, "inspect": cmd_inspect, "doctor": cmd_doctor, "recipes": cmd_recipes,
            "models": cmd_models, "export": cmd_export, "predict": cmd_predict, "evaluate": cmd_evaluate}


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("finetune").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        _quiet_lightning()
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning_fabric")


def _quiet_lightning() -> None:
    """Lightning's INFO lines (devices found, logger tips) say nothing about this run that fit does not."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


if __name__ == "__main__":
    run()
