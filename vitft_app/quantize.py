"""Int8 ONNX export with an accuracy check: ``vitft export RUN --format onnx-int8``.

The fp32 graph of :func:`~vitft_app.export.export_onnx` (exported first when missing) goes through
onnxruntime's dynamic quantization (``onnxruntime.quantization.quantize_dynamic``: MatMul/Gemm
weights stored as signed int8, activations quantized per batch at run time; no calibration data
needed). The int8 graph is then checked against the fp32 one on the run's own validation split (the
split vitft trained with: same folder, ``val_fraction`` and seed): accuracy of both, top-1
agreement, and the median latency of one image on onnxruntime's CPU provider. When the int8 model
is more than :data:`MAX_ACCURACY_DROP` (1 percentage point) less accurate, the export is refused
and no int8 file is left behind, unless the caller forces it.

Int8 files sit beside the fp32 export: ``MODEL/onnx/model_int8.onnx`` with the check's numbers in
``MODEL/onnx/int8_check.json``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .baseline import Baseline, accuracy_with_baseline, format_accuracy, majority_baseline, weak_model_warning
from .export import ONNX_FILE_NAME, ExportError, OnnxPredictor, export_onnx, require_onnx, validation_images
from .images import ImageLoadError
from .predict import load_pixels

#: File name of the int8 graph beside ``model.onnx``.
INT8_FILE_NAME = "model_int8.onnx"
#: The check's numbers beside the int8 graph (JSON of :class:`Int8Check`).
INT8_CHECK_FILE = "int8_check.json"
#: Largest accepted fall in validation accuracy from fp32 to int8 (0.01 = 1 percentage point).
MAX_ACCURACY_DROP = 0.01
#: Single-image runs timed per model for the latency median (after 3 warm-up runs).
LATENCY_RUNS = 30


class Int8Refused(ExportError):
    """The int8 model lost more accuracy than allowed; ``check`` holds the numbers."""

    def __init__(self, message: str, check: "Int8Check"):
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class Int8Check:
    """fp32 against int8 on a run's validation split.

    Attributes:
        num_images: validation images both models classified.
        fp32_accuracy: top-1 accuracy of the fp32 ONNX model, 0..1.
        int8_accuracy: top-1 accuracy of the int8 ONNX model, 0..1.
        agreement: fraction of images where both give the same top-1 class, 0..1.
        fp32_latency_ms: median milliseconds for one image (batch 1, preprocessing excluded).
        int8_latency_ms: the same for the int8 model.
        fp32_bytes: size of ``model.onnx``.
        int8_bytes: size of ``model_int8.onnx``.
        baseline: the split's majority-class rate (:meth:`Baseline.to_dict`), or None.
        forced: True when the export was kept despite a drop above the limit.
    """

    num_images: int
    fp32_accuracy: float
    int8_accuracy: float
    agreement: float
    fp32_latency_ms: float
    int8_latency_ms: float
    fp32_bytes: int
    int8_bytes: int
    baseline: dict[str, Any] | None = None
    forced: bool = False

    @property
    def drop(self) -> float:
        """``fp32_accuracy - int8_accuracy`` (positive: int8 is worse)."""
        return self.fp32_accuracy - self.int8_accuracy

    def summary(self) -> str:
        """Two plain lines: both accuracies with the baseline, agreement, latency and size."""
        baseline = Baseline.from_dict(self.baseline)
        return (f"validation ({self.num_images} images): fp32 {accuracy_with_baseline(self.fp32_accuracy, baseline)},"
                f" int8 {format_accuracy(self.int8_accuracy)} (drop {100 * self.drop:+.1f} points);"
                f" top-1 agreement {format_accuracy(self.agreement)}\n"
                f"one image: fp32 {self.fp32_latency_ms:.1f} ms, int8 {self.int8_latency_ms:.1f} ms (median);"
                f" file {self.fp32_bytes / 1e6:.1f} MB -> {self.int8_bytes / 1e6:.1f} MB"
                + (f"\n{weak}" if (weak := weak_model_warning(self.fp32_accuracy, baseline)) else ""))


@dataclass(frozen=True)
class Int8Export:
    """A checked int8 export: the written graph and its :class:`Int8Check`."""

    path: Path
    check: Int8Check


def _validation_split(run: str | os.PathLike) -> tuple[list[str], list[str], list[str]]:
    """``(image paths, true class names, class names)`` of a run's validation split.

    Raises:
        ExportError: not a run folder, or its dataset is gone or has no validation images.
    """
    from .config import TrainConfig
    from .data import scan_dataset
    from .runs import is_run_dir

    if not is_run_dir(run):
        raise ExportError(f"{run} is not a run folder: the int8 check needs the run's validation split")
    config = TrainConfig.from_json_file(Path(run) / "config.json")
    try:
        report = scan_dataset(config.data_dir, val_fraction=config.val_fraction, seed=config.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(f"Cannot read the run's dataset {config.data_dir} for the int8 check: {exc}") from exc
    if report.multi_label:
        raise ExportError("The int8 check compares top-1 accuracy: multi-label runs are not supported")
    if not report.val:
        raise ExportError(f"The dataset {config.data_dir} has no validation images for the int8 check")
    return [i.path for i in report.val], [report.classes[i.label] for i in report.val], list(report.classes)


def _top1_names(backend: OnnxPredictor, pixels: Any) -> list[str]:
    """Top-1 class names of ``backend`` on float32 pixels ``(B, 3, H, W)``."""
    logits = backend.logits(pixels).numpy()
    return [backend.id2label[int(i)] for i in logits.argmax(axis=1)]


def _median_latency_ms(backend: OnnxPredictor, pixels: Any, runs: int = LATENCY_RUNS) -> float:
    """Median wall milliseconds of one ``(1, 3, H, W)`` forward on onnxruntime (3 warm-up runs)."""
    one = pixels[:1]
    for _ in range(3):
        backend.logits(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backend.logits(one)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def compare_on_split(fp32: OnnxPredictor, int8: OnnxPredictor, paths: Sequence[str], truth: Sequence[str],
                     batch_size: int = 32) -> tuple[int, float, float, float, Any]:
    """Classifies the images with both models.

    Args:
        fp32: the fp32 backend (its eval transform preprocesses for both).
        int8: the int8 backend.
        paths: image paths.
        truth: the true class name of each image.
        batch_size: images per onnxruntime call.

    Returns:
        ``(images classified, fp32 accuracy, int8 accuracy, top-1 agreement, first pixels (1, 3, H, W))``;
        unreadable images are skipped.
    """
    right32 = right8 = agree = count = 0
    first = None
    for start in range(0, len(paths), batch_size):
        chunk, names = [], []
        for path, name in zip(paths[start : start + batch_size], truth[start : start + batch_size]):
            try:
                chunk.append(load_pixels([path], fp32.transform))
                names.append(name)
            except ImageLoadError:
                continue
        if not chunk:
            continue
        import torch

        pixels = torch.cat(chunk).float()
        first = pixels[:1] if first is None else first
        top32, top8 = _top1_names(fp32, pixels), _top1_names(int8, pixels)
        right32 += sum(a == t for a, t in zip(top32, names))
        right8 += sum(b == t for b, t in zip(top8, names))
        agree += sum(a == b for a, b in zip(top32, top8))
        count += len(names)
    if count == 0:
        raise ExportError("No readable validation image for the int8 check")
    return count, right32 / count, right8 / count, agree / count, first


def quantize_graph(fp32_path: Path, int8_path: Path) -> None:
    """onnxruntime dynamic quantization: int8 weights (signed, per tensor), activations at run time.

    Raises:
        ExportError: onnxruntime's quantization tools are missing or fail on this graph.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ExportError("int8 export needs onnxruntime's quantization tools (pip install onnxruntime onnx)") from exc
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime logs "consider pre-processing" on the root logger every time
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    except Exception as exc:  # onnxruntime raises many types; the user needs the message
        raise ExportError(f"int8 quantization failed ({type(exc).__name__}): {exc}") from exc
    finally:
        root.setLevel(level)


