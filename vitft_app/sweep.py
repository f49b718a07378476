"""Hyperparameter search: an Optuna study whose trials are ordinary vitft runs.

Each trial is a normal run folder (made by :meth:`~vitft_app.jobs.JobRunner.create_run` and
trained by :meth:`~vitft_app.jobs.JobRunner.run_training`, exactly like a run started from the
Train tab), named ``<sweep>-t<trial number>`` and tagged with ``{"sweep": name, "trial": n}`` in
its ``meta.json``. Trials run one after another inside one background job
(:meth:`~vitft_app.jobs.JobRunner.start_task`), so the one-job-at-a-time rule holds and Stop ends
the sweep after stopping the current trial.

The objective is the run's best model-selection metric (maximized): validation accuracy, or mAP for
a multi-label dataset. Pruning: each ``EvalDone`` event reports that metric at its epoch (``trial.report``); when the pruner (by default Optuna's
``MedianPruner``) says so, the trial's stop event is set, the run ends as ``stopped`` after that
epoch, and the trial is marked pruned. The final epoch is never pruned: there is nothing left to
save then.

The study lives in ``RUNS_DIR/sweeps.db`` (Optuna's SQLite storage, one study per sweep name) and
is opened with ``load_if_exists=True``: after a restart, the same name continues the same study,
with trial numbers going on from where they stopped. ``n_trials`` is the *total* number of trials
the study should have, so asking for 10 again after 6 ran adds 4.

Search space: ``{parameter: spec}`` where a spec is a list of values (categorical) or a range
``{"low": L, "high": H, "log": bool}`` (int fields give integer ranges). Only TrainConfig fields
in :data:`SEARCHABLE` can be searched, and only those this version's TrainConfig has
(:func:`available_parameters`).
"""

from __future__ import annotations

import logging
import dataclasses
import json
import math
import os
import re
import threading
import typing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, get_args
from collections import Counter

import pandas as pd

from .baseline import Baseline, accuracy_with_baseline, is_weak, run_baseline
from .scratch import is_scratch_model
from .config import TrainConfig
from .events import EvalDone, Event, RunFailed, RunFinished
from .jobs import BusyError, error_message
from .modeling import summarize_model
from .run_status import RunStatus
from .runs import read_status
from .tracking import check_report_to
from .training import preflight

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # optuna is imported lazily: the engine stays importable without it
    import optuna

    from .jobs import Job, JobRunner

Sampler = Literal["tpe", "grid"]

#: TrainConfig fields a sweep may vary (those the running version lacks are not offered).
SEARCHABLE = ("lr", "weight_decay", "freeze_depth", "batch_size", "augment", "label_smoothing", "mixup", "cutmix")

#: Suggested ranges (the UI's defaults). lr is searched on a log scale.
DEFAULT_RANGES: dict[str, Any] = {
    "lr": {"low": 1e-5, "high": 1e-2, "log": True},
    "weight_decay": {"low": 0.0, "high": 0.1},
    "freeze_depth": {"low": 0, "high": 6},
    "batch_size": [16, 32, 64],
    "label_smoothing": {"low": 0.0, "high": 0.2},
    "mixup": {"low": 0.0, "high": 0.4},
    "cutmix": {"low": 0.0, "high": 1.0},
}

#: The space searched when none is given.
DEFAULT_SPACE: dict[str, Any] = {"lr": DEFAULT_RANGES["lr"], "weight_decay": DEFAULT_RANGES["weight_decay"]}

#: Points per range under the grid sampler (low, middle, high; geometric middle for log ranges).
GRID_POINTS = 3

STUDY_FILE = "sweeps.db"


class SweepError(ValueError):
    """A sweep cannot start or has nothing to show (the message says why)."""


def _require_optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - optuna is a dependency
        raise SweepError("Sweeps need the optuna package: pip install optuna") from exc
    return optuna


# ---- search space ---------------------------------------------------------------------------


def config_fields() -> dict[str, dataclasses.Field]:
    """TrainConfig's fields by name."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def available_parameters() -> list[str]:
    """The :data:`SEARCHABLE` parameters this version's TrainConfig has (in that order)."""
    fields = config_fields()
    return [name for name in SEARCHABLE if name in fields]


