"""The job runner: owns the training thread, its Stop event, and the one-job-at-a-time rule."""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .device import release_device_memory
from .events import Event, RunFailed, RunFinished
from .runs import RunRecorder, RunStore


class BusyError(RuntimeError):
    """A second job was started while one is running."""


@dataclass
class Job:
    """A training job: its run folder, thread and Stop event."""

    run_dir: Path
    config: TrainConfig
    thread: threading.Thread
    stop_event: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    """Set when the run emitted ``RunFinished`` or ``RunFailed`` (the thread may still be writing
    the model card and releasing memory)."""
    done: threading.Event = field(default_factory=threading.Event)
    """Set by the thread as its very last action. Waiting on it, not on ``thread.join``, stays
    correct when Ctrl-C interrupts the wait (an interrupted ``join`` can return early in CPython)."""

    @property
    def running(self) -> bool:
        """True until the training thread has finished."""
        return not self.done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the thread to finish; returns True when it has."""
        return self.done.wait(timeout)


def error_message(exc: BaseException) -> str:
    """One line for people: the exception's message, with its type for unexpected errors."""
    from .modeling import ModelLoadError
    from .training import DatasetError, NonFiniteLossError

    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (ModelLoadError, DatasetError, NonFiniteLossError, ValueError, FileNotFoundError)):
        return text
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return f"Out of memory: {text}. Try a smaller batch size, a smaller image size or a higher freeze depth."
    return f"{type(exc).__name__}: {text}"


