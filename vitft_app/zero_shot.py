"""Zero-shot baseline: how well an image-text model (CLIP, SigLIP) does with the class names alone.

Each class name becomes a prompt through a template (``"a photo of a {}."``, underscores read as
spaces); every validation image is given the class whose prompt embedding is most similar to the
image embedding. The validation split is vitft's own (:func:`~vitft_app.data.scan_dataset` with
the same ``val_fraction`` and seed as a training run), so the number sits beside trained runs in
the Runs table, as a run folder of kind ``"zero-shot"`` (``config.json`` with ``kind``, model,
template; ``status.json`` with the accuracy and the majority-class baseline).

Scoring. CLIP (Radford et al., 2021) turns the cosine similarities into a softmax over the prompts
(``logit_scale * cos``); SigLIP (Zhai et al., 2023) scores each image-prompt pair on its own with a
sigmoid of ``logit_scale * cos + logit_bias``, so its probabilities do not sum to one. Both are
monotone in the cosine similarity, so the top-1 class (all that accuracy needs) is the prompt of
highest cosine similarity either way. SigLIP's text tower was trained on prompts padded to its
full length (64 tokens), so its prompts are padded with ``padding="max_length"``, as transformers'
``zero-shot-image-classification`` pipeline does; CLIP's are padded to the longest prompt.

Real weights come from the Hugging Face Hub (e.g. ``openai/clip-vit-base-patch32``,
``google/siglip-base-patch16-224``); a local ``save_pretrained`` folder works offline.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .baseline import Baseline, accuracy_with_baseline, format_accuracy, is_weak, majority_baseline
from .images import ImageLoadError, load_image

logger = logging.getLogger(__name__)

#: The prompt template of CLIP's paper for ImageNet-style class names.
DEFAULT_TEMPLATE = "a photo of a {}."
#: ``kind`` of a zero-shot run folder (in its ``config.json`` and ``status.json``).
ZERO_SHOT_KIND = "zero-shot"
#: Model types (``config.model_type``) whose text prompts are padded to the full length.
SIGLIP_TYPES = ("siglip", "siglip2")
#: Model types known to work; any model with ``get_text_features`` and ``get_image_features`` is tried.
KNOWN_TYPES = ("clip", *SIGLIP_TYPES)
#: Example Hub ids for messages and the UI.
EXAMPLE_MODELS = ("openai/clip-vit-base-patch32", "google/siglip-base-patch16-224")


class ZeroShotError(Exception):
    """A zero-shot evaluation that cannot run, with a message a user can act on."""


@dataclass(frozen=True)
class ZeroShotResult:
    """Zero-shot accuracy on a validation split.

    Attributes:
        model: the model id or folder as given.
        template: the prompt template (``{}`` is the class name).
        data_dir: the dataset folder.
        family: ``config.model_type`` of the model (``"clip"``, ``"siglip"``, ...).
        classes: class names, index order.
        prompts: the prompt of each class.
        num_images: validation images classified.
        correct: how many were right.
        baseline: the split's majority-class rate, or None.
        per_class_accuracy: ``{class name: accuracy}`` over that class's validation images.
        duration_s: seconds the evaluation took (model load included).
        val_fraction: the split's validation share.
        seed: the split's seed.
    """

    model: str
    template: str
    data_dir: str
    family: str
    classes: list[str]
    prompts: list[str]
    num_images: int
    correct: int
    baseline: Baseline | None
    per_class_accuracy: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    val_fraction: float = 0.2
    seed: int = 42

    @property
    def accuracy(self) -> float:
        """``correct / num_images``."""
        return self.correct / self.num_images if self.num_images else 0.0

    @property
    def weak_warning(self) -> str | None:
        """A warning when the accuracy is near the majority-class rate (:func:`~vitft_app.baseline.is_weak`), else None."""
        if not is_weak(self.accuracy, self.baseline):
            return None
        assert self.baseline is not None
        how = "worse than" if self.accuracy < self.baseline.rate - 1e-9 else "about what"
        return (f"Weak baseline: {format_accuracy(self.accuracy)} is {how} always answering"
                f" '{self.baseline.majority_class}' gives ({format_accuracy(self.baseline.rate)}; chance is"
                f" {format_accuracy(self.baseline.chance)}). The class names alone do not tell these images apart for"
                " this model: try another prompt template or model, or train one.")

    def summary(self) -> str:
        """One line: ``zero-shot openai/clip-vit-base-patch32: 91.0% (always 'bees': 54.2%) on 153 validation images``."""
        line = (f"zero-shot {self.model} ('{self.template}'): {accuracy_with_baseline(self.accuracy, self.baseline)}"
                f" on {self.num_images} validation images")
        return line + (f". {self.weak_warning}" if self.weak_warning else "")


def check_template(template: str | None) -> str:
    """The template, trimmed; it must hold ``{}`` exactly once (where the class name goes).

    Raises:
        ZeroShotError: no ``{}``, several, or other braces.
    """
    template = (template or "").strip() or DEFAULT_TEMPLATE
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise ZeroShotError(f"The prompt template needs {{}} exactly once where the class name goes"
                            f" (like '{DEFAULT_TEMPLATE}'), got {template!r}")
    return template


def class_prompts(classes: Sequence[str], template: str) -> list[str]:
    """The prompt of each class: the template with the class name, underscores read as spaces."""
    return [template.replace("{}", name.replace("_", " ")) for name in classes]


def load_zero_shot_model(model: str) -> tuple[Any, Any, str]:
    """Loads an image-text model and its processor (``AutoModel``, ``AutoProcessor``).

    Args:
        model: a Hub id or a local ``save_pretrained`` folder.

    Returns:
        ``(model in eval mode on CPU, processor, model_type)``.

    Raises:
        ZeroShotError: the model cannot be loaded (the message says real CLIP/SigLIP weights come
            from the Hub), or it is not an image-text model.
    """
    from transformers import AutoModel, AutoProcessor

    from .modeling import cache_only_kwargs, hub_reachable

    local = Path(model).expanduser().exists()
    source = str(Path(model).expanduser()) if local else model
    try:
        if local:
            loaded, processor = AutoModel.from_pretrained(source), AutoProcessor.from_pretrained(source)
        else:
            try:  # in the local Hugging Face cache already? No network needed then.
                loaded = AutoModel.from_pretrained(source, **cache_only_kwargs(AutoModel))
                processor = AutoProcessor.from_pretrained(source, **cache_only_kwargs(AutoProcessor))
            except (OSError, ValueError, KeyError):
                if not hub_reachable():  # one TCP connect instead of the Hub client's retries (~45 s)
                    raise OSError("not in the local cache and the Hugging Face Hub is unreachable") from None
                loaded, processor = AutoModel.from_pretrained(source), AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZeroShotError(
            f"Cannot load the zero-shot model {model!r}: {first}. CLIP and SigLIP weights come from the"
            f" Hugging Face Hub (e.g. {EXAMPLE_MODELS[0]} or {EXAMPLE_MODELS[1]}); without a connection,"
            " give a local folder saved with save_pretrained.") from exc
    model_type = str(getattr(loaded.config, "model_type", ""))
    if not (hasattr(loaded, "get_text_features") and hasattr(loaded, "get_image_features")
            and hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise ZeroShotError(f"{model!r} is a {model_type or 'model'} without a text tower: zero-shot needs an"
                            f" image-text model such as CLIP or SigLIP (e.g. {EXAMPLE_MODELS[0]})")
    return loaded.eval(), processor, model_type


def _features(output: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor, or an output whose ``pooler_output``
    holds them in transformers 5), L2-normalized."""
    features = output if torch.is_tensor(output) else output.pooler_output
    return torch.nn.functional.normalize(features.float(), dim=-1)