def augment_choices() -> list[str]:
    """The augmentation policies TrainConfig accepts (from its ``Literal`` annotation)."""
    hint = typing.get_type_hints(TrainConfig).get("augment")
    return list(get_args(hint)) or ["none", "basic"]


def _field_type(name: str) -> type:
    default = config_fields()[name].default
    return str if name == "augment" else type(default)


def _number(value: Any, kind: type, name: str) -> Any:
    try:
        number = float(value)  # YAML reads 1e-5 (no dot) as a string
    except (TypeError, ValueError):
        raise SweepError(f"{name}: {value!r} is not a number") from None
    if kind is int:
        if number != int(number):
            raise SweepError(f"{name}: {value!r} is not a whole number")
        return int(number)
    return number


def validate_space(space: dict[str, Any]) -> dict[str, Any]:
    """Checks a search space and normalizes its numbers.

    Args:
        space: ``{parameter: [values...] | {"low", "high", "log"}}``.

    Returns:
        The normalized space (numbers as int or float, ``log`` as bool), JSON-ready.

    Raises:
        SweepError: an unknown or unsupported parameter, an empty list, ``low > high``, a log
            range that does not start above 0, or an augmentation policy TrainConfig rejects.
    """
    if not isinstance(space, dict) or not space:
        raise SweepError("The search space is empty: choose at least one parameter to search")
    available = available_parameters()
    normalized: dict[str, Any] = {}
    for name, spec in space.items():
        if name not in SEARCHABLE:
            raise SweepError(f"{name} cannot be searched; choose from {available}")
        if name not in available:
            raise SweepError(f"{name} is not a setting of this vitft version (TrainConfig has no {name} field)")
        kind = _field_type(name)
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise SweepError(f"{name}: give at least one value")
            values = [str(v) if kind is str else _number(v, kind, name) for v in spec]
            if name == "augment":
                bad = [v for v in values if v not in augment_choices()]
                if bad:
                    raise SweepError(f"augment: {bad} not among {augment_choices()}")
            normalized[name] = list(dict.fromkeys(values))
        elif isinstance(spec, dict) and "low" in spec and "high" in spec:
            if kind is str:
                raise SweepError(f"{name} takes a list of values, not a range")
            low, high = _number(spec["low"], kind, name), _number(spec["high"], kind, name)
            log = bool(spec.get("log", False))
            if low > high:
                raise SweepError(f"{name}: low ({low}) is greater than high ({high})")
            if log and low <= 0:
                raise SweepError(f"{name}: a log range must start above 0, got low={low}")
            normalized[name] = {"low": low, "high": high, "log": log}
        else:
            raise SweepError(f"{name}: give a list of values or a range {{\"low\": L, \"high\": H, \"log\": false}}")
    return normalized


def load_space_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a search space from a JSON or YAML file (see the module docstring for the format).

    Raises:
        FileNotFoundError: the file does not exist.
        SweepError: the file cannot be parsed or holds an invalid space.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            space = yaml.safe_load(text)
        else:
            space = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is one message
        raise SweepError(f"Cannot read the search space {path}: {exc}") from exc
    return validate_space(space)


