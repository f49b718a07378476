"""Prediction with a saved model: the same loader and image processor as training.

Speed (see ``benchmarks/bench_predict.py``): images are decoded with the JPEG draft at the model
size (as the training run's validation does), resized by Pillow and normalized by numpy in one
pass (:class:`~vitft_app.data.EvalTransform`, the one eval transform: the training run's validation
and the decode cache use it too), the model
runs under ``torch.inference_mode`` with SDPA attention, in bf16 autocast when ``precision``
resolves to bf16, on ``num_threads`` intra-op threads of the calling thread only.
"""

from __future__ import annotations

import abc
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import contextlib

from .data import EvalTransform
from .device import resolve_device_plan
from .images import ImageSource, is_image_file, load_image
from .modeling import ModelLoadError, is_model_folder, resolve_model_path


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image, best first.

    Attributes:
        labels: class names.
        scores: softmax probabilities (0..1), same order.
    """

    labels: list[str]
    scores: list[float]
    multi_label: bool = False
    """Scores are independent per-label sigmoids (a multi-label model)."""

    def as_dict(self) -> dict[str, float]:
        """``{label: score}`` (the value ``gr.Label`` takes)."""
        return dict(zip(self.labels, self.scores))


#: Label shown instead of a class when the top probability is under the confidence threshold.
NOT_SURE = "not sure"


#: Default score at or above which a multi-label model predicts a label.
MULTI_LABEL_THRESHOLD = 0.5


def labels_present(prediction: Prediction, threshold: float = 0.0) -> list[str]:
    """A multi-label prediction's labels scoring at least ``threshold`` (0 means the default
    :data:`MULTI_LABEL_THRESHOLD`), best first."""
    limit = threshold if threshold > 0 else MULTI_LABEL_THRESHOLD
    return [label for label, score in zip(prediction.labels, prediction.scores) if score >= limit]


def apply_threshold(prediction: Prediction, threshold: float) -> str:
    """The top-1 label, or :data:`NOT_SURE` when its probability is below ``threshold`` (0..1).

    For a multi-label prediction: every label at or above the threshold (default 0.5), joined
    with ``"; "``, or ``"no label"``."""
    if prediction.multi_label:
        return "; ".join(labels_present(prediction, threshold)) or "no label"
    return prediction.labels[0] if prediction.scores[0] >= threshold else NOT_SURE


def expand_image_paths(paths: Sequence[str | os.PathLike], follow_symlinks: bool = True) -> list[str]:
    """Files as given; folders replaced by their image files, recursively, sorted (hidden entries
    skipped).

    Args:
        paths: files and folders.
        follow_symlinks: False skips symbolic links inside the folders (files and folders), as the
            dataset scan does; the app passes False so a link cannot read outside the data root.
    """
    found: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = []
            for dirpath, dirnames, filenames in os.walk(path, followlinks=follow_symlinks):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    file = Path(dirpath) / name
                    if is_image_file(file) and (follow_symlinks or not file.is_symlink()) and file.is_file():
                        inside.append(str(file))
            found += sorted(inside)
        else:
            found.append(str(path))
    return found


#: The eval transform (an alias kept for callers of the old name): :class:`vitft_app.data.EvalTransform`.
EvalPreprocess = EvalTransform


def load_pixels(images: Sequence[ImageSource], transform: Any, draft_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Loads images through :func:`~vitft_app.images.load_image` and the model's eval transform.

    Args:
        images: paths, bytes, file objects or PIL images.
        transform: PIL RGB image -> float32 tensor ``(3, H, W)`` (:class:`~vitft_app.data.EvalTransform`).
        draft_size: ``(width, height)`` JPEG draft (see :func:`~vitft_app.images.load_image`), or None.

    Returns:
        float32 tensor of shape ``(len(images), 3, H, W)``.

    Raises:
        ImageLoadError: an image cannot be read.
    """
    return torch.stack([transform(load_image(image, draft_size=draft_size)) for image in images])