def export_onnx_int8(run: str | os.PathLike, force: bool = False,
                     max_drop: float = MAX_ACCURACY_DROP) -> Int8Export:
    """Writes ``model_int8.onnx`` beside the run's fp32 ONNX export after checking it on the validation split.

    Args:
        run: a run folder (its dataset must still be readable: the check uses its validation split).
        force: keep the int8 model even when it loses more than ``max_drop`` accuracy.
        max_drop: largest accepted ``fp32 accuracy - int8 accuracy`` (0..1; default 1 point).

    Returns:
        An :class:`Int8Export` (path of the int8 graph and the check's numbers, also saved as
        ``int8_check.json`` beside it).

    Raises:
        Int8Refused: the drop is above ``max_drop`` and ``force`` is False; the message has the
            numbers and no int8 file is left behind.
        ExportError: onnx/onnxruntime missing, no saved model, the run's dataset unreadable, or the
            fp32 export or the quantization failing.
    """
    require_onnx()
    paths, truth, classes = _validation_split(run)
    try:
        fp32 = OnnxPredictor(run)
    except FileNotFoundError:  # no fp32 export yet: make it (checked against PyTorch) first
        export_onnx(run, images=validation_images(run) or None)
        fp32 = OnnxPredictor(run)
    onnx_dir = fp32.path
    fd, tmp_name = tempfile.mkstemp(prefix=f".{INT8_FILE_NAME}.", suffix=".tmp", dir=onnx_dir)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        quantize_graph(onnx_dir / ONNX_FILE_NAME, tmp_path)
        int8 = OnnxPredictor(onnx_dir, file_name=tmp_path.name)
        count, acc32, acc8, agreement, first = compare_on_split(fp32, int8, paths, truth)
        baseline = majority_baseline([classes.index(t) for t in truth], classes)
        check = Int8Check(
            num_images=count, fp32_accuracy=acc32, int8_accuracy=acc8, agreement=agreement,
            fp32_latency_ms=_median_latency_ms(fp32, first), int8_latency_ms=_median_latency_ms(int8, first),
            fp32_bytes=(onnx_dir / ONNX_FILE_NAME).stat().st_size, int8_bytes=tmp_path.stat().st_size,
            baseline=baseline.to_dict() if baseline else None, forced=force and acc32 - acc8 > max_drop + 1e-9,
        )
        over = acc32 - acc8 > max_drop + 1e-9  # "more than": exactly the limit (2 of 200 images) passes
        if over and not force:
            raise Int8Refused(
                f"int8 model refused: it loses {100 * (acc32 - acc8):.1f} accuracy points (limit"
                f" {100 * max_drop:g}); no int8 file was written. {check.summary()}\n"
                "Keep it anyway with --force (in the app: tick 'Keep even if less accurate').", check)
        final = onnx_dir / INT8_FILE_NAME
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, final)
        from .runs import atomic_write_text

        atomic_write_text(onnx_dir / INT8_CHECK_FILE, json.dumps(asdict(check), indent=2))
    finally:
        tmp_path.unlink(missing_ok=True)
    return Int8Export(path=final, check=check)


def read_int8_check(model_or_run: str | os.PathLike) -> Int8Check | None:
    """The saved :class:`Int8Check` of a run's int8 export, or None when there is none."""
    from .export import _find_onnx_dir

    try:
        folder = _find_onnx_dir(Path(model_or_run))
        if not (folder / INT8_FILE_NAME).is_file():
            return None
        return Int8Check(**json.loads((folder / INT8_CHECK_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def has_int8(model_or_run: str | os.PathLike) -> bool:
    """True when the run or model folder has ``onnx/model_int8.onnx``."""
    from .export import _find_onnx_dir

    try:
        return (_find_onnx_dir(Path(model_or_run)) / INT8_FILE_NAME).is_file()
    except (FileNotFoundError, OSError, ValueError):
        return False