def _grid_values(spec: Any, kind: type) -> list[Any]:
    if isinstance(spec, list):
        return spec
    low, high, log = spec["low"], spec["high"], spec["log"]
    if low == high:
        return [low]
    if log:
        points = [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / (GRID_POINTS - 1))
                  for i in range(GRID_POINTS)]
    else:
        points = [low + (high - low) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
    if kind is int:
        return sorted(set(int(round(p)) for p in points))
    return [float(f"{p:.6g}") for p in points]


def grid_space(space: dict[str, Any]) -> dict[str, list[Any]]:
    """The grid the grid sampler walks: lists stay, ranges become :data:`GRID_POINTS` points."""
    return {name: _grid_values(spec, _field_type(name)) for name, spec in space.items()}


def distributions(space: dict[str, Any], sampler: Sampler = "tpe") -> dict[str, Any]:
    """Optuna distributions for a validated space (every parameter categorical under ``grid``)."""
    optuna = _require_optuna()
    dist = optuna.distributions
    if sampler == "grid":
        return {name: dist.CategoricalDistribution(values) for name, values in grid_space(space).items()}
    result: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            result[name] = dist.CategoricalDistribution(spec)
        elif _field_type(name) is int:
            result[name] = dist.IntDistribution(spec["low"], spec["high"], log=spec["log"])
        else:
            result[name] = dist.FloatDistribution(spec["low"], spec["high"], log=spec["log"])
    return result


def grid_size(space: dict[str, Any]) -> int:
    """Number of points of :func:`grid_space`."""
    return math.prod(len(values) for values in grid_space(space).values())


# ---- study storage ----------------------------------------------------------------------------


def storage_url(runs_dir: str | os.PathLike) -> str:
    """``sqlite:///RUNS_DIR/sweeps.db``, the Optuna storage of every sweep in a runs folder."""
    return "sqlite:///" + str(Path(runs_dir).expanduser().resolve() / STUDY_FILE)


def check_sweep_name(name: str) -> str:
    """Trims and checks a sweep name (letters, digits, ``.``, ``_``, ``-``; at most 60).

    Raises:
        SweepError: an empty or invalid name.
    """
    name = (name or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}", name):
        raise SweepError(f"A sweep name uses letters, digits, '.', '_' and '-' (at most 60), got {name!r}")
    return name


def default_sweep_name() -> str:
    """``sweep-YYYYmmdd-HHMMSS``."""
    return datetime.now().strftime("sweep-%Y%m%d-%H%M%S")


def make_sampler(sampler: Sampler, space: dict[str, Any], seed: int) -> Any:
    """A seeded ``TPESampler`` or a ``GridSampler`` over :func:`grid_space`.

    Raises:
        SweepError: an unknown sampler name.
    """
    optuna = _require_optuna()
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(space), seed=seed)
    raise SweepError(f"sampler must be 'tpe' or 'grid', got {sampler!r}")


def default_pruner(startup_trials: int = 3) -> Any:
    """Optuna's ``MedianPruner``: prune a trial whose best val accuracy so far is below the median
    of earlier trials at the same epoch, once ``startup_trials`` trials have finished."""
    optuna = _require_optuna()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)


def open_study(
    runs_dir: str | os.PathLike,
    name: str,
    sampler: Sampler = "tpe",
    space: dict[str, Any] | None = None,
    seed: int = 42,
    pruner: Any = None,
) -> optuna.Study:
    """Creates or loads (``load_if_exists=True``) the sweep's study in ``RUNS_DIR/sweeps.db``.

    The sampler's seed is ``seed + trials already in the study``, so a continued TPE sweep does
    not replay the random startup points of the first session.

    Args:
        runs_dir: the runs folder.
        name: the sweep name (the study name).
        sampler: ``"tpe"`` or ``"grid"``.
        space: the validated space (needed by the grid sampler; default :data:`DEFAULT_SPACE`).
        seed: sampler seed.
        pruner: an Optuna pruner (default :func:`default_pruner`); ``optuna.pruners.NopPruner()``
            turns pruning off.
    """
    optuna = _require_optuna()
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=storage_url(runs_dir), study_name=check_sweep_name(name),
                                direction="maximize", load_if_exists=True,
                                pruner=pruner if pruner is not None else default_pruner())
    study.sampler = make_sampler(sampler, space or DEFAULT_SPACE, seed + len(study.trials))
    return study


def list_sweeps(runs_dir: str | os.PathLike) -> list[str]:
    """Sweep names in the runs folder, newest first ([] when no sweep ran there)."""
    path = Path(runs_dir).expanduser().resolve() / STUDY_FILE
    if not path.is_file():
        return []
    optuna = _require_optuna()
    summaries = optuna.get_all_study_summaries(storage_url(runs_dir), include_best_trial=False)
    stamp = lambda s: s.datetime_start or datetime.min  # noqa: E731
    return [s.study_name for s in sorted(summaries, key=stamp, reverse=True)]


