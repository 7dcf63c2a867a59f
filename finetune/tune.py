"""`finetune tune`: a hyperparameter search over recipe fields with Optuna (../shared/METHOD.md: search at random,
on log scales for rates and decays, coarse then fine; stop hopeless trials early).

Every trial is a `fit` of the same folder, with the same split and seed, with some recipe fields changed; its
score is the validation accuracy of the model that fit kept. The test split is never read by the search: the
best recipe's held-out score comes from fitting it (``fit --recipe STUDY/best.toml``).

The search space follows the recipe's training path, so that every field a trial changes acts
(``Recipe.active_fields``):

- the probe path (a head fitted by L-BFGS on cached features: ``small-*``): the probe's weight decay, the views
  (mirror images in training, the test-time flip, augmented views), the head (linear, or pooled stages) and the
  backbone, among those with weights on this machine. The features of a pass are computed once for the whole
  study (``phases.probe.remembered_features``), so a trial that only changes what is done with them takes
  seconds;
- the fine-tuning path (Lightning epochs: ``large-*``): learning rate and weight decay on log scales, the
  stages unfrozen, augmentation strength (crop scale, colour jitter) and label smoothing, with
  ``epochs_per_trial`` epochs after the recipe's warm-up. Each epoch's validation accuracy goes to Optuna's
  median pruner, and a trial stopped by the divergence guard (its loss passed 3x its first steps') is pruned.

The study lives in ``STUDY/study.db`` (SQLite). Trials send heartbeats: a trial killed mid-way (SIGKILL, power
cut) is marked failed when the study is opened again and run again with the same values; the trials that
finished are kept. ``STUDY/best.toml`` is the best trial's recipe, ``STUDY/tune.png`` its score against each
hyperparameter, ``STUDY/trials.csv`` every trial, ``STUDY/trials/NNN`` their run folders, ``STUDY/features``
the remembered feature passes (read back when the study continues), ``STUDY/split.json`` the images the trials
use (training and validation: no trial reads the test split)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl

from . import recipes, runs
from .data.splits import load_splits
from .errors import UsageError
from .files import atomic_write_text
from .model.guard import Diverged
from .model.offline_sources import OFFLINE_SOURCES, offline_weights_ready
from .phases.epochs import EMA_MONITOR, MONITOR
from .phases.probe import remembered_features
from .plots import figure, log_axis, save_figure
from .recipe_choice import inspect_dataset, resolve_recipe
from .recipes import Recipe

log = logging.getLogger("finetune")

STUDY_NAME = "finetune"
HEARTBEAT_S = 2  # a running trial writes a heartbeat this often ...
GRACE_S = 6  # ... and one silent for this long was killed: it is marked failed and run again
MAX_RETRIES = 2  # a trial killed this many times is left failed
EPOCHS_PER_TRIAL = 3


@dataclass(frozen=True)
class Param:
    """One searched recipe field: a float or int range (``log``: uniform in its logarithm) or choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    integer: bool = False
    when: Mapping[str, Any] = field(default_factory=dict)  # searched only when these fields have these values

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def search_space(recipe: Recipe, models: Sequence[str]) -> list[Param]:
    """The fields a trial changes on ``recipe``'s training path (see the module's docstring); ``models``: the
    backbones the probe path may choose from (one: the backbone stays)."""
    if recipe.probes and not recipe.trains_backbone:
        space = [Param("probe_weight_decay", 1e-4, 3.0, log=True),
                 Param("flip_views", choices=(False, True)),
                 Param("test_flip", choices=(False, True)),
                 Param("feature_views", 0, 2, integer=True),
                 Param("head", choices=("linear", "multistage")),
                 Param("head_stages", 1, 4, integer=True, when={"head": "multistage"})]
        return space + ([Param("model", choices=tuple(models))] if len(models) > 1 else [])
    lr, wd = recipe.lr, recipe.weight_decay
    space = [Param("lr", max(lr / 10, 1e-6), min(lr * 10, 1.0), log=True),
             Param("weight_decay", wd / 10 if wd else 1e-5, wd * 10 if wd else 1e-1, log=True),
             Param("label_smoothing", 0.0, 0.2),
             Param("scale_min", 0.2, 1.0),
             Param("color_jitter", 0.0, 0.4)]
    if recipe.trains_backbone:
        space.append(Param("unfreeze_stages", choices=(1, 2, 3, -1)))
    return space


