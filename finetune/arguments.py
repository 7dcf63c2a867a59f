"""Validators for user input at the boundary (the CLI and the top of the Python API).

Each validator takes the name the user knows the value by (``"--val-fraction"`` on the command line,
``"val_fraction"`` in Python) and the value, returns the value, and raises `UsageError` with one line that
names the option, the bad value, what is allowed and how to fix it. Nothing here imports torch: the CLI runs
these before anything heavy is imported, built or written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import recipes
from .errors import RecipeError, UsageError
from .formats import CONFIG_NAME, WEIGHTS_NAME, parse_formats

MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
MAX_PROCESSES = 1024  # workers and threads: more is a typo, not a machine


def _text(value: Any) -> str:
    text = str(value)
    return text if text.isprintable() else repr(text)


def shown(name: str, value: Any) -> str:
    """How the user wrote it: ``--seed -3`` for an option, ``DIR x`` for a positional, ``seed=-3`` in Python."""
    if name.startswith("-") or name.isupper():
        return f"{name} {_text(value)}"
    return f"{name}={value!r}"


def _fail(name: str, value: Any, problem: str, fix: str) -> UsageError:
    return UsageError(f"{shown(name, value)}: {problem}; {fix}")


def _example(name: str, value: Any) -> str:
    return f"for example {shown(name, value)}"


# --- numbers ------------------------------------------------------------------------------------------------
def finite_float(name: str, value: Any) -> float:
    """A real number: not NaN, not infinite, not a string or a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, value, f"expected a number, got a {type(value).__name__}", "give a number")
    if not math.isfinite(value):
        raise _fail(name, value, "must be a finite number", "give a number such as 0.2")
    return float(value)


def fraction(name: str, value: Any, example: float = 0.2) -> float:
    """A share strictly between 0 and 1 (a validation fraction)."""
    value = finite_float(name, value)
    if not 0 < value < 1:
        raise _fail(name, value, "must be a fraction strictly between 0 and 1", _example(name, example))
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, value, f"expected a whole number, got a {type(value).__name__}", "give an integer")
    return value


def positive_int(name: str, value: Any, maximum: int | None = None, example: int = 1) -> int:
    """An integer >= 1 (and <= ``maximum`` when given)."""
    return _bounded_int(name, value, 1, maximum, example)


def non_negative_int(name: str, value: Any, maximum: int | None = None, example: int = 0) -> int:
    """An integer >= 0 (and <= ``maximum`` when given)."""
    return _bounded_int(name, value, 0, maximum, example)


def _bounded_int(name: str, value: Any, minimum: int, maximum: int | None, example: int) -> int:
    value = _integer(name, value)
    if value < minimum:
        raise _fail(name, value, "must be at least 1" if minimum == 1 else f"must be {minimum} or more",
                    _example(name, example))
    if maximum is not None and value > maximum:
        raise _fail(name, value, f"must be at most {maximum}", _example(name, example))
    return value


def seed(name: str, value: Any) -> int:
    """A random seed numpy, torch and Lightning all accept: 0 .. 2**32 - 1."""
    value = _integer(name, value)
    if not 0 <= value <= MAX_SEED:
        raise _fail(name, value, f"a seed must be between 0 and {MAX_SEED}", _example(name, 0))
    return value


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise _fail(name, value, "unknown value", f"choose one of {', '.join(allowed)}")
    return value


def export_formats(name: str, value: str | Sequence[str]) -> tuple[str, ...]:
    """``"safetensors,onnx"`` -> canonical format names, as `finetune.export` reads them."""
    return parse_formats(value, option=name)


# --- paths --------------------------------------------------------------------------------------------------
def existing_dir(name: str, value: Any, what: str = "an existing folder") -> Path:
    return _existing(name, value, what, folder=True)


def existing_file(name: str, value: Any, what: str = "an existing file") -> Path:
    return _existing(name, value, what, folder=False)


def _existing(name: str, value: Any, what: str, *, folder: bool) -> Path:
    path = Path(value)
    if path.is_dir() != folder and path.exists():
        wrong = "is a file, not a folder" if folder else "is a folder, not a file"
        raise _fail(name, value, wrong, f"give {what}")
    if not (path.is_dir() if folder else path.is_file()):
        raise _fail(name, value, "does not exist", f"give {what}")
    return path