def load_sweep(runs_dir: str | os.PathLike, name: str) -> optuna.Study:
    """Loads an existing sweep's study.

    Raises:
        SweepError: no sweep of that name in the runs folder.
    """
    if name not in list_sweeps(runs_dir):
        raise SweepError(f"No sweep named {name!r} in {runs_dir}")
    optuna = _require_optuna()
    return optuna.load_study(study_name=name, storage=storage_url(runs_dir))


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Marks ``RUNNING`` trials whose run is not being trained any more (the app or the CLI died
    mid-trial) as failed, so they stop looking busy and the sweep can continue.

    Returns:
        The numbers of the trials marked failed.
    """
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_dir = trial.user_attrs.get("run_dir")
        if run_dir and read_status(run_dir).is_active:
            continue  # still training in a live process
        try:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        except RuntimeError as exc:  # see _tell
            if "Study.stop" not in str(exc):
                raise
        failed.append(trial.number)
        logger.info("sweep trial %d was left running by a process that is gone: marked failed", trial.number)
    return failed


# ---- running a sweep --------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` returns.

    Attributes:
        name: the sweep name.
        trials_run: trials started in this call.
        total_trials: trials in the study now.
        stopped: True when Stop ended the sweep early.
        best_value: best validation accuracy of the study (0..1), None without a complete trial.
        best_run_dir: the run folder of the best trial.
    """

    name: str
    trials_run: int
    total_trials: int
    stopped: bool
    best_value: float | None
    best_run_dir: str | None


def _best(study: optuna.Study) -> tuple[float | None, str | None]:
    try:
        best = study.best_trial
    except ValueError:
        return None, None
    return best.value, best.user_attrs.get("run_dir")


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: every trial except those only enqueued (waiting)."""
    from optuna.trial import TrialState

    return sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))


def _tell(study: optuna.Study, trial: Any, value: float | None = None, state: Any = None) -> None:
    """``study.tell`` for ask-and-tell loops. The grid sampler calls ``study.stop()`` from
    ``after_trial`` when its grid is used up, which Optuna only allows inside ``optimize`` and
    otherwise raises; the trial is stored anyway (Optuna stores it in a ``finally``) and this loop
    ends by counting, so that one error is ignored."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def remaining_trials(study: optuna.Study, n_trials: int, sampler: Sampler, space: dict[str, Any]) -> int:
    """Trials still to run so the study reaches ``n_trials`` in total (capped by the grid size
    under the grid sampler)."""
    total = min(n_trials, grid_size(space)) if sampler == "grid" else n_trials
    return max(total - counted_trials(study), 0)