class ClassifierBackend(abc.ABC):
    """What every prediction backend shares: images -> pixels (the one loader and the eval
    transform) -> logits (:meth:`logits`, per backend) -> probabilities -> top-k.

    Subclasses set ``id2label`` (``{index: class name}``) and ``transform`` and implement
    :meth:`logits`.
    """

    id2label: dict[int, str]
    transform: Any
    multi_label: bool = False
    """True for a model trained on a multi-label dataset (``problem_type ==
    "multi_label_classification"``): scores are independent sigmoids, not a softmax."""

    @abc.abstractmethod
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 ``(B, 3, H, W)`` -> float32 logits ``(B, num_labels)`` on the CPU."""

    @torch.inference_mode()
    def predict_proba(self, images: Sequence[ImageSource], batch_size: int = 32, tta: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Probabilities of every class: softmax, or per-label sigmoid for a multi-label model.

        Args:
            images: paths, bytes, file objects or PIL images (all go through ``load_image``).
            batch_size: images per forward pass.
            tta: test-time augmentation: average the probabilities of the image and its
                horizontal flip.
            progress: called ``(images done, total)`` after each batch.

        Returns:
            float32 tensor ``(len(images), num_labels)`` on the CPU, columns in ``id2label`` order;
            rows sum to 1 unless :attr:`multi_label`.

        Raises:
            ImageLoadError: an image cannot be read.
        """
        rows = []
        draft = getattr(self, "draft_size", None)
        with self._threads():
            for start in range(0, len(images), batch_size):
                pixels = load_pixels(images[start : start + batch_size], self.transform, draft)
                probs = self._activate(self.logits(pixels))
                if tta:
                    probs = (probs + self._activate(self.logits(pixels.flip(-1)))) / 2
                rows.append(probs)
                if progress is not None:
                    progress(min(start + batch_size, len(images)), len(images))
        return torch.cat(rows) if rows else torch.empty(0, len(self.id2label))

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.sigmoid(logits) if self.multi_label else logits.softmax(-1)

    @contextlib.contextmanager
    def _threads(self):
        """Runs with ``self.num_threads`` intra-op threads (when set). ``torch.set_num_threads``
        acts on the calling thread only, so a training thread in the same process keeps its own."""
        wanted = getattr(self, "num_threads", None)
        previous = torch.get_num_threads()
        if wanted is None or wanted == previous:
            yield
            return
        torch.set_num_threads(wanted)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def predict(
        self, images: Sequence[ImageSource], top_k: int = 5, batch_size: int = 32, tta: bool = False
    ) -> list[Prediction]:
        """Predicts each image.

        Args:
            images: paths, bytes, file objects or PIL images (all go through ``load_image``).
            top_k: classes to return per image (clipped to the number of classes; a multi-label
                model returns at least every label scoring 0.5 or more).
            batch_size: images per forward pass.
            tta: average over the image and its horizontal flip (see :meth:`predict_proba`).

        Returns:
            One :class:`Prediction` per image, in order, best class first.

        Raises:
            ImageLoadError: an image cannot be read (the caller decides how to show it).
        """
        probs = self.predict_proba(images, batch_size, tta=tta)
        k = max(1, min(top_k, len(self.id2label)))
        if self.multi_label and len(probs):
            # every present label is shown, even beyond top_k
            k = max(k, int((probs >= MULTI_LABEL_THRESHOLD).sum(dim=1).max()))
        scores, indices = probs.topk(k, dim=-1)
        return [Prediction([self.id2label[i] for i in row_indices], row_scores, self.multi_label)
                for row_scores, row_indices in zip(scores.tolist(), indices.tolist())]


def _run_ended(path: Path) -> bool:
    """True when ``path`` is a run folder whose run has ended (its model should be there by now)."""
    from .run_status import ENDED_STATUSES
    from .runs import is_run_dir, read_status

    return is_run_dir(path) and read_status(path).status in ENDED_STATUSES


def _remedy(path: Path) -> str:
    """What to do about a damaged saved model at ``path`` (a run folder or its ``model/``): resume
    when the run still has a checkpoint (a stopped, failed or interrupted run), else train again (a
    completed run deletes its checkpoint, so there is nothing to resume from)."""
    from .checkpoint import has_checkpoint
    from .runs import is_run_dir

    run = next((p for p in (path, path.parent) if is_run_dir(p)), None)
    if run is not None and has_checkpoint(run):
        return f"resume run {run.name} from its last checkpoint to save a new one."
    if run is not None:
        return (f"run {run.name} has no checkpoint to resume from: train it again (the Train tab's"
                ' "Train again with these settings", or vitft train).')
    return "save the model again."


class Predictor(ClassifierBackend):
    """A trained model ready to predict (PyTorch).

    Args:
        model_path: a run folder (its ``model/`` is used) or a ``save_pretrained`` folder.
        device: force a device; default from the device policy.
        precision: ``"fp32"`` (default: exact, what evaluation and the ONNX parity check use) or
            ``"auto"``/``"bf16"``: bf16 autocast where the device policy allows it (the Predict
            tab; on an AVX512-BF16 CPU about 2-4x faster, top-1 equal to fp32 on the benchmark,
            probabilities within about 1e-2).
        num_threads: intra-op threads while predicting (the calling thread only); None keeps
            torch's setting. 1 is fastest for single images on a busy small CPU (see
            ``benchmarks/README.md``).

    Raises:
        FileNotFoundError: no saved model in ``model_path``.
        ValueError: the precision is not supported on the device.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str | None = None,
        precision: str = "fp32",
        num_threads: int | None = None,
    ):
        path = Path(model_path).expanduser()
        folder = Path(resolve_model_path(str(path)))
        if not path.exists():
            raise FileNotFoundError(
                f"'{model_path}' is not a folder here. Prediction needs a run folder or a local"
                " save_pretrained folder (Hub ids are used for training, not here)."
            )
        if not is_model_folder(folder):
            raise FileNotFoundError(f"No saved model in {path} (a run saves one after its first epoch)"
                                    + (f"; {_remedy(path)}" if _run_ended(path) else ""))
        self.path = folder
        self.plan = resolve_device_plan(precision, device)
        self.num_threads = num_threads

        stage = "preprocessor_config.json"
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder)
            if not any(hasattr(self.processor, a) for a in ("image_mean", "size", "data_config")):  # timm: data_config
                raise ValueError("not an image processor")
            stage = "config.json / model.safetensors"
            self.model = AutoModelForImageClassification.from_pretrained(folder)  # SDPA attention: the default
            self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        except Exception as exc:  # noqa: BLE001 - any damaged file becomes one line naming it
            detail = re.sub(r"(?<![\w.])/[^\s'\"]+", "<file>", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            raise ModelLoadError(
                f"The saved model in {path.name} is damaged ({stage}: {type(exc).__name__}"
                + (f": {detail[:160]}" if detail else "") + f"); {_remedy(path)}"
            ) from None
        self.model = self.model.to(self.plan.device).eval()
        self.multi_label = getattr(self.model.config, "problem_type", None) == "multi_label_classification"
        self.transform = EvalTransform(self.processor)  # the one eval transform (validation, ONNX, decode cache)
        self.draft_size = self.transform.draft_size

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Runs the model on ``pixels`` (float32 ``(B, 3, H, W)``); returns CPU logits ``(B, C)``."""
        with self.plan.autocast():
            return self.model(pixel_values=pixels.to(self.plan.device)).logits.float().cpu()
