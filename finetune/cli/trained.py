"""`finetune export`, `predict`, `evaluate` and `report`: the commands on a trained model (a run, an export, a
.onnx)."""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .. import arguments as check
from ..arguments import MAX_PROCESSES
from ..device import ACCELERATORS
from ..errors import UsageError
from ..formats import DEFAULT_FORMATS

BACKENDS = ("auto", "onnx", "torch")


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's model, each format checked against the trained model",
                       description="Write RUN's model as safetensors (timm hub layout), ONNX and/or torch.export "
                                   "into --out (default RUN/export). Each export is compared with the trained "
                                   "model on validation images of the run at batch sizes 1 and 7; a mismatch is "
                                   "an error and nothing is written for that format.")
    p.set_defaults(handler=cmd_export)
    p.add_argument("run", metavar="RUN", help="run folder written by `finetune fit`")
    p.add_argument("--format", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated: safetensors, onnx, pt2 (a torch.export program; 'torchscript' is "
                        "accepted as an alias of pt2, TorchScript itself being deprecated). Default safetensors,onnx")
    p.add_argument("--out", help="export folder (default RUN/export)")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="images for the parity check (files, folders, globs); default: the run's validation images")
    _add_accelerator(p, "where the trained model and the PyTorch-loaded exports compute for the parity check "
                        "(ONNX runs on the CPU): auto (a CUDA GPU, else Apple MPS, else the CPU), cpu, gpu or mps")


def check_export(args: argparse.Namespace) -> None:
    check.run_folder("RUN", args.run)
    _one_device(args)
    check.export_formats("--format", args.format)
    if args.out is not None:
        check.output_dir("--out", args.out)
    for path in args.images or ():
        if not Path(path).expanduser().exists() and not glob.glob(path, recursive=True):
            raise UsageError(f"--images {path}: no such file, folder or matching glob; give images that exist")


def cmd_export(args: argparse.Namespace) -> int:
    check_export(args)
    from ..export import export_run
    from ..predict import find_images
    from . import out

    images = None
    if args.images:
        images = [path for _, path in find_images(args.images) if not isinstance(path, str)]
    manifest = export_run(args.run, args.format, args.out, images=images, accelerator=args.accelerator)
    table = Table(title=escape(f"export of {args.run}: parity with the trained model on "
                               f"{len(manifest['parity_images'])} images"))
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
    out.print(f"export folder: {escape(str(folder))} (manifest.json has the input contract and these figures)")
    return 0


def _add_accelerator(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help=text)
    p.add_argument("--devices", type=int, default=1, help="devices to use: 1 (one device is used)")


def _one_device(args: argparse.Namespace) -> None:
    if args.devices != 1:
        raise UsageError(f"--devices {args.devices}: {args.command} runs on one device; give --devices 1 or "
                         "leave it out")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, at least 1 (default 32)")
    p.add_argument("--tta", action="store_true",
                   help="average over the image and its horizontal mirror (built into models with test_flip)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: onnxruntime when MODEL has an ONNX export and the device is the CPU, torch otherwise")
    _add_accelerator(p, "where torch computes (onnxruntime runs on the CPU): auto (a CUDA GPU, else Apple MPS, "
                        "else the CPU), cpu, gpu or mps")