def run_sweep(
    runner: JobRunner,
    base_config: TrainConfig,
    space: dict[str, Any] | None,
    n_trials: int,
    *,
    name: str,
    sampler: Sampler = "tpe",
    pruner: Any = None,
    report_to: str | None = None,
    listener: Callable[[Event], None] | None = None,
    job: Job | None = None,
    study: optuna.Study | None = None,
) -> SweepResult:
    """Runs trials one after another in the calling thread until the study has ``n_trials``.

    Args:
        runner: makes and trains each trial's run (:meth:`~vitft_app.jobs.JobRunner.create_run`,
            :meth:`~vitft_app.jobs.JobRunner.run_training`); its runs folder holds the study.
        base_config: the fixed settings; each trial replaces the searched fields, ``run_name``
            (``<name>-t<number>``) and ``output_dir`` (the runner's runs folder).
        space: the search space (validated here; default :data:`DEFAULT_SPACE`).
        n_trials: total trials the study should have (trials already in it count).
        name: the sweep name.
        sampler: ``"tpe"`` (seeded with ``base_config.seed``) or ``"grid"``.
        pruner: an Optuna pruner (default: ``MedianPruner(n_startup_trials=3)``).
        report_to: ``"none"``, ``"tensorboard"`` or ``"mlflow"`` for every trial (None: the
            runner's :attr:`~vitft_app.jobs.JobRunner.report_to`).
        listener: receives every event of every trial.
        job: the task job this runs in: its ``stop_event`` ends the sweep, ``run_dir`` and
            ``config`` follow the current trial.
        study: an already opened study (default: :func:`open_study`).

    Returns:
        A :class:`SweepResult`.
    """
    from optuna.trial import TrialState


    space = validate_space(DEFAULT_SPACE if space is None else space)
    report_to = runner.report_to if report_to is None else report_to
    runs_dir = runner.store.root
    if study is None:
        study = open_study(runs_dir, name, sampler, space, base_config.seed, pruner)
    study.set_user_attr("base_config", base_config.to_dict())
    study.set_user_attr("space", space)
    study.set_user_attr("sampler", sampler)
    fail_stale_trials(study)
    stop_event = job.stop_event if job is not None else threading.Event()
    todo = remaining_trials(study, n_trials, sampler, space)
    trial_distributions = distributions(space, sampler)
    started = 0
    for _ in range(todo):
        if stop_event.is_set():
            break
        trial = study.ask(trial_distributions)
        started += 1
        try:
            config = dataclasses.replace(base_config, **trial.params, run_name=f"{name}-t{trial.number}",
                                         output_dir=str(runs_dir))
            report = preflight(config, runner.device)
        except Exception as exc:  # noqa: BLE001 - a bad trial fails, the sweep goes on
            logger.warning("sweep %s: trial %d fails before training: %s", name, trial.number, error_message(exc),
                           exc_info=not isinstance(exc, ValueError))
            trial.set_user_attr("error", error_message(exc))
            _tell(study, trial, state=TrialState.FAIL)
            continue
        run_dir = runner.create_run(config, meta={"sweep": name, "trial": trial.number})
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("run_id", run_dir.name)
        trial_stop = threading.Event()
        if job is not None:
            job.follow_run(run_dir, config, trial_stop)
        outcome: dict[str, Any] = {"best": None, "pruned": False, "error": None, "status": None}

        def on_event(event: Event, trial: Any = trial, config: TrainConfig = config,
                     trial_stop: threading.Event = trial_stop, outcome: dict = outcome) -> None:
            # The pruning hook: report each epoch's val accuracy; never prune the final epoch.
            if isinstance(event, EvalDone):
                # The run's own model-selection metric: val accuracy, or mAP for multi-label data.
                outcome["best"] = event.best_metric if event.best_metric is not None else event.best_val_accuracy
                trial.report(event.val_map if event.val_map is not None else event.val_accuracy, event.epoch)
                if event.epoch < config.epochs and not stop_event.is_set() and trial.should_prune():
                    outcome["pruned"] = True
                    trial_stop.set()
            elif isinstance(event, RunFinished):
                outcome["status"] = event.status
            elif isinstance(event, RunFailed):
                outcome["error"] = event.error
            if listener is not None:
                listener(event)

        try:
            runner.run_training(config, run_dir, trial_stop, listener=on_event, report=report, report_to=report_to)
        finally:
            if job is not None:
                job.unlink_stop_event(trial_stop)
        if outcome["error"] is not None:
            trial.set_user_attr("error", outcome["error"])
            _tell(study, trial, state=TrialState.FAIL)
        elif outcome["pruned"]:
            _tell(study, trial, state=TrialState.PRUNED)
        elif outcome["status"] == "completed" and outcome["best"] is not None:
            _tell(study, trial, outcome["best"])
        else:  # Stop pressed during the trial: not a measurement of its settings
            trial.set_user_attr("error", "stopped before it finished")
            _tell(study, trial, state=TrialState.FAIL)
    best_value, best_run = _best(study)
    return SweepResult(name=name, trials_run=started, total_trials=counted_trials(study), stopped=stop_event.is_set(),
                       best_value=best_value, best_run_dir=best_run)


