"""The job runner: owns the training thread, its Stop event, and the one-job-at-a-time rule.

A job is either one training run (:meth:`JobRunner.start`) or a callable that may train several
runs one after another in the same thread (:meth:`JobRunner.start_task`, used by sweeps); both
count as "the" job, so a sweep and a training run never overlap.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
import os
import socket
import subprocess
import sys
import time

from .checkpoint import DiskFullError, ResumeError, disk_full_error, has_checkpoint, load_checkpoint
from .config import TrainConfig
from .device import cuda_device_count, release_device_memory
from .events import Event, RunFailed, RunFinished
from .runs import RunRecorder, RunStore, STOP_FILE, model_dir, read_status, read_status_raw
from .distributed import env_world_size
from .modeling import ModelLoadError
from .model_card import write_model_card
from . import tracking  # tracking.create_tracker is looked up per run (tests replace it)
from .tracking import check_report_to
from .training import DatasetError, NonFiniteLossError, preflight, resume_run, train


logger = logging.getLogger(__name__)


def settle_status(run_dir: Path, error: str) -> None:
    """Marks a run whose training ended without a final status as failed with ``error``.

    The last line of defence of "no stuck runs": when even the ``RunFailed`` write failed (a full
    disk), ``status.json`` would keep "running" with this live process's pid, and Stop, Delete
    and Resume would all refuse. Retried once after a short pause; never raises.
    """

    for attempt in range(2):
        status = read_status_raw(run_dir)
        if not status.is_active:
            return
        status.update(status="failed", error=error)
        try:
            (run_dir / "status.json").write_text(status.to_json(), encoding="utf-8")
            return
        except OSError:
            if attempt == 0:
                time.sleep(0.5)
    logger.error("could not mark %s as failed: %s", run_dir, error)


class BusyError(RuntimeError):
    """A second job was started while one is running."""


@dataclass
class Job:
    """A background job: its run folder, thread and Stop event.

    For a training job ``run_dir`` and ``config`` are the run's. For a task job (a sweep) they
    follow the run the task is training now (``run_dir`` is the runs folder until the first run
    folder exists), and ``name`` says what the job is.
    """

    run_dir: Path
    config: TrainConfig | None
    thread: threading.Thread
    stop_event: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    """Set when the run emitted ``RunFinished`` or ``RunFailed`` (the thread may still be writing
    the model card and releasing memory)."""
    done: threading.Event = field(default_factory=threading.Event)
    """Set by the thread as its very last action. Waiting on it, not on ``thread.join``, stays
    correct when Ctrl-C interrupts the wait (an interrupted ``join`` can return early in CPython)."""
    name: str = ""
    """What the job is, for messages: the run id, or e.g. ``"sweep lr-search"``."""
    kind: str = "train"
    """``"train"`` (one run) or ``"task"`` (a callable, see :meth:`JobRunner.start_task`)."""
    linked_stop_events: list[threading.Event] = field(default_factory=list)
    """Extra events set together with ``stop_event`` by :meth:`request_stop` (the stop event of
    the sweep trial that is training now)."""
    error: str | None = None
    """One line when a task job raised (training runs record their errors in the run folder)."""
    result: Any = None
    """What a task job's callable returned."""

    @property
    def running(self) -> bool:
        """True until the training thread has finished."""
        return not self.done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the thread to finish; returns True when it has."""
        return self.done.wait(timeout)

    def request_stop(self) -> None:
        """Sets ``stop_event`` and every linked stop event."""
        self.stop_event.set()
        for event in list(self.linked_stop_events):
            event.set()

    def link_stop_event(self, event: threading.Event) -> None:
        """Makes ``event`` set on Stop too (and sets it now when Stop was already pressed)."""
        self.linked_stop_events.append(event)
        if self.stop_event.is_set():
            event.set()

    def unlink_stop_event(self, event: threading.Event) -> None:
        """Undoes :meth:`link_stop_event` (no-op when ``event`` is not linked)."""
        if event in self.linked_stop_events:
            self.linked_stop_events.remove(event)

    def follow_run(self, run_dir: Path, config: TrainConfig, stop_event: threading.Event) -> None:
        """Points a task job at the run it is training now (a sweep's trial): the UI shows that
        run, and Stop also sets the run's ``stop_event``."""
        self.run_dir, self.config = run_dir, config
        self.link_stop_event(stop_event)


def error_message(exc: BaseException) -> str:
    """One line for people: the exception's message, with its type for unexpected errors."""

    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (ModelLoadError, DatasetError, NonFiniteLossError, ValueError, FileNotFoundError,
                        DiskFullError)):
        return text
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return f"Out of memory: {text}. Try a smaller batch size, a smaller image size or a higher freeze depth."
    return f"{type(exc).__name__}: {text}"


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with its dataset path, and a model given as an existing local folder, made
    absolute against the current folder, as the run's ``config.json`` stores them: ``vitft train
    --resume`` and the app then read the same dataset and model whatever folder they start in (a
    relative ``--data big`` resumed elsewhere used to train on another folder named ``big``).
    A Hub model id (no such local folder) is left as it is.

    Args:
        config: the settings as given.

    Returns:
        A copy with absolute ``data_dir`` and, for a local folder, ``model``.
    """
    changes: dict[str, str] = {}
    if config.data_dir and not Path(config.data_dir).expanduser().is_absolute():
        changes["data_dir"] = str(Path(config.data_dir).expanduser().absolute())
    model = Path(config.model).expanduser()
    if config.model and not model.is_absolute() and model.exists():
        changes["model"] = str(model.absolute())
    return dataclasses.replace(config, **changes) if changes else config


class JobRunner:
    """Runs one training job at a time in a background thread.

    One instance belongs to one app process (the UI creates it and every browser session
    shares it, on purpose: the machine has one set of cores or GPUs to train on). Exceptions
    in the thread become a ``RunFailed`` event written to the run folder, never swallowed.

    Args:
        runs_dir: the runs folder.
        device: force a device for every job (tests use ``"cpu"``).
        report_to: the tracking backend of runs started without an explicit ``report_to``
            (``"none"``, ``"tensorboard"``, ``"mlflow"``); the UI's tracking switch sets
            :attr:`report_to`.
        launch_multi_gpu: when more than one CUDA GPU is present (and no device is forced),
            :meth:`start` runs the job data-parallel on all of them through
            :meth:`start_launched` (the app sets this; the CLI is launched by the user instead).
        options: engine options of every run (:class:`~vitft_app.training.EngineOptions`:
            caches, progress cadence); None: the defaults. Written to each run's ``train.log``.
    """

    def __init__(
        self, runs_dir: str | Path, device: str | None = None, report_to: str = "none", launch_multi_gpu: bool = False,
        options: Any = None,
    ):
        self.store = RunStore(runs_dir)
        self.device = device
        self.options = options
        self.report_to = report_to
        self.launch_multi_gpu = launch_multi_gpu
        self._lock = threading.Lock()
        self._job: Job | None = None

    @property
    def current(self) -> Job | None:
        """The latest job (running or finished) started by this runner, if any."""
        return self._job

    def is_busy(self) -> bool:
        """True while a job's thread is alive."""
        return self._job is not None and self._job.running

    def _refuse_if_busy(self) -> None:
        job = self._job
        if job is not None and job.running and job.finished.is_set():
            job.wait(30)  # the run has ended; only its cleanup is left, so wait instead of refusing
        if self.is_busy():
            raise self._busy_error()

    def _busy_error(self) -> BusyError:
        job = self._job
        what = job.name or job.run_dir.name
        if job.kind == "train":
            return BusyError(f"A training run is already in progress ({what}). Wait for it to finish or press Stop first.")
        return BusyError(f"A job is already in progress ({what}). Wait for it to finish or press Stop first.")

    def start(
        self,
        config: TrainConfig,
        listener: Callable[[Event], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        report_to: str | None = None,
        meta: dict[str, Any] | None = None,
        on_run_created: Callable[[Path], None] | None = None,
        run_dir: Path | None = None,
    ) -> Job:
        """Creates the run folder and starts training in a daemon thread.

        Args:
            config: the run's settings.
            listener: also receives every event (the CLI's progress bar), after the run folder
                recorded it.
            progress: ``progress(done, total)`` while the preflight decodes the dataset's images.
            report_to: ``"none"``, ``"tensorboard"`` or ``"mlflow"``: also write the metrics there
                (see :mod:`vitft_app.tracking`); None uses :attr:`report_to`. A separate argument
                until it joins TrainConfig.
            meta: written to the run's ``meta.json`` (e.g. ``{"sweep": name}``).
            on_run_created: called with the new run folder before the thread starts (a
                data-parallel run tells the other processes where it is).
            run_dir: use this existing run folder (with its ``config.json``) instead of creating
                one (the app's multi-GPU launch creates it first).

        Returns:
            The started :class:`Job`.

        Raises:
            BusyError: a job is already running; the message names it.
            TrackingUnavailable: ``report_to`` names a package that is not installed.
            ModelLoadError, ValueError, FileNotFoundError: from :func:`~vitft_app.training.preflight`
                (unloadable model, precision the device lacks, missing dataset folder); no run
                folder is created then.
        """

        config = absolute_paths(config)
        gpus = cuda_device_count()
        if self.launch_multi_gpu and self.device is None and gpus > 1 and env_world_size() == 1 and run_dir is None:
            return self.start_launched(config, gpus, progress=progress)
        with self._lock:
            self._refuse_if_busy()
            report_to = check_report_to(self.report_to if report_to is None else report_to)
            report = preflight(config, self.device, progress)
            run_dir = self.create_run(config, meta) if run_dir is None else Path(run_dir)
            if on_run_created is not None:
                on_run_created(run_dir)
            return self._start_thread(run_dir, config, listener, report=report, report_to=report_to)

    def resume(
        self,
        run_dir: str | Path,
        listener: Callable[[Event], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        report_to: str | None = None,
    ) -> Job:
        """Continues a stopped, failed or interrupted run from its checkpoint, in a daemon thread.

        Args:
            run_dir: the run folder.
            listener, progress, report_to: as :meth:`start`.

        Returns:
            The started :class:`Job` (same run folder).

        Raises:
            BusyError: a job is already running.
            ResumeError: the run is still running, or has no checkpoint (a completed run).
            ModelLoadError, ValueError, FileNotFoundError: from the preflight of the run's config.
        """

        run_dir = Path(run_dir)
        with self._lock:
            self._refuse_if_busy()
            if not (run_dir / "config.json").is_file():
                raise ResumeError(f"{run_dir} is not a run folder (no config.json).")
            status = read_status(run_dir).status
            if status in ("starting", "running") and not self._ended_here(run_dir):
                raise ResumeError(f"{run_dir.name} is still running; stop it before resuming.")
            if not has_checkpoint(run_dir):
                raise ResumeError(
                    f"{run_dir.name} has no checkpoint to resume from"
                    + (" (a completed run deletes it)." if status == "completed" else ".")
                )
            report_to = check_report_to(self.report_to if report_to is None else report_to)
            config = TrainConfig.from_json_file(run_dir / "config.json")
            # Read (and check) the checkpoint now, so an unreadable one is refused at once rather
            # than "Resumed" followed by a failure in the background.
            checkpoint = load_checkpoint(run_dir)
            preflight(config, self.device, progress)
            return self._start_thread(run_dir, config, listener, report=None, report_to=report_to, resume=True,
                                      checkpoint=checkpoint)

    def _ended_here(self, run_dir: Path) -> bool:
        """True when ``run_dir`` was this runner's job and its thread has ended, so a "running"
        status with this process's pid is stale (its final write failed)."""
        job = self._job
        return job is not None and not job.running and Path(job.run_dir).resolve() == Path(run_dir).resolve()

    def _start_thread(
        self,
        run_dir: Path,
        config: TrainConfig,
        listener: Callable[[Event], None] | None,
        *,
        report: Any,
        report_to: str,
        resume: bool = False,
        checkpoint: dict[str, Any] | None = None,
    ) -> Job:
        """Starts :meth:`run_training` in a daemon thread as the current job (lock held)."""

        def body(job: Job) -> None:
            def relay(event: Event) -> None:
                if isinstance(event, (RunFinished, RunFailed)):
                    job.finished.set()
                if listener is not None:
                    listener(event)

            self.run_training(config, run_dir, job.stop_event, listener=relay, report=report,
                              report_to=report_to, resume=resume, checkpoint=checkpoint)

        return self._begin(f"vitft-train-{run_dir.name}", body, run_dir=run_dir, config=config, name=run_dir.name)

    def _begin(self, thread_name: str, body: Callable[[Job], None], **job_fields: Any) -> Job:
        """Makes the current :class:`Job` and runs ``body(job)`` in a daemon thread; afterwards
        device memory is released and ``job.done`` set, whatever happened (lock held)."""

        def target() -> None:
            try:
                body(job)
            finally:
                release_device_memory()
                job.done.set()

        thread = threading.Thread(target=target, name=thread_name, daemon=True)
        job = Job(thread=thread, **job_fields)
        self._job = job
        thread.start()
        return job

    def create_run(self, config: TrainConfig, meta: dict[str, Any] | None = None) -> Path:
        """Creates a run folder (``config.json``, ``status.json``, and ``meta.json`` when ``meta``)."""
        run_dir = self.store.create_run(config)
        if meta:
            from .runs_table import update_meta

            update_meta(run_dir, **meta)
        return run_dir

    def run_training(
        self,
        config: TrainConfig,
        run_dir: Path,
        stop_event: threading.Event,
        *,
        listener: Callable[[Event], None] | None = None,
        report: Any = None,
        report_to: str = "none",
        resume: bool = False,
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        """Trains into an existing run folder in the calling thread; never raises.

        The one place that wires a run: the :class:`~vitft_app.runs.RunRecorder`, then the
        tracker, then ``listener`` receive each event; an exception becomes ``RunFailed`` in the
        run folder; the model card is written after a run that saved a model. Used by the thread
        of :meth:`start` and by task jobs (each sweep trial).

        Args:
            config: the run's settings.
            run_dir: the folder from :meth:`create_run`.
            stop_event: when set, the loop exits before its next micro-batch.
            listener: also receives every event, after the run folder recorded it.
            report: the dataset report from :func:`~vitft_app.training.preflight`, or None to scan.
            report_to: ``"none"``, ``"tensorboard"`` or ``"mlflow"``.
            resume: continue from the run's checkpoint (:func:`~vitft_app.training.resume_run`).
            checkpoint: the checkpoint already read by :meth:`resume` (None: read it here).
        """

        recorder = RunRecorder(run_dir)
        tracker = None

        def emit(event: Event) -> None:
            nonlocal tracker
            recorder(event)
            if tracker is not None:
                try:
                    tracker(event)
                except Exception as exc:  # noqa: BLE001 - tracking is a copy; it never fails the run
                    recorder.log(f"tracking ({report_to}) turned off after an error: {type(exc).__name__}: {exc}")
                    tracker = None
            if listener is not None:
                listener(event)

        try:
            tracker = tracking.create_tracker(report_to, run_dir, config)
            if resume:
                resume_run(run_dir, emit, stop_event=stop_event, device=self.device, checkpoint=checkpoint,
                           options=self.options)
            else:
                train(config, run_dir, emit, stop_event=stop_event, device=self.device, report=report,
                      options=self.options)
            _write_card(run_dir, recorder.log)  # after RunFinished, so not an event
        except BaseException as exc:  # noqa: BLE001 - reported as RunFailed, not swallowed
            if isinstance(exc, OSError) and not isinstance(exc, DiskFullError):
                exc = disk_full_error(exc, "the run's files", run_dir)
            error = error_message(exc)
            if not run_dir.is_dir():
                error = f"the run folder {run_dir} was deleted or moved while training; nothing more could be saved"
            failed = RunFailed(error=error, traceback=traceback.format_exc())
            try:
                emit(failed)
            except Exception as record_exc:  # noqa: BLE001 - a full disk or a deleted folder
                logger.error("could not record the failure of %s: %s", run_dir.name, record_exc)
                if listener is not None:
                    listener(failed)  # the caller (CLI, UI) still hears why the run ended
            settle_status(run_dir, failed.error)
        finally:
            if tracker is not None:
                try:
                    tracker.close()
                except Exception as exc:  # noqa: BLE001 - see emit
                    recorder.log(f"tracking ({report_to}) could not be closed: {exc}")

    def start_launched(
        self,
        config: TrainConfig,
        num_processes: int,
        launcher: str = "accelerate",
        progress: Callable[[int, int], None] | None = None,
    ) -> Job:
        """Runs the job data-parallel in ``num_processes`` processes started by ``accelerate
        launch`` (or ``torchrun``), each one ``vitft train --run-dir RUN``.

        The run folder is created here, so the app shows it at once; the launched rank 0 writes
        its status and metrics there exactly as an in-process run (the UI polls the same files).
        Stop creates ``RUN/STOP``, which rank 0 turns into a clean stop of every process. The
        launcher's output goes to ``RUN/launch.log``; a launch that dies without finishing the
        run marks it failed with the log's last lines.

        Args:
            config: the run's settings.
            num_processes: processes (one per GPU).
            launcher: ``"accelerate"`` (``accelerate launch --multi_gpu``) or ``"torchrun"``
                (tests use it on CPU with gloo).
            progress: as :meth:`start`.

        Raises:
            BusyError, ModelLoadError, ValueError, FileNotFoundError: as :meth:`start`.
        """


        with self._lock:
            self._refuse_if_busy()
            preflight(config, self.device, progress)
            run_dir = self.create_run(config)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = str(sock.getsockname()[1])
            if launcher == "accelerate":
                head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                        "--num_processes", str(num_processes), "--main_process_port", port, "--mixed_precision",
                        "no", "--dynamo_backend", "no", "-m"]
            elif launcher == "torchrun":
                head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
                        "--master_port", port, "-m"]
            else:
                raise ValueError(f"launcher must be 'accelerate' or 'torchrun', got {launcher!r}")
            command = head + ["vitft_app.cli", "train", "--run-dir", str(run_dir), "--report-to", self.report_to]

            def work(job: Job, emit: Callable[[Event], None]) -> None:
                with open(run_dir / "launch.log", "w", encoding="utf-8") as log:
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
                    while process.poll() is None:
                        if job.stop_event.is_set() and not (run_dir / STOP_FILE).exists():
                            (run_dir / STOP_FILE).touch()  # rank 0 stops every process cleanly
                        time.sleep(0.5)
                status = read_status_raw(run_dir).status
                if status not in ("completed", "stopped", "failed"):
                    tail = (run_dir / "launch.log").read_text(encoding="utf-8", errors="replace")[-1500:]
                    raise RuntimeError(f"the launched run exited with code {process.returncode}: {tail.strip()}")

            recorder = RunRecorder(run_dir)

            def body(job: Job) -> None:
                try:
                    work(job, recorder)
                except BaseException as exc:  # noqa: BLE001 - reported as RunFailed, not swallowed
                    recorder(RunFailed(error=error_message(exc), traceback=traceback.format_exc()))
                finally:
                    job.finished.set()

            return self._begin(f"vitft-launch-{run_dir.name}", body, run_dir=run_dir, config=config,
                               name=run_dir.name)

    def start_task(self, name: str, task: Callable[[Job], Any]) -> Job:
        """Runs ``task(job)`` in a daemon thread under the one-job-at-a-time rule.

        The task trains its runs with :meth:`create_run` and :meth:`run_training` in this thread,
        sets ``job.run_dir`` / ``job.config`` to the run it is training (so the Train tab follows
        it), and checks ``job.stop_event`` between runs; it can :meth:`Job.link_stop_event` the
        stop event it gives a run, so that Stop ends that run too. What it returns lands in
        ``job.result``; an exception becomes ``job.error`` (one line; the traceback is printed to
        stderr) and is never swallowed silently.

        Args:
            name: what the job is, for messages (``"sweep lr-search"``).
            task: the callable; receives the :class:`Job`.

        Returns:
            The started :class:`Job`.

        Raises:
            BusyError: a job is already running.
        """
        with self._lock:
            self._refuse_if_busy()

            def body(job: Job) -> None:
                try:
                    job.result = task(job)
                except BaseException as exc:  # noqa: BLE001 - kept on the job and printed
                    job.error = error_message(exc)
                    print(f"vitft: job {name!r} failed:\n{traceback.format_exc()}", file=sys.stderr)

            return self._begin(f"vitft-task-{name}", body, run_dir=self.store.root, config=None, name=name,
                               kind="task")

    def stop(self) -> bool:
        """Asks the running job to stop (it exits before its next micro-batch; a sweep stops its
        current trial and starts no other).

        Returns:
            True when a running job was signalled, False when nothing was running.
        """
        job = self._job
        if job is None or not job.running:
            return False
        job.request_stop()
        return True


def _write_card(run_dir: Path, log: Callable[[str], None]) -> None:
    """Writes the model card after a run that saved a model; a card problem is logged to
    ``train.log`` and never fails the run."""

    if model_dir(run_dir) is None:
        return
    try:
        t0 = time.perf_counter()
        card = write_model_card(run_dir)
        log(f"model card written: {card} ({time.perf_counter() - t0:.1f} s)")
    except (OSError, ValueError, KeyError) as exc:
        log(f"model card not written: {exc}")