def output_dir(name: str, value: Any, *, empty: bool = False) -> Path:
    """A folder to write into: it may not exist yet; it may not be a file (nor, with ``empty``, hold files)."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise _fail(name, value, "is a file, not a folder", "give a folder to write into")
    if empty and path.is_dir() and any(path.iterdir()):
        raise _fail(name, value, "already exists and is not empty", "choose another folder or remove it")
    return path


def output_file(name: str, value: Any) -> Path:
    """A file to write: not a folder, in a folder that exists."""
    path = Path(value)
    if path.is_dir():
        raise _fail(name, value, "is a folder, not a file", "give a file name to write")
    if not path.parent.is_dir():
        raise _fail(name, value, f"the folder {_text(path.parent)} does not exist", "create it or give another path")
    return path


def run_folder(name: str, value: Any) -> Path:
    """A run folder written by ``finetune fit`` (its model: config.json + model.safetensors)."""
    what = "a run folder written by `finetune fit`"
    path = existing_dir(name, value, what)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
    if missing:
        raise _fail(name, value, f"has no {' or '.join(missing)}, so it holds no trained model", f"give {what}")
    return path


def finished_run(name: str, value: Any) -> Path:
    """A run folder whose ``finetune fit`` finished: it has summary.json (what ``finetune report`` reads)."""
    what = "a run folder written by `finetune fit`"
    path = existing_dir(name, value, what)
    if not (path / "summary.json").is_file():
        started = (path / "fit.json").is_file()
        raise _fail(name, value, "has no summary.json: its fit did not finish" if started else
                    "has no summary.json, so it is not a finished run folder",
                    f"finish it with `finetune fit --resume {value}`" if started else f"give {what}")
    return path


def model_source(name: str, value: Any) -> Path:
    """What predict and evaluate load: a run or export folder (with its config.json) or an .onnx file."""
    what = "a run folder, an export folder or a .onnx file"
    path = Path(value)
    if path.is_file():
        if path.suffix.lower() != ".onnx":
            raise _fail(name, value, "is a file but not an .onnx model", f"give {what}")
        return path
    path = existing_dir(name, value, what)
    if not (path / CONFIG_NAME).is_file():
        raise _fail(name, value, f"has no {CONFIG_NAME}, so it is neither a run nor an export folder",
                    f"give {what}")
    return path


# --- recipes ------------------------------------------------------------------------------------------------
def recipe(name: str, value: Any) -> recipes.Recipe:
    """A built-in recipe name or a .toml recipe file (`recipes.get`), read now so that a bad one stops early."""
    if isinstance(value, recipes.Recipe):
        return value
    if Path(value).is_dir():
        raise _fail(name, value, "is a folder", f"give a built-in recipe ({', '.join(recipes.names())}) "
                                                "or a .toml recipe file")
    try:
        return recipes.get(value)
    except (UnicodeDecodeError, OSError) as e:
        raise _fail(name, value, f"cannot be read ({type(e).__name__})", "give a UTF-8 .toml recipe file") from None


def recipe_overrides(name: str, value: Any, overrides: Mapping[str, Any], recipe_name: str = "recipe") -> None:
    """Apply ``overrides`` (``--set`` and the ``--model``/``--epochs``/... shortcuts) to the recipe now.

    For ``auto`` the recipe is not chosen yet: a value that no built-in recipe accepts (an unknown field, a
    typo, ``head_stages=0``) is an error now; one that only some accept (``freeze_epochs=9`` against
    8 epochs) is decided once auto has chosen. Floats must be finite (a NaN learning rate trains nothing).
    """
    if not overrides:
        return
    if isinstance(value, (str, Path)) and str(value) == "auto":
        candidates = [recipes.get(n) for n in recipes.names()]
    else:
        candidates = [recipe(recipe_name, value)]
    errors: list[RecipeError] = []
    for candidate in candidates:
        try:
            applied = candidate.override(overrides)
        except RecipeError as e:
            errors.append(e)
            continue
        for key in overrides:
            field = getattr(applied, key)
            if isinstance(field, float) and not math.isfinite(field):
                raise _fail(name, f"{key}={_text(overrides[key])}", "must be a finite number",
                            f"give a number, e.g. the recipe's {key}={getattr(candidate, key)!r}")
    if len(errors) == len(candidates):
        raise RecipeError(f"{name}: {errors[0]}") from None


def auto_lr(overrides: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Whether the overrides ask for ``lr=auto`` (lr-find chooses the rate before the epochs), and the others."""
    value = overrides.get("lr")
    asked = isinstance(value, str) and value.strip().lower() == "auto"
    return asked, {k: v for k, v in overrides.items() if not (asked and k == "lr")}