def start_sweep(
    runner: JobRunner,
    base_config: TrainConfig,
    space: dict[str, Any] | None,
    n_trials: int,
    *,
    name: str | None = None,
    sampler: Sampler = "tpe",
    pruner: Any = None,
    report_to: str | None = None,
    listener: Callable[[Event], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Job:
    """Checks everything that can be checked now, then runs :func:`run_sweep` as the runner's job.

    Checked before the job starts (so a sweep that cannot work is refused with a message): the
    space, the name, the sampler, ``report_to``, the dataset and model (``preflight`` of the base
    config), a ``freeze_depth`` range beyond the model's depth, and that trials remain to run.

    Args:
        runner: the app's or the CLI's job runner.
        base_config: the fixed settings.
        space: the search space (default :data:`DEFAULT_SPACE`).
        n_trials: total trials the study should have (>= 1; trials already in it count).
        name: the sweep name (default ``sweep-<timestamp>``); an existing name continues it.
        sampler: ``"tpe"`` or ``"grid"``.
        pruner: an Optuna pruner (default ``MedianPruner(n_startup_trials=3)``).
        report_to: ``"none"``, ``"tensorboard"`` or ``"mlflow"`` (None: the runner's default).
        listener: receives every event of every trial.
        progress: ``progress(done, total)`` while the preflight decodes the dataset.

    Returns:
        The started task :class:`~vitft_app.jobs.Job`; ``job.result`` is the :class:`SweepResult`.

    Raises:
        SweepError: bad space, name, sampler or trial count, or nothing left to run.
        BusyError: a job is already running.
        TrackingUnavailable: the ``report_to`` package is missing.
        ModelLoadError, ValueError, FileNotFoundError: from the preflight.
    """

    if runner.is_busy():
        raise BusyError(f"A job is already in progress ({runner.current.name}). Wait for it to finish or press Stop first.")
    space = validate_space(DEFAULT_SPACE if space is None else space)
    name = check_sweep_name(name or default_sweep_name())
    if sampler not in get_args(Sampler):
        raise SweepError(f"sampler must be 'tpe' or 'grid', got {sampler!r}")
    if int(n_trials) < 1:
        raise SweepError(f"trials must be >= 1, got {n_trials}")
    report_to = check_report_to(runner.report_to if report_to is None else report_to)
    base_config = dataclasses.replace(base_config, output_dir=str(runner.store.root))
    report = preflight(base_config, runner.device, progress)
    if "freeze_depth" in space:
        scratch = base_config.image_size if is_scratch_model(base_config.model) else None
        blocks = summarize_model(base_config.model, report.classes, 0, scratch).num_blocks
        top = max(space["freeze_depth"]) if isinstance(space["freeze_depth"], list) else space["freeze_depth"]["high"]
        if top > blocks:
            raise SweepError(f"freeze_depth goes up to {top}, but this model has {blocks} blocks")
    study = open_study(runner.store.root, name, sampler, space, base_config.seed, pruner)
    fail_stale_trials(study)
    if remaining_trials(study, int(n_trials), sampler, space) == 0:
        raise SweepError(
            f"Sweep {name!r} already has {counted_trials(study)} trial(s)"
            + (f" (the grid has {grid_size(space)} points)" if sampler == "grid" else "")
            + f"; ask for more than {counted_trials(study)} trials in total to continue it."
        )

    def task(job: Job) -> SweepResult:
        return run_sweep(runner, base_config, space, int(n_trials), name=name, sampler=sampler, pruner=pruner,
                         report_to=report_to, listener=listener, job=job, study=study)

    return runner.start_task(f"sweep {name}", task)


# ---- results ----------------------------------------------------------------------------------


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value (best val accuracy), the searched parameters,
    run id, duration in seconds and error."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        rows.append({"trial": trial.number, "state": trial.state.name.lower(), "val_accuracy": trial.value,
                     **trial.params, "run_id": trial.user_attrs.get("run_id", ""),
                     "duration_s": None if duration is None else round(duration, 1),
                     "error": trial.user_attrs.get("error", "")})
    return pd.DataFrame(rows)


def figure_history(study: optuna.Study) -> Any:
    """Optuna's optimization-history chart (plotly): each complete trial's value and the best so far.

    Raises:
        SweepError: no trial has completed yet.
    """
    from optuna.trial import TrialState
    from optuna.visualization import plot_optimization_history

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise SweepError("No trial has completed yet: the history appears after the first one.")
    status = _best_status(study)
    baseline = None if status is None else run_baseline(status)
    fig = plot_optimization_history(study, target_name="val mAP" if _is_map(status) else "val accuracy")
    fig.update_layout(template="plotly_white", height=340)
    if baseline is not None:  # the trials share one validation split, so one majority-class rate
        from .plots import add_baseline_line

        add_baseline_line(fig, baseline)
    return fig


def _best_status(study: optuna.Study) -> RunStatus | None:
    """The best trial's ``status.json`` (None before a complete trial or when its folder is gone):
    the trials share one validation split, so its baseline and metric are the study's."""
    _, run_dir = _best(study)
    return read_status(run_dir) if run_dir and Path(run_dir).is_dir() else None


def _is_map(status: RunStatus | None) -> bool:
    """True when the objective is validation mAP (multi-label data)."""
    return status is not None and status.monitor == "val_map"


