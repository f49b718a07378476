"""Checks before a run starts: the dataset can be trained on, the recipe fits the dataset, the
model and device take the settings (:func:`preflight`, used before a run folder exists)."""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..data import DatasetReport, scan_dataset
from ..device import resolve_device_plan
from ..events import Emit, LogMessage
from ..filecheck import Progress
from ..lora import check_lora


class DatasetError(ValueError):
    """The dataset cannot be trained on (fewer than 2 classes, no validation images, ...)."""


def preflight(config: TrainConfig, device: str | None = None, progress: Progress | None = None) -> DatasetReport:
    """Checks everything that can be checked before a run folder is created, so a run that cannot
    work is refused with a message instead of becoming a "failed" run: the dataset (scanned, or
    read from the scan cache), the precision on the device, the model's config (no weights are
    read), the image size of vit-tiny-scratch and the freeze depth.

    Args:
        config: the run's settings.
        device: force a device (tests use ``"cpu"``).
        progress: ``progress(done, total)`` while the dataset's images are decoded.

    Returns:
        The dataset report (give it to :func:`train` so the run does not scan again).

    Raises:
        FileNotFoundError: the dataset folder (or labels CSV) does not exist.
        DatasetError: the dataset cannot be trained on (the message says what to do).
        ValueError: precision not supported on the device, bad image size, freeze depth too large.
        ModelLoadError: the model cannot be loaded (offline and not cached, unknown id, missing folder).
    """
    from ..modeling import load_model_config, summarize_model
    from ..resolution import check_image_size
    from ..scratch import is_scratch_model

    data = Path(config.data_dir).expanduser()
    if not (data.is_dir() or (data.is_file() and data.suffix.lower() == ".csv")):
        kind = "is a file, not a dataset folder or a labels .csv" if data.exists() else "not found"
        raise FileNotFoundError(f"Dataset folder (or labels CSV) {kind}: {config.data_dir}")
    resolve_device_plan(config.precision, device)
    report = prepare_data(config, lambda event: None, progress)
    check_recipe(config, report)
    scratch = is_scratch_model(config.model)
    summary = summarize_model(config.model, report.classes, 0, config.image_size if scratch else None)
    if config.freeze_depth > summary.num_blocks:
        raise ValueError(
            f"freeze_depth must be between 0 and {summary.num_blocks} for this model, got {config.freeze_depth}"
        )
    if config.patch_dropout > 0 and not summary.has_cls_token:
        raise ValueError(
            "patch_dropout needs a model that classifies from a CLS token; this model has none. Set patch_dropout to 0."
        )
    if config.lora_rank > 0:
        check_lora(config, report.classes)
    if config.image_size is not None and not scratch:  # a pretrained model at another size
        check_image_size(load_model_config(config.model), config.image_size)
    return report


def prepare_data(config: TrainConfig, emit: Emit, progress: Progress | None = None) -> DatasetReport:
    """Scans the dataset (the scan cache makes a repeat cheap) and checks it can be trained on.

    Args:
        config: the run's settings (``data_dir``, ``val_fraction``, ``seed``).
        emit: receives a ``LogMessage`` per skipped file and per warning.
        progress: passed to :func:`~vitft_app.data.scan_dataset`.

    Raises:
        FileNotFoundError: the folder does not exist.
        DatasetError: the dataset cannot be trained on; the message says what to do.
    """
    report = scan_dataset(config.data_dir, val_fraction=config.val_fraction, seed=config.seed, progress=progress)
    return check_trainable(report, emit)


def check_trainable(report: DatasetReport, emit: Emit) -> DatasetReport:
    """Logs skipped files and warnings; raises when the report's dataset cannot be trained on.

    Raises:
        DatasetError: errors in the report.
    """
    for path, reason in report.skipped:
        emit(LogMessage(f"skipped {path}: {reason}"))
    for warning in report.warnings:
        emit(LogMessage(f"warning: {warning}"))
    if not report.ok:
        raise DatasetError(" ".join(report.errors))
    return report


def check_recipe(config: TrainConfig, report: DatasetReport) -> None:
    """Refuses option combinations that have no meaning for this dataset.

    Raises:
        ValueError: MixUp/CutMix or label smoothing on a multi-label dataset (their targets
            are defined for one label per image).
    """
    if report.multi_label:
        conflicts = [name for name in ("mixup", "cutmix", "label_smoothing") if getattr(config, name) > 0]
        if conflicts:
            names = ", ".join(conflicts)
            raise ValueError(
                f"{names} {'applies' if len(conflicts) == 1 else 'apply'} to single-label datasets; this CSV is"
                f" multi-label. Set {names} to 0 (the best preset turns them on: use balanced, or add"
                f" {' '.join('--' + n.replace('_', '-') + ' 0' for n in conflicts)})."
            )