def offline_models(recipe: Recipe) -> list[str]:
    """The recipe's backbone, then every other backbone whose ImageNet weights are on this machine (``finetune
    models``): what the probe path's search may switch to without a download."""
    if not recipe.pretrained:
        return [recipe.model]
    others = [name for name, source in OFFLINE_SOURCES.items() if name != recipe.model and
              offline_weights_ready(source)]
    return [recipe.model, *others]


@dataclass
class TuneResult:
    study_dir: Path
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    best_recipe: Path
    trials: list[dict[str, Any]]
    stopped: str  # why the search ended


def tune(data_dir: str | Path, *, trials: int, recipe: str | Path = "auto",
         overrides: Mapping[str, Any] | None = None, out: str | Path | None = None,
         budget_minutes: float | None = None, sampler: str = "tpe", seed: int = 0,
         epochs_per_trial: int = EPOCHS_PER_TRIAL, models: Sequence[str] | None = None,
         num_workers: int | None = None, on_trial: Any = None) -> TuneResult:
    """Run (or continue) the study in ``out`` until it holds ``trials`` finished trials or the budget is spent.

    ``overrides`` are fixed recipe fields (never searched); ``models`` the backbones the probe path may try
    (default: ``offline_models``). ``on_trial(record)`` is called after every trial (the CLI prints it).
    """
    started = time.monotonic()
    data_dir = Path(data_dir)
    overrides = dict(overrides or {})
    study_dir = Path(out) if out is not None else Path("runs") / f"tune-{data_dir.resolve().name}"
    study_dir.mkdir(parents=True, exist_ok=True)
    with _only_process(study_dir):
        base = _base_recipe(data_dir, recipe, overrides, seed, num_workers)
        space = [p for p in search_space(base, models or offline_models(base)) if p.name not in overrides]
        fixed = dict(overrides)
        if base.trains_epochs:
            fixed.setdefault("epochs", min(base.epochs, base.freeze_epochs + epochs_per_trial))
            fixed.setdefault("early_stopping", 0)
        split_file = _search_split(data_dir, study_dir, seed)
        study = _open_study(study_dir, sampler, seed)
        done = _finished(study)
        budget_s = None if budget_minutes is None else budget_minutes * 60
        stop = _Stop(trials, budget_s, started)
        if done < trials:
            objective = _Objective(data_dir, base, fixed, space, study_dir, seed, num_workers, on_trial, split_file)
            with remembered_features(study_dir / "features"), _quiet_fits():
                study.optimize(objective, n_trials=trials - done + MAX_RETRIES * trials, callbacks=[stop])
        else:
            stop.reason = f"the study already holds {done} finished trial(s)"
        return _write_results(study, study_dir, base, data_dir, seed, stop.reason, budget_s, started)


def _base_recipe(data_dir: Path, recipe: str | Path, overrides: Mapping[str, Any], seed: int,
                 num_workers: int | None) -> Recipe:
    """The recipe the trials vary: ``auto`` resolved once, as ``fit`` would (measuring the domain gap)."""
    name = recipe
    if str(recipe) == "auto":
        model = overrides.get("model")
        pretrained = str(overrides.get("pretrained", "true")).lower() not in ("false", "0", "no")
        if pretrained:
            name = inspect_dataset(data_dir, model=model, seed=seed, num_workers=num_workers).recipe
        else:  # no pretrained features to measure a domain gap on: the size decides, as in fit
            splits = load_splits(data_dir, seed=seed)
            name = recipes.choose(len(splits.train) / len(splits.classes))[0]
    chosen, _ = resolve_recipe(name, 0, overrides=overrides)
    return chosen


def _search_split(data_dir: Path, study_dir: Path, seed: int) -> Path:
    """``STUDY/split.json``: the folder's training and validation images, as ``fit`` would split them, without
    the test split, so that no trial reads it; written once, so that a continued study keeps it."""
    path = study_dir / "split.json"
    if not path.is_file():
        splits = load_splits(data_dir, seed=seed)
        if splits.test:
            log.info("the test split (%d images) is left out of the search: `finetune fit --recipe %s` scores the "
                     "best recipe on it", len(splits.test), study_dir / "best.toml")
        dataclasses.replace(splits, test=[], left_out=("test",)).save(path)
    return path


@contextlib.contextmanager
def _only_process(study_dir: Path) -> Iterator[None]:
    """One `tune` per study folder at a time: then a trial left running in the database was killed."""
    with open(study_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--out {study_dir}: another `finetune tune` is running on this study; wait for it "
                             "or choose another --out") from None
        yield


