"""Exporting a trained classifier: ONNX (checked against PyTorch) and a zip for ``transformers.pipeline``.

ONNX export goes through ``torch.onnx.export``. Two exporters exist:

- ``"torchscript"`` (default): the legacy TorchScript tracer (``dynamo=False``). It needs only the
  ``onnx`` package, is fast (a fraction of a second for the tiny test ViT) and matches PyTorch to
  float rounding. PyTorch marks it deprecated, so it warns; the warnings are silenced here.
- ``"dynamo"``: the ``torch.export``-based exporter, PyTorch's default since 2.9. It also needs
  ``onnxscript`` and is slower to run, but is the one PyTorch keeps developing.

Either way the graph takes ``pixel_values`` (float32, ``(batch, 3, H, W)``, dynamic batch) and
returns ``logits`` (float32, ``(batch, num_labels)``), and the export is accepted only after
onnxruntime and PyTorch agree on real images (:data:`PARITY_TOLERANCE`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoConfig, AutoImageProcessor

from .images import ImageLoadError, ImageSource
from .predict import ClassifierBackend, Predictor, load_pixels
from .config import TrainConfig
from .data import EvalTransform, scan_dataset
from .modeling import is_model_folder, resolve_model_path
from .runs import is_run_dir

#: Largest accepted absolute difference between PyTorch and onnxruntime softmax probabilities.
PARITY_TOLERANCE = 1e-4
#: What to install when the ONNX packages are missing.
ONNX_INSTALL_HINT = "pip install onnx onnxruntime (vitft depends on both; the dynamo exporter also needs pip install 'vitft[onnx]')"
#: File name of the exported graph inside the ONNX folder.
ONNX_FILE_NAME = "model.onnx"
#: Sub-folder of a model folder that :func:`export_onnx` writes by default.
ONNX_DIR_NAME = "onnx"
#: Number of synthetic images used for the parity check when the caller gives none.
SYNTHETIC_IMAGE_COUNT = 4

Exporter = Literal["torchscript", "dynamo"]


class ExportError(Exception):
    """An export that cannot be done or did not verify, with a message a user can act on."""


@dataclass(frozen=True)
class OnnxExport:
    """A verified ONNX export.

    Attributes:
        path: the written ``model.onnx``; ``config.json`` and ``preprocessor_config.json`` lie beside it.
        max_abs_prob_diff: largest absolute difference of softmax probabilities between PyTorch
            (fp32, eval) and onnxruntime (CPU) over the check images.
        num_images: images the parity check ran on.
        opset: ONNX opset of the written graph. The dynamo exporter builds opset 18 and converts
            down to a lower request; where that conversion fails, this is 18, not the request.
    """

    path: Path
    max_abs_prob_diff: float
    num_images: int
    opset: int


def require_onnx() -> tuple[Any, Any]:
    """Imports ``onnx`` and ``onnxruntime``.

    Returns:
        The ``(onnx, onnxruntime)`` modules.

    Raises:
        ExportError: either package is not installed (the message says how to install both).
    """
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the onnx and onnxruntime packages ({exc.name or exc} is missing): "
            f"{ONNX_INSTALL_HINT}"
        ) from exc
    return onnx, onnxruntime


def synthetic_images(count: int = SYNTHETIC_IMAGE_COUNT, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    """Deterministic RGB test images for the parity check: gradients, shapes and seeded noise.

    Args:
        count: number of images.
        size: ``(width, height)`` in pixels; the model's transform resizes them anyway.

    Returns:
        ``count`` PIL images in mode ``"RGB"``; the same call always gives the same pixels.
    """
    width, height = size
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        kind = index % 4
        if kind == 0:  # horizontal colour gradient
            ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, axis=0)
            array = np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 128.0)], axis=-1)
            image = Image.fromarray(array.round().astype(np.uint8), mode="RGB")
        elif kind == 1:  # checkerboard
            yy, xx = np.mgrid[0:height, 0:width]
            board = (((yy // 8) + (xx // 8)) % 2 * 255).astype(np.uint8)
            image = Image.fromarray(board, mode="L").convert("RGB")
        elif kind == 2:  # shapes on a flat background
            image = Image.new("RGB", size, (30, 60, 200))
            draw = ImageDraw.Draw(image)
            draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(250, 200, 10))
            draw.rectangle((width // 2, height // 2, width - 4, height - 4), fill=(10, 180, 60))
        else:  # seeded noise
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")
        images.append(image)
    return images


def softmax_numpy(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis.

    Args:
        logits: float array ``(batch, num_labels)``.

    Returns:
        float64 probabilities of the same shape, each row summing to 1.
    """
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class _LogitsOnly(torch.nn.Module):
    """Wraps a ``*ForImageClassification`` so the traced graph has one input and one output."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _export_graph(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: Exporter) -> None:
    """Writes the ONNX graph of ``model`` to ``path`` (a single file, weights inside).

    Args:
        model: the classifier in eval mode on CPU.
        example: float32 ``(batch >= 2, 3, H, W)``; a batch of 2 keeps the batch axis symbolic.
        path: destination file.
        opset: ONNX opset version.
        exporter: ``"torchscript"`` (legacy tracer) or ``"dynamo"`` (``torch.export`` based).
    """
    wrapper = _LogitsOnly(model).eval()
    common: dict[str, Any] = dict(input_names=["pixel_values"], output_names=["logits"], opset_version=opset)
    supports_dynamo_flag = "dynamo" in inspect.signature(torch.onnx.export).parameters
    if exporter == "dynamo":
        if not supports_dynamo_flag:
            raise ExportError(f"torch {torch.__version__} has no dynamo ONNX exporter; use exporter='torchscript'")
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter imports it lazily; fail clearly here)
        except ImportError as exc:
            raise ExportError(f"The dynamo ONNX exporter needs onnxscript: {ONNX_INSTALL_HINT}") from exc
        batch = torch.export.Dim("batch")
        kwargs = dict(common, dynamo=True, dynamic_shapes={"pixel_values": {0: batch}}, external_data=False,
                      verbose=False)
    else:
        kwargs = dict(common, dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=True)
        if supports_dynamo_flag:
            kwargs["dynamo"] = False
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript"), torch.no_grad():
        # The legacy exporter warns that it is deprecated and that the image-size check of the
        # ViT embeddings is traced as a constant (true: the input size is fixed, only batch varies);
        # the dynamo one logs that it builds opset 18 and converts down. None of it is actionable.
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), **kwargs)


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Raises the given loggers to ERROR for the duration of the block, then restores them."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def graph_opset(model_proto: Any) -> int:
    """The default-domain (``ai.onnx``) opset version of a loaded ``onnx.ModelProto``."""
    return next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))


def _torch_probabilities(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities ``(N, num_labels)`` (float64) from the PyTorch model in fp32."""
    rows = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            logits = model(pixel_values=pixels[start : start + batch_size]).logits.float()
            rows.append(softmax_numpy(logits.numpy()))
    return np.concatenate(rows)


