"""The names a run folder and an export are made of: file names, export formats and their one alias, the
folder format version. A leaf module without torch, so that checking a path or an option stays instant."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import UsageError

CONFIG_NAME = "config.json"  # timm's hub layout: architecture, num_classes, label_names, pretrained_cfg
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
PT2_NAME = "model.pt2"
EXPORT_DIR = "export"  # RUN/export: what `fit` exports
MANIFEST_NAME = "manifest.json"
INPUT_NAME = "images"  # of the ONNX graph: uint8 pixels at the model's input size
OUTPUT_NAMES = ("logits", "probabilities")
# The layout of config.json and of the run and export folders; bump it when a folder written by this code
# could not be read by older code, and keep older folders loading (tests/test_formats.py). Folders written
# before there was a version have no "format" key and the layout of version 1.
FORMAT_VERSION = 1

FORMATS = ("safetensors", "onnx", "pt2")  # each named for what it writes: model.safetensors, .onnx, .pt2
DEFAULT_FORMATS = ("safetensors", "onnx")  # what `fit` exports and `finetune export` writes unless told
# accepted for pt2, which writes a torch.export archive (not TorchScript, whose torch.jit is deprecated)
FORMAT_ALIASES = {"torchscript": "pt2", "torch.export": "pt2"}


def parse_formats(formats: str | Sequence[str], option: str = "--format") -> tuple[str, ...]:
    """``"safetensors,onnx"`` or a sequence -> names from ``FORMATS``, in the given order, without repeats."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    given = ",".join(map(str, items))
    given = given if given.isprintable() else repr(given)  # a control character must not split the line
    chosen: list[str] = []
    for item in filter(None, (str(i).strip() for i in items)):
        name = FORMAT_ALIASES.get(item.lower(), item.lower())
        if name not in FORMATS:
            raise UsageError(f"{option} {given}: unknown export format {item!r}; choose from "
                             f"{', '.join(FORMATS)} (torchscript is an alias of pt2)")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise UsageError(f"{option} {given!r}: no export format given; choose from {', '.join(FORMATS)}")
    return tuple(chosen)