def _check_model(args: argparse.Namespace) -> None:
    source = check.model_source("MODEL", args.model)
    check.positive_int("--batch-size", args.batch_size, example=32)
    _one_device(args)
    if source.is_file() and args.backend == "torch":
        raise UsageError(f"MODEL {source} is an ONNX file and --backend torch needs a run or export folder; "
                         "use --backend onnx or give the folder")


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict the class of images with a run or an export",
                       description="Predict files, folders (recursively) or globs. Uses onnxruntime when MODEL has "
                                   "an ONNX export, torch otherwise. Unreadable files are named on stderr and do "
                                   "not stop the others; the exit status is then 1.")
    p.set_defaults(handler=cmd_predict)
    p.add_argument("model", metavar="MODEL", help="run folder, export folder or .onnx file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    p.add_argument("--top-k", type=int, default=3, help="how many labels to show per image, at least 1 (default 3)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    p.add_argument("--output", help="write CSV/JSON to this file instead of standard output")
    _add_model_options(p)
    p.add_argument("--threads", type=int, help="CPU threads for inference (default: one per usable core)")


def check_predict(args: argparse.Namespace) -> None:
    _check_model(args)
    check.positive_int("--top-k", args.top_k, example=3)
    if args.threads is not None:
        check.positive_int("--threads", args.threads, MAX_PROCESSES, example=4)
    if args.output is not None:
        check.output_file("--output", args.output)


def cmd_predict(args: argparse.Namespace) -> int:
    check_predict(args)
    from ..predict import load
    from ..predict_output import WRITERS
    from . import console

    predictor = load(args.model, args.backend, threads=args.threads, accelerator=args.accelerator)
    console.print(f"{predictor.config['architecture']}, {len(predictor.labels)} classes, "
                  f"backend {predictor.runner.name}", highlight=False)
    stream = predictor.predict_iter(args.paths, top_k=args.top_k, batch_size=args.batch_size, tta=args.tta)
    sink = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115 - closed below
    try:
        failed = WRITERS[args.format](sink, args.top_k, predictor.labels).write_all(stream)
    finally:
        if args.output:
            sink.close()
    for prediction in failed:
        console.print(f"[yellow]unreadable:[/] {escape(prediction.source)}: {escape(prediction.error or '')}",
                      highlight=False, soft_wrap=True)
    if failed:
        console.print(f"{len(failed)} file(s) could not be read", highlight=False)
    return 1 if failed else 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a model on a labelled folder",
                       description="Accuracy, macro-F1, balanced accuracy, per-class precision/recall/F1 and the "
                                   "confusion matrix (CSV and PNG) of MODEL on DIR/<class>/<images>.")
    p.set_defaults(handler=cmd_evaluate)
    p.add_argument("model", metavar="MODEL", help="run folder, export folder or .onnx file")
    p.add_argument("data", metavar="DIR", help="labelled folder DIR/<class>/<images>, e.g. data/x/val")
    p.add_argument("--out", help="where to write the report (default MODEL/eval-<DIR name>)")
    _add_model_options(p)


def check_evaluate(args: argparse.Namespace) -> None:
    _check_model(args)
    check.existing_dir("DIR", args.data, "a labelled folder DIR/<class>/<images>")
    if args.out is not None:
        check.output_dir("--out", args.out)


def cmd_evaluate(args: argparse.Namespace) -> int:
    check_evaluate(args)
    from ..evaluate import evaluate
    from . import console, out

    result = evaluate(args.model, args.data, out=args.out, batch_size=args.batch_size, tta=args.tta,
                      backend=args.backend, accelerator=args.accelerator)
    table = Table(title=escape(f"{args.model} on {args.data}: {result.images} images"))
    for column in ("class", "precision", "recall", "F1", "images"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in result.per_class():
        table.add_row(escape(row["label"]), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    out.print(table)
    out.print(f"accuracy: {result.accuracy:.4f}   macro-F1: {result.macro_f1:.4f}   "
              f"balanced accuracy: {result.balanced_accuracy:.4f}")
    for path, reason in result.skipped:
        console.print(f"[yellow]unreadable:[/] {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)
    out.print(f"report: {escape(str(Path(result.files['metrics.json']).parent))} (metrics.json, per_class.csv, "
              "confusion.csv, confusion.png, predictions.csv)")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a run's report again: report.md, report.html and the plots",
                       description="Write RUN/report.md, the self-contained RUN/report.html (plots inlined) and the "
                                   "plots they show, from the run folder alone (summary.json, metrics.csv, "
                                   "val_predictions.npz, recipe.toml): nothing runs through the model. The most "
                                   "confidently wrong validation images are read from the data folder; if it "
                                   "moved, the report says so. Prints the paths written.")
    p.set_defaults(handler=cmd_report)
    p.add_argument("run", metavar="RUN", help="run folder written by a finished `finetune fit`")


def cmd_report(args: argparse.Namespace) -> int:
    run = check.finished_run("RUN", args.run)
    from ..report import write_report
    from . import out

    for path in write_report(run).files:
        out.print(escape(str(path)), highlight=False, soft_wrap=True)
    return 0