def _open_study(study_dir: Path, sampler: str, seed: int) -> optuna.Study:
    """The study in ``study_dir/study.db``, created or reopened. Trials killed mid-way (no heartbeat for
    ``GRACE_S``) are marked failed and queued again with their values."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the heartbeat's retry callback is marked experimental (since 2.8); its behaviour is what this module needs
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{(study_dir / 'study.db').resolve()}", heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))
    existing = optuna.study.get_all_study_names(storage)
    # a reopened study draws new values: the sampler's seed moves on with the trials already there
    earlier = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials) if STUDY_NAME in existing else 0
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed + earlier, n_startup_trials=5),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed + earlier)}
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize",
                                sampler=samplers[sampler](), load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:  # this process holds the study's lock: they were killed; wait until their heartbeats are stale
        log.info("%d trial(s) were killed mid-way; they run again", len(running))
        time.sleep(GRACE_S + 1)
        optuna.storages.fail_stale_trials(study)
    return study


def _finished(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


class _Stop:
    """Ends the search when it holds ``trials`` finished trials, or when the next trial would not end within the
    budget (judged by the longest trial so far)."""

    def __init__(self, trials: int, budget_s: float | None, started: float) -> None:
        self.trials, self.budget_s, self.started = trials, budget_s, started
        self.reason = ""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if _finished(study) >= self.trials:
            self.reason = f"{self.trials} trial(s) finished"
            study.stop()
            return
        if self.budget_s is None:
            return
        longest = max((t.duration.total_seconds() for t in study.get_trials(deepcopy=False)
                       if t.duration is not None), default=0.0)
        elapsed = time.monotonic() - self.started
        if elapsed + longest > self.budget_s:
            self.reason = (f"budget: {elapsed / 60:.1f} of {self.budget_s / 60:g} min used and the longest trial "
                           f"took {longest / 60:.1f} min")
            study.stop()


class _Pruning(pl.Callback):
    """Each epoch's validation accuracy to the trial; a trial the pruner gives up on stops after this epoch."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pruned = ""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        value = metrics.get(EMA_MONITOR, metrics.get(MONITOR))
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned = (f"epoch {trainer.current_epoch + 1}: validation accuracy {float(value):.4f} below the "
                           "median of earlier trials at that epoch")
            trainer.should_stop = True


class _Objective:
    def __init__(self, data_dir: Path, base: Recipe, fixed: dict[str, Any], space: list[Param], study_dir: Path,
                 seed: int, num_workers: int | None, on_trial: Any, split_file: Path) -> None:
        self.data_dir, self.base, self.fixed, self.space, self.split_file = data_dir, base, fixed, space, split_file
        self.study_dir, self.seed, self.num_workers, self.on_trial = study_dir, seed, num_workers, on_trial

    def __call__(self, trial: optuna.Trial) -> float:
        from .train import fit

        values: dict[str, Any] = {}
        for param in self.space:
            if all(values.get(k, getattr(self.base, k)) == v for k, v in param.when.items()):
                values[param.name] = param.suggest(trial)
        run_dir = self.study_dir / "trials" / f"{trial.number:03d}"
        pruning = _Pruning(trial) if self.base.trains_epochs else None
        started = time.monotonic()
        record = {"number": trial.number, "params": values, "run_dir": str(run_dir)}
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        if retried is not None:
            record["retry_of"] = retried
        try:
            result = fit(self.data_dir, self.base, overrides=self.fixed | values, out=run_dir, seed=self.seed,
                         split_file=self.split_file,
                         progress=False, export=None, num_workers=self.num_workers,
                         callbacks=[pruning] if pruning else ())
        except Diverged as e:
            self._report(trial, record | {"state": "pruned", "why": f"diverged: {str(e).split(';')[0]}"}, started)
            raise optuna.TrialPruned("diverged") from None
        if pruning is not None and pruning.pruned:
            self._report(trial, record | {"state": "pruned", "why": pruning.pruned}, started)
            raise optuna.TrialPruned(pruning.pruned)
        value = result.val["acc"]
        self._report(trial, record | {"state": "complete", "value": value}, started)
        return value

    def _report(self, trial: optuna.Trial, record: dict[str, Any], started: float) -> None:
        record["seconds"] = round(time.monotonic() - started, 1)
        trial.set_user_attr("seconds", record["seconds"])
        trial.set_user_attr("run_dir", record["run_dir"])
        if "why" in record:
            trial.set_user_attr("why", record["why"])
        if self.on_trial is not None:
            self.on_trial(record)