def text_embeddings(model: Any, processor: Any, model_type: str, prompts: Sequence[str]) -> torch.Tensor:
    """L2-normalized prompt embeddings ``(num_prompts, dim)`` (float32).

    SigLIP prompts are padded to the maximum length (how SigLIP was trained); CLIP's to the longest.
    """
    padding = "max_length" if model_type in SIGLIP_TYPES else True
    inputs = processor.tokenizer(list(prompts), padding=padding, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        return _features(model.get_text_features(**inputs))


def image_embeddings(model: Any, processor: Any, images: Sequence[Any]) -> torch.Tensor:
    """L2-normalized image embeddings ``(len(images), dim)`` (float32) of PIL RGB images."""
    pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        return _features(model.get_image_features(pixel_values=pixels))


def evaluate_zero_shot(
    data_dir: str | os.PathLike,
    model: str,
    template: str = DEFAULT_TEMPLATE,
    val_fraction: float = 0.2,
    seed: int = 42,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> ZeroShotResult:
    """Zero-shot top-1 accuracy of a CLIP or SigLIP model on a dataset's validation split.

    Args:
        data_dir: the dataset folder (or labels CSV), split as vitft splits it for training.
        model: a Hub id or a local folder of an image-text model.
        template: prompt template; ``{}`` is replaced by the class name.
        val_fraction: validation share of the automatic split (TrainConfig's default 0.2).
        seed: seed of the automatic split (TrainConfig's default 42).
        batch_size: images per forward pass.
        progress: called as ``progress(done, total)`` after each batch of images.

    Returns:
        A :class:`ZeroShotResult`.

    Raises:
        ZeroShotError: a bad template, a dataset that cannot be read, is multi-label or has no
            validation images, or a model that cannot be loaded or is not an image-text model.
    """
    from .data import scan_dataset

    t_start = time.perf_counter()
    template = check_template(template)
    try:
        report = scan_dataset(data_dir, val_fraction=val_fraction, seed=seed)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ZeroShotError(f"Cannot read the dataset {data_dir}: {exc}") from exc
    if report.multi_label:
        raise ZeroShotError("Zero-shot accuracy is top-1: multi-label datasets are not supported")
    if len(report.classes) < 2 or not report.val:
        raise ZeroShotError(f"{data_dir} needs at least 2 classes and validation images for a zero-shot baseline")
    loaded, processor, model_type = load_zero_shot_model(model)
    prompts = class_prompts(report.classes, template)
    text = text_embeddings(loaded, processor, model_type, prompts)
    hits = [0] * len(report.classes)
    seen = [0] * len(report.classes)
    done = 0
    for start in range(0, len(report.val), batch_size):
        batch = report.val[start : start + batch_size]
        images, labels = [], []
        for item in batch:
            try:
                images.append(load_image(item.path))
                labels.append(item.label)
            except ImageLoadError:
                logger.warning("zero-shot: skipped unreadable %s", item.path)
        if images:
            predicted = (image_embeddings(loaded, processor, images) @ text.T).argmax(dim=1).tolist()
            for label, guess in zip(labels, predicted):
                seen[label] += 1
                hits[label] += int(label == guess)
        done += len(batch)
        if progress is not None:
            progress(done, len(report.val))
    total = sum(seen)
    if total == 0:
        raise ZeroShotError("No readable validation image for the zero-shot baseline")
    labels_seen = [label for label, n in enumerate(seen) for _ in range(n)]
    return ZeroShotResult(
        model=str(model), template=template, data_dir=str(data_dir), family=model_type, classes=list(report.classes),
        prompts=prompts, num_images=total, correct=sum(hits),
        baseline=majority_baseline(labels_seen, report.classes),
        per_class_accuracy={name: hits[i] / seen[i] for i, name in enumerate(report.classes) if seen[i]},
        duration_s=time.perf_counter() - t_start, val_fraction=val_fraction, seed=seed,
    )


def save_zero_shot_run(result: ZeroShotResult, runs_dir: str | os.PathLike) -> Path:
    """Writes the result as a run folder of kind ``"zero-shot"`` (a row of the Runs table).

    The folder ``RUNS/<YYYYmmdd-HHMMSS>-zero-shot-<model name>/`` holds ``config.json``
    (``kind``, ``data_dir``, ``model``, ``template``, ``val_fraction``, ``seed``), ``status.json``
    (``status: completed``, ``best_val_accuracy``, ``val_baseline`` and the per-class accuracy) and a
    one-line ``train.log``. It has no ``model/``: Predict, Evaluate and Resume say so.

    Returns:
        The run folder.
    """
    from .runs import _slug, atomic_write_text

    root = Path(runs_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.now()
    base = f"{now:%Y%m%d-%H%M%S}-zero-shot-{_slug(Path(result.model).name)}"
    for n in range(1, 1000):
        run_dir = root / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - a thousand in one second
        raise ZeroShotError("could not create a unique run folder")
    config = {"kind": ZERO_SHOT_KIND, "data_dir": result.data_dir, "model": result.model, "template": result.template,
              "val_fraction": result.val_fraction, "seed": result.seed}
    started = datetime.fromtimestamp(now.timestamp() - result.duration_s)
    status = {
        "run_id": run_dir.name, "kind": ZERO_SHOT_KIND, "status": "completed",
        "started_at": started.isoformat(timespec="seconds"), "finished_at": now.isoformat(timespec="seconds"),
        "duration_s": round(result.duration_s, 3), "best_val_accuracy": result.accuracy,
        "val_accuracy": result.accuracy, "val_baseline": result.baseline.to_dict() if result.baseline else None,
        "num_val": result.num_images, "correct": result.correct, "classes": result.classes, "prompts": result.prompts,
        "family": result.family, "per_class_accuracy": result.per_class_accuracy,
    }
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
    atomic_write_text(run_dir / "status.json", json.dumps(status, indent=2))
    atomic_write_text(run_dir / "train.log", f"{now.isoformat(timespec='seconds')} {result.summary()}\n")
    return run_dir


def is_zero_shot_run(run_dir: str | os.PathLike | None) -> bool:
    """True for a run folder written by :func:`save_zero_shot_run`."""
    if not run_dir:
        return False
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("kind") == ZERO_SHOT_KIND


def zero_shot_refusal(run_dir: str | os.PathLike | None, action: str) -> str | None:
    """A one-line message when ``action`` (resume, evaluate, predict, demo) does not apply to a
    zero-shot run, else None."""
    if not is_zero_shot_run(run_dir):
        return None
    return (f"{Path(str(run_dir)).name} is a zero-shot baseline (no trained model): there is nothing to {action}."
            " Run it again from the Data tab or with `vitft zero-shot`; Delete removes it.")