def has_learning_rate(name: str, recipe: recipes.Recipe) -> recipes.Recipe:
    """A recipe that trains epochs, for lr-find: one that fits its head on cached features has no rate."""
    if not recipe.trains_epochs:
        raise UsageError(f"{name}: recipe {recipe.name!r} fits its head by L-BFGS on cached features and trains no "
                         "epochs, so it has no learning rate to find; add --set cached_features=false (the head "
                         "then trains in epochs) or use a large-* recipe (--recipe large-similar or large-different)")
    return recipe


# --- the Python API's fit() ---------------------------------------------------------------------------------
_seed, _recipe = seed, recipe  # check_fit_arguments has parameters of these names
FIT_DOMAINS = ("auto", "similar", "different")
FIT_PRECISIONS = ("auto", "bf16", "fp32", "16")
FIT_FEATURE_BACKENDS = ("auto", "onnx", "torch")
FIT_STRATEGIES = ("auto", "ddp", "fsdp")  # Lightning's names; "auto" is ddp when there are several processes


def check_fit_arguments(
    *,
    data_dir: Any,
    recipe: Any = "auto",
    overrides: Mapping[str, Any] | None = None,
    model: Any = None,
    pretrained: Any = None,
    val_fraction: Any = 0.2,
    seed: Any = 0,
    num_workers: Any = None,
    epochs: Any = None,
    batch_size: Any = None,
    labels: Any = None,
    split_file: Any = None,
    weights: Any = None,
    out: Any = None,
    domain: Any = "auto",
    precision: Any = "auto",
    feature_backend: Any = "auto",
    export: Any = None,
    devices: Any = 1,
    num_nodes: Any = 1,
    strategy: Any = "auto",
    checkpoint_every: Any = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Check `finetune.train.fit`'s arguments before anything is read, built or written.

    ``names`` maps a parameter to how the caller's user spells it (the CLI passes ``{"num_workers":
    "--workers", ...}``); by default errors use the Python parameter names.
    """
    def n(param: str) -> str:
        return (names or {}).get(param, param)

    existing_dir(n("data_dir"), data_dir, "an image folder DIR/<class>/<images> (or the root of --labels paths)")
    fraction(n("val_fraction"), val_fraction)
    _seed(n("seed"), seed)
    if num_workers is not None:
        non_negative_int(n("num_workers"), num_workers, MAX_PROCESSES)
    if epochs is not None:
        positive_int(n("epochs"), epochs, example=10)
    if batch_size is not None:
        positive_int(n("batch_size"), batch_size, example=32)
    if labels is not None:
        existing_file(n("labels"), labels, "a labels CSV with path,label[,split] rows")
    if split_file is not None:
        existing_file(n("split_file"), split_file, "the split.json of an earlier run")
    if weights is not None:
        existing_file(n("weights"), weights, "a weights file (.safetensors, or .pth)")
    if out is not None:
        output_dir(n("out"), out, empty=True)
    choice(n("domain"), domain, FIT_DOMAINS)
    choice(n("precision"), precision, FIT_PRECISIONS)
    choice(n("feature_backend"), feature_backend, FIT_FEATURE_BACKENDS)
    if export:
        export_formats(n("export"), export)
    positive_int(n("devices"), devices, example=2)
    positive_int(n("num_nodes"), num_nodes, example=2)
    choice(n("strategy"), strategy, FIT_STRATEGIES)
    if checkpoint_every is not None:
        positive_int(n("checkpoint_every"), checkpoint_every, example=500)
    if not (isinstance(recipe, (str, Path)) and str(recipe) == "auto"):
        _recipe(n("recipe"), recipe)
    shortcuts = {"model": model, "epochs": epochs, "batch_size": batch_size, "pretrained": pretrained}
    lr_auto, merged = auto_lr({k: v for k, v in shortcuts.items() if v is not None} | dict(overrides or {}))
    recipe_overrides(n("overrides"), recipe, merged, n("recipe"))
    if lr_auto and devices * num_nodes > 1:
        raise UsageError(f"{n('overrides')} lr=auto: lr-find runs in one process; run `finetune lr-find DIR` first "
                         f"and give the rate it suggests ({n('overrides')} lr=...)")
    if lr_auto and not (isinstance(recipe, (str, Path)) and str(recipe) == "auto"):  # auto: once it has chosen
        has_learning_rate(f"{n('overrides')} lr=auto", _recipe(n("recipe"), recipe).override(merged))