@contextlib.contextmanager
def _quiet_fits() -> Iterator[None]:
    """A trial's fit says what a single fit says; the search prints one line per trial instead."""
    logger = logging.getLogger("finetune")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _write_results(study: optuna.Study, study_dir: Path, base: Recipe, data_dir: Path, seed: int, reason: str,
                   budget_s: float | None, started: float) -> TuneResult:
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        raise UsageError(f"no trial of the study in {study_dir} finished ({reason or 'none ran'}); give a larger "
                         "--budget-minutes or more --trials")
    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    best = study.best_trial
    best_recipe = study_dir / "best.toml"
    resolved = (Path(best.user_attrs["run_dir"]) / "recipe.toml").read_text().splitlines()
    header = [f"# finetune tune: the best of {len(completed)} completed trial(s) in {study_dir} (trial {best.number}, "
              f"validation accuracy {best.value:.4f}, seed {seed}); reproduce it with:",
              f"#   finetune fit {data_dir} --recipe {best_recipe} --seed {seed}",
              f"# searched: {', '.join(f'{k}={_shown(v)}' for k, v in best.params.items())}"]
    atomic_write_text(best_recipe, "\n".join(header + [line for line in resolved if not line.startswith("# resolved")])
                      + "\n")
    _write_csv(study_dir / "trials.csv", rows)
    space = search_space(base, [base.model])
    plot_search(rows, study_dir / "tune.png", [p.name for p in space if p.log],
                title=f"finetune tune: {base.name} on {data_dir.name}", integer=[p.name for p in space if p.integer])
    summary = {"study": str(study_dir / "study.db"), "recipe": base.name, "data_dir": str(data_dir), "seed": seed,
               "stopped": reason, "budget_s": budget_s, "seconds": time.monotonic() - started,
               "best": {"trial": best.number, "value": best.value, "params": best.params,
                        "recipe_file": str(best_recipe)},
               "trials": rows}
    runs.write_json(study_dir / "tune.json", summary)
    return TuneResult(study_dir, best.value, dict(best.params), best.number, best_recipe, rows, reason)


def _row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    last = max(t.intermediate_values) if t.intermediate_values else None
    return {"number": t.number, "state": t.state.name.lower(), "value": t.value,
            "last_reported": None if last is None else t.intermediate_values[last],
            "seconds": t.user_attrs.get("seconds"), "params": dict(t.params), "why": t.user_attrs.get("why", ""),
            "retry_of": optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t),
            "run_dir": t.user_attrs.get("run_dir", "")}


def _shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    names = sorted({k for r in rows for k in r["params"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", "value", "seconds", *names, "why"])
    for r in rows:
        writer.writerow([r["number"], r["state"], "" if r["value"] is None else f"{r['value']:.6g}", r["seconds"],
                         *(r["params"].get(n, "") for n in names), r["why"]])
    atomic_write_text(path, buffer.getvalue())


def plot_search(rows: list[dict[str, Any]], path: Path, log_scaled: Sequence[str] = (), title: str = "",
                integer: Sequence[str] = ()) -> Any:
    """Validation accuracy against each searched field, one panel per field: completed trials filled, pruned
    ones hollow at the last accuracy they reported. Log axes for the ``log_scaled`` fields, whole-number ticks
    for the ``integer`` ones. Returns the figure, for inspection."""
    names = sorted({k for r in rows for k in r["params"]})
    cols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / cols))
    fig = figure(4.2 * cols, 3.4 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for state, filled in (("complete", True), ("pruned", False)):
            points = [(r["params"][name], r["value"] if state == "complete" else r["last_reported"])
                      for r in rows if r["state"] == state and name in r["params"]]
            points = [(x, y) for x, y in points if y is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            if isinstance(xs[0], (bool, str)) or name in ("unfreeze_stages",):
                categories = sorted({str(x) for r in rows if name in r["params"] for x in [r["params"][name]]})
                xs = [categories.index(str(x)) for x in xs]
                ax.set_xticks(range(len(categories)), categories)
            ax.scatter(xs, ys, s=40, label=f"{state} ({len(points)})", edgecolors="C0",
                       facecolors="C0" if filled else "none")
        if name in log_scaled:
            values = [float(r["params"][name]) for r in rows if name in r["params"]]
            log_axis(ax, "x", min(values), max(values))
        if name in integer:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel=name, ylabel="validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