class JobRunner:
    """Runs one training job at a time in a background thread.

    One instance belongs to one app process (the UI creates it and every browser session
    shares it, on purpose: the machine has one set of cores or GPUs to train on). Exceptions
    in the thread become a ``RunFailed`` event written to the run folder, never swallowed.

    Args:
        runs_dir: the runs folder.
        device: force a device for every job (tests use ``"cpu"``).
        launch_multi_gpu: when more than one CUDA GPU is present (and no device is forced),
            :meth:`start` runs the job data-parallel on all of them through
            :meth:`start_launched` (the app sets this; the CLI is launched by the user instead).
    """

    def __init__(self, runs_dir: str | Path, device: str | None = None, launch_multi_gpu: bool = False):
        self.store = RunStore(runs_dir)
        self.device = device
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

    def start(
        self,
        config: TrainConfig,
        listener: Callable[[Event], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        on_run_created: Callable[[Path], None] | None = None,
        run_dir: Path | None = None,
    ) -> Job:
        """Creates the run folder and starts training in a daemon thread.

        Args:
            config: the run's settings.
            listener: also receives every event (the CLI's progress bar), after the run folder
                recorded it.
            progress: ``progress(done, total)`` while the preflight decodes the dataset's images.
            on_run_created: called with the new run folder before the thread starts (a
                data-parallel run tells the other processes where it is).
            run_dir: use this existing run folder (with its ``config.json``) instead of creating
                one (the app's multi-GPU launch creates it first).

        Returns:
            The started :class:`Job`.

        Raises:
            BusyError: a job is already running; the message names it.
            ModelLoadError, ValueError, FileNotFoundError: from :func:`~vitft_app.training.preflight`
                (unloadable model, precision the device lacks, missing dataset folder); no run
                folder is created then.
        """
        from .device import cuda_device_count
        from .distributed import env_world_size
        from .training import preflight, train

        gpus = cuda_device_count()
        if self.launch_multi_gpu and self.device is None and gpus > 1 and env_world_size() == 1:
            return self.start_launched(config, gpus, progress=progress)
        with self._lock:
            self._refuse_if_busy()
            report = preflight(config, self.device, progress)
            run_dir = self.store.create_run(config) if run_dir is None else Path(run_dir)
            if on_run_created is not None:
                on_run_created(run_dir)

            def work(job: Job, emit: Callable[[Event], None]) -> None:
                train(config, run_dir, emit, stop_event=job.stop_event, device=self.device, report=report)

            return self._launch(run_dir, config, work, listener)

    def resume(
        self,
        run_dir: str | Path,
        listener: Callable[[Event], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Job:
        """Continues a stopped, failed or interrupted run from its checkpoint, in a daemon thread.

        Args:
            run_dir: the run folder.
            listener, progress: as :meth:`start`.

        Returns:
            The started :class:`Job` (same run folder).

        Raises:
            BusyError: a job is already running.
            ResumeError: the run is still running, or has no checkpoint (a completed run).
            ModelLoadError, ValueError, FileNotFoundError: from the preflight of the run's config.
        """
        from .checkpoint import ResumeError, has_checkpoint
        from .runs import read_status
        from .training import preflight, resume_run

        run_dir = Path(run_dir)
        with self._lock:
            self._refuse_if_busy()
            if not (run_dir / "config.json").is_file():
                raise ResumeError(f"{run_dir} is not a run folder (no config.json).")
            status = read_status(run_dir).get("status")
            if status in ("starting", "running"):
                raise ResumeError(f"{run_dir.name} is still running; stop it before resuming.")
            if not has_checkpoint(run_dir):
                raise ResumeError(
                    f"{run_dir.name} has no checkpoint to resume from"
                    + (" (a completed run deletes it)." if status == "completed" else ".")
                )
            config = TrainConfig.from_json_file(run_dir / "config.json")
            preflight(config, self.device, progress)

            def work(job: Job, emit: Callable[[Event], None]) -> None:
                resume_run(run_dir, emit, stop_event=job.stop_event, device=self.device)

            return self._launch(run_dir, config, work, listener)

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
        import os
        import socket
        import subprocess
        import sys
        import time

        from .cli import STOP_FILE
        from .runs import read_status_raw
        from .training import preflight

        with self._lock:
            self._refuse_if_busy()
            preflight(config, self.device, progress)
            run_dir = self.store.create_run(config)
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
            command = head + ["vitft_app.cli", "train", "--run-dir", str(run_dir)]

            def work(job: Job, emit: Callable[[Event], None]) -> None:
                with open(run_dir / "launch.log", "w", encoding="utf-8") as log:
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
                    while process.poll() is None:
                        if job.stop_event.is_set() and not (run_dir / STOP_FILE).exists():
                            (run_dir / STOP_FILE).touch()  # rank 0 stops every process cleanly
                        time.sleep(0.5)
                status = read_status_raw(run_dir).get("status")
                if status not in ("completed", "stopped", "failed"):
                    tail = (run_dir / "launch.log").read_text(encoding="utf-8", errors="replace")[-1500:]
                    raise RuntimeError(f"the launched run exited with code {process.returncode}: {tail.strip()}")

            return self._launch(run_dir, config, work, None, record=False)

    def _refuse_if_busy(self) -> None:
        job = self._job
        if job is not None and job.running and job.finished.is_set():
            job.wait(30)  # the run has ended; only its cleanup is left, so wait instead of refusing
        if self.is_busy():
            raise BusyError(
                f"A training run is already in progress ({self._job.run_dir.name}). "
                "Wait for it to finish or press Stop first."
            )

    def _launch(
        self,
        run_dir: Path,
        config: TrainConfig,
        work: Callable[[Job, Callable[[Event], None]], None],
        listener: Callable[[Event], None] | None,
        record: bool = True,
    ) -> Job:
        """Starts ``work(job, emit)`` in a daemon thread that records events into ``run_dir``
        (with ``record=False`` only failures are recorded: a launched process writes the rest)."""
        recorder = RunRecorder(run_dir)

        def emit(event: Event) -> None:
            if record or isinstance(event, RunFailed):
                recorder(event)
            if isinstance(event, (RunFinished, RunFailed)):
                job.finished.set()
            if listener is not None:
                listener(event)

        def target() -> None:
            try:
                work(job, emit)
                if record:
                    _write_card(run_dir, recorder.log)  # after RunFinished, so not an event
            except BaseException as exc:  # noqa: BLE001 - reported as RunFailed, not swallowed
                emit(RunFailed(error=error_message(exc), traceback=traceback.format_exc()))
            finally:
                release_device_memory()
                job.done.set()

        thread = threading.Thread(target=target, name=f"vitft-train-{run_dir.name}", daemon=True)
        job = Job(run_dir=run_dir, config=config, thread=thread)
        self._job = job
        thread.start()
        return job

    def stop(self) -> bool:
        """Asks the running job to stop (it exits before its next micro-batch).

        Returns:
            True when a running job was signalled, False when nothing was running.
        """
        job = self._job
        if job is None or not job.running:
            return False
        job.stop_event.set()
        return True


def _write_card(run_dir: Path, log: Callable[[str], None]) -> None:
    """Writes the model card after a run that saved a model; a card problem is logged to
    ``train.log`` and never fails the run."""
    from .report import write_model_card
    from .runs import model_dir

    if model_dir(run_dir) is None:
        return
    try:
        log(f"model card written: {write_model_card(run_dir)}")
    except (OSError, ValueError, KeyError) as exc:
        log(f"model card not written: {exc}")