def sweep_baseline(study: optuna.Study) -> Baseline | None:
    """The validation majority-class baseline of the study's trials (all train on one split), read
    from the best trial's run folder (:func:`vitft_app.baseline.run_baseline`); None before a
    complete trial, for multi-label data (the objective is then mAP) and for older runs."""
    status = _best_status(study)
    return None if status is None else run_baseline(status)


def figure_importance(study: optuna.Study) -> Any:
    """Optuna's parameter-importance chart (fANOVA, seeded), plotly.

    Raises:
        SweepError: fewer than 2 complete trials, no parameter took 2 different values, or every
            complete trial has the same value.
    """
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState
    from optuna.visualization import plot_param_importances

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        raise SweepError(f"Parameter importance needs at least 2 completed trials; this sweep has {len(complete)}.")
    common = set.intersection(*(set(t.params) for t in complete))
    varying = [p for p in common if len({json.dumps(t.params[p]) for t in complete}) > 1]
    if not varying:
        raise SweepError("Parameter importance needs a parameter that took different values in completed trials.")
    if len({t.value for t in complete}) < 2:  # fANOVA's trees then have zero variance and raise
        raise SweepError(f"Parameter importance needs completed trials with different results; all {len(complete)}"
                         f" scored {complete[0].value:.4f}, so no parameter made a difference yet.")
    fig = plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=sorted(varying))
    fig.update_layout(template="plotly_white", height=340)
    return fig


def best_config(study: optuna.Study) -> TrainConfig:
    """The settings of the best trial, for a full run (``run_name`` ``<sweep>-best``).

    Taken from the best trial's ``config.json`` when its run folder still exists, else from the
    study's base config plus the trial's parameters.

    Raises:
        SweepError: no trial has completed.
    """
    try:
        best = study.best_trial
    except ValueError:
        raise SweepError("No trial has completed yet, so there is no best configuration.") from None
    run_dir = best.user_attrs.get("run_dir")
    config_file = Path(run_dir) / "config.json" if run_dir else None
    if config_file is not None and config_file.is_file():
        config = TrainConfig.from_json_file(config_file)
    else:
        base = study.user_attrs.get("base_config")
        if not base:
            raise SweepError("The best trial's run folder is gone and the study has no base config.")
        config = dataclasses.replace(TrainConfig.from_dict(base), **best.params)
    return dataclasses.replace(config, run_name=f"{study.study_name}-best")


def train_best(runner: JobRunner, study: optuna.Study, epochs: int | None = None, report_to: str | None = None) -> Job:
    """Starts a full run from the best trial's settings (tagged with the sweep in ``meta.json``).

    Args:
        runner: the job runner.
        study: the sweep's study.
        epochs: train this many epochs instead of the trial's (None keeps them).
        report_to: ``"none"``, ``"tensorboard"`` or ``"mlflow"`` (None: the runner's default).

    Raises:
        SweepError: no completed trial. BusyError and the errors of
            :meth:`~vitft_app.jobs.JobRunner.start`.
    """
    config = best_config(study)
    if epochs:
        config = dataclasses.replace(config, epochs=int(epochs))
    config = dataclasses.replace(config, output_dir=str(runner.store.root))
    return runner.start(config, report_to=report_to,
                        meta={"sweep": study.study_name, "best_of_trial": study.best_trial.number})


def study_summary(study: optuna.Study) -> str:
    """One Markdown line: trials by state and the best value with its run, an accuracy beside the
    validation majority-class baseline (:func:`sweep_baseline`) and called weak near it."""
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trials yet"
    value, run_dir = _best(study)
    best = ""
    if value is not None and run_dir:
        status = _best_status(study)
        if _is_map(status):
            best = f"; best val mAP **{value:.4f}** (`{Path(run_dir).name}`)"
        else:
            baseline = None if status is None else run_baseline(status)
            best = f"; best val accuracy **{accuracy_with_baseline(value, baseline)}** (`{Path(run_dir).name}`)"
            if is_weak(value, baseline):
                best += " · ⚠ weak: near always answering the most common class"
    return f"**{study.study_name}**: {len(study.trials)} trial(s) ({states}){best}"