def _onnx_probabilities(session: Any, pixels: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities ``(N, num_labels)`` (float64) from an onnxruntime session."""
    input_name = session.get_inputs()[0].name
    rows = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].numpy().astype(np.float32, copy=False)
        rows.append(softmax_numpy(session.run(None, {input_name: batch})[0]))
    return np.concatenate(rows)


def _open_predictor(model_path: str | os.PathLike) -> Predictor:
    """A CPU :class:`~vitft_app.predict.Predictor`, with loading failures as :class:`ExportError`."""
    try:
        return Predictor(model_path, device="cpu")
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise ExportError(f"Cannot load the model in '{model_path}': {exc}") from exc


def _save_side_files(predictor: Predictor, onnx_dir: Path) -> None:
    """Writes ``config.json`` and the processor config into ``onnx_dir``, each file atomically."""
    staging = Path(tempfile.mkdtemp(prefix=".side-files.", dir=onnx_dir))
    try:
        predictor.model.config.save_pretrained(staging)
        predictor.processor.save_pretrained(staging)
        for item in sorted(staging.iterdir()):
            os.chmod(item, 0o644)
            os.replace(item, onnx_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_onnx(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    images: Sequence[ImageSource] | None = None,
    opset: int = 17,
    exporter: Exporter = "torchscript",
    tolerance: float = PARITY_TOLERANCE,
) -> OnnxExport:
    """Exports a saved classifier to ONNX and checks it against PyTorch.

    Writes ``model.onnx`` (input ``pixel_values`` float32 ``(batch, 3, H, W)`` with a dynamic
    batch axis, output ``logits`` float32 ``(batch, num_labels)``), then ``config.json`` (labels)
    and ``preprocessor_config.json`` beside it, so the folder is self-describing and
    :class:`OnnxPredictor` can load it. The graph is written to a temp file, checked, and renamed
    into place only after the parity check passes: a failed export leaves no ``model.onnx``.

    Parity: the same pixels (images loaded with ``load_image`` and the model's eval transform)
    go through PyTorch (fp32, eval, CPU) and onnxruntime (``CPUExecutionProvider``); the largest
    absolute difference of their softmax probabilities must be at most ``tolerance``.

    Args:
        model_path: a run folder (its ``model/`` is used) or a ``save_pretrained`` folder.
        output_dir: folder to write into (created); default ``<model folder>/onnx``.
        images: images for the parity check (paths, bytes, file objects or PIL images); default
            :func:`synthetic_images`. Real images from the dataset make the stronger check.
        opset: requested ONNX opset version (17 has LayerNormalization as one op); the
            result's ``opset`` is what was actually written.
        exporter: ``"torchscript"`` (legacy tracer, default) or ``"dynamo"`` (needs onnxscript);
            see the module docstring.
        tolerance: largest accepted absolute probability difference (default 1e-4).

    Returns:
        An :class:`OnnxExport` with the path, measured difference, image count and opset.

    Raises:
        ExportError: onnx/onnxruntime missing (says ``pip install vitft[onnx]``), no saved model
            in ``model_path``, an unreadable check image, the export itself failing, or
            onnxruntime disagreeing with PyTorch beyond ``tolerance``.
    """
    onnx, onnxruntime = require_onnx()
    if exporter not in ("torchscript", "dynamo"):
        raise ExportError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    predictor = _open_predictor(model_path)
    model = predictor.model.float().eval()
    try:
        check_images = list(images) if images else synthetic_images()
        pixels = load_pixels(check_images, predictor.transform)
    except ImageLoadError as exc:
        raise ExportError(f"Cannot use this image for the ONNX check: {exc}") from exc

    onnx_dir = Path(output_dir).expanduser() if output_dir is not None else predictor.path / ONNX_DIR_NAME
    onnx_dir.mkdir(parents=True, exist_ok=True)
    final_path = onnx_dir / ONNX_FILE_NAME
    fd, tmp_name = tempfile.mkstemp(prefix=f".{ONNX_FILE_NAME}.", suffix=".tmp", dir=onnx_dir)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        example = pixels.repeat(2, 1, 1, 1)[:2]  # batch 2: a batch of 1 could be specialized away
        try:
            _export_graph(model, example, tmp_path, opset, exporter)
            onnx.checker.check_model(str(tmp_path))
            written_opset = graph_opset(onnx.load(str(tmp_path), load_external_data=False))
            session = onnxruntime.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])
        except ExportError:
            raise
        except Exception as exc:  # the exporters raise many types; the user needs the message
            raise ExportError(f"ONNX export failed ({type(exc).__name__}): {exc}") from exc
        expected = _torch_probabilities(model, pixels)
        actual = _onnx_probabilities(session, pixels)
        diff = float(np.abs(expected - actual).max()) if np.isfinite(actual).all() else float("inf")
        if not diff <= tolerance:
            raise ExportError(
                f"ONNX output differs from PyTorch: largest probability difference {diff:.3g} over "
                f"{len(pixels)} images is above the tolerance {tolerance:g}; the export was not saved"
            )
        _save_side_files(predictor, onnx_dir)
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, final_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return OnnxExport(path=final_path, max_abs_prob_diff=diff, num_images=len(pixels), opset=written_opset)


def has_onnx(model_or_run: str | os.PathLike) -> bool:
    """True when the run or model folder has an ONNX export (``model.onnx`` in it or its ``onnx/``)."""
    try:
        _find_onnx_dir(Path(model_or_run))
    except (FileNotFoundError, OSError, ValueError):
        return False
    return True


def _find_onnx_dir(folder: Path) -> Path:
    """``folder`` when it holds ``model.onnx``, else the ``onnx/`` sub-folder of it or of the model
    folder it stands for (a run folder stands for its ``model/``).

    Raises:
        FileNotFoundError: none holds ``model.onnx``.
    """
    model_folder = Path(resolve_model_path(str(folder)))
    for candidate in (folder, folder / ONNX_DIR_NAME, model_folder / ONNX_DIR_NAME):
        if (candidate / ONNX_FILE_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"No {ONNX_FILE_NAME} in {folder} or its onnx/ folder: create one with `vitft export {folder}`"
    )


def _read_id2label(config_path: Path) -> dict[int, str]:
    """``{index: class name}`` from a model ``config.json``, read with ``AutoConfig`` so that a
    config saved without ``id2label`` (transformers' default ``LABEL_0..``) works too.

    Raises:
        ExportError: the file is missing or not a model config.
    """
    try:
        config = AutoConfig.from_pretrained(config_path.parent, local_files_only=True)
        return {int(k): str(v) for k, v in config.id2label.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExportError(f"Cannot read the class names from {config_path}: {exc!r}") from exc


class OnnxPredictor(ClassifierBackend):
    """An exported ONNX classifier ready to predict, with the interface of
    :class:`~vitft_app.predict.Predictor`.

    Images go through the same loader (``load_image``, JPEG draft at the model size) and eval
    transform (:class:`~vitft_app.data.EvalTransform`) as PyTorch prediction; inference runs on
    onnxruntime's ``CPUExecutionProvider``.

    Args:
        onnx_dir: the folder written by :func:`export_onnx` (``model.onnx``, ``config.json``,
            ``preprocessor_config.json``), or a model folder holding it as ``onnx/``.
        file_name: the graph in that folder: ``model.onnx`` (fp32) or ``model_int8.onnx``
            (:func:`vitft_app.quantize.export_onnx_int8`).

    Attributes:
        path: the ONNX folder.
        processor: the image processor read from the folder.
        transform: PIL RGB image -> float32 tensor ``(3, H, W)``.
        id2label: ``{index: class name}`` from ``config.json``.
        session: the ``onnxruntime.InferenceSession``.
        input_name: name of the graph's input (``pixel_values``).
        file_name: the graph's file name in :attr:`path`.

    Raises:
        FileNotFoundError: no ``model.onnx`` (or ``file_name``) in the folder.
        ExportError: onnxruntime missing, or the folder's config, processor or graph unreadable.
    """

    def __init__(self, onnx_dir: str | os.PathLike, file_name: str = ONNX_FILE_NAME):
        _, onnxruntime = require_onnx()
        self.path = _find_onnx_dir(Path(onnx_dir).expanduser())
        self.file_name = file_name
        if not (self.path / file_name).is_file():
            raise FileNotFoundError(f"No {file_name} in {self.path}: create it with `vitft export {onnx_dir} --format onnx-int8`")
        self.id2label = _read_id2label(self.path / "config.json")
        try:
            import json

            problem = json.loads((self.path / "config.json").read_text(encoding="utf-8")).get("problem_type")
        except (OSError, ValueError):
            problem = None
        self.multi_label = problem == "multi_label_classification"
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.path)
            self.transform = EvalTransform(self.processor)  # the one eval transform, as PyTorch prediction
            self.draft_size = self.transform.draft_size
        except (OSError, ValueError) as exc:
            raise ExportError(f"Cannot read the image processor in {self.path}: {exc}") from exc
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path / file_name), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"Cannot load {self.path / file_name}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Runs the graph with onnxruntime on float32 ``(B, 3, H, W)``; returns logits ``(B, C)``."""
        return torch.from_numpy(self.session.run(None, {self.input_name: pixels.numpy()})[0]).float()


#: Suffixes stored without compression in the zip (weights barely compress and are large).
_STORED_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx")


def model_zip_files(folder: Path) -> list[Path]:
    """The files of a ``save_pretrained`` folder that belong in its zip.

    Every regular, non-hidden file directly in ``folder``: ``config.json``, the weights (shards
    and index included), ``preprocessor_config.json``, ``README.md`` and the like. Sub-folders
    (``onnx/``, checkpoints) and hidden or temp files are left out.

    Args:
        folder: the model folder.

    Returns:
        Paths sorted by name.
    """
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def export_model_zip(model_path: str | os.PathLike, dest_zip: str | os.PathLike) -> Path:
    """Zips a saved model so that, once unzipped, ``transformers.pipeline`` loads it.

    The files sit at the root of the archive (see :func:`model_zip_files`), so
    ``pipeline("image-classification", model=UNZIPPED_DIR)`` works on the folder it is extracted
    into and returns the model's own class names. The zip is written to a temp file beside
    ``dest_zip`` and renamed into place.

    Args:
        model_path: a run folder (its ``model/`` is used) or a ``save_pretrained`` folder.
        dest_zip: the zip file to write (parent folders are created; an existing file is replaced).

    Returns:
        The path of the written zip.

    Raises:
        ExportError: no saved model, or no ``preprocessor_config.json`` (the pipeline needs it).
    """
    folder = Path(resolve_model_path(str(Path(model_path).expanduser())))
    if not is_model_folder(folder):
        raise ExportError(f"No saved model in {model_path} (a run saves one after its first epoch)")
    if not (folder / "preprocessor_config.json").is_file():
        raise ExportError(
            f"{folder} has no preprocessor_config.json; transformers.pipeline needs the image processor"
        )
    dest = Path(dest_zip).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    files = model_zip_files(folder)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as handle, zipfile.ZipFile(handle, "w") as archive:
            for path in files:
                stored = path.suffix in _STORED_SUFFIXES
                archive.write(path, arcname=path.name,
                              compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest


def validation_images(run: str, limit: int = 32) -> list[str]:
    """Up to ``limit`` of a run's validation images, spread over the split (real images for the ONNX
    parity check); ``[]`` for a folder without a run config or when the dataset is gone."""

    if not is_run_dir(run):
        return []
    config = TrainConfig.from_json_file(Path(run) / "config.json")
    try:
        report = scan_dataset(config.data_dir, val_fraction=config.val_fraction, seed=config.seed)
    except (FileNotFoundError, ValueError):
        return []
    return [item.path for item in report.val[:: max(1, len(report.val) // limit)][:limit]]
