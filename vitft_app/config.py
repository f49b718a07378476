"""The one training configuration: :class:`TrainConfig`.

The UI form, the ``vitft train`` flags and ``runs/<id>/config.json`` are all built from the fields
below. Each field carries a docstring line (the string right under it) that the CLI reuses as its
``--help`` text, so the two cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Augment = Literal["none", "basic", "crop", "randaugment", "trivialaugment", "autoaugment"]
Optimizer = Literal["adamw", "sgd"]
Scheduler = Literal["cosine", "linear", "constant"]
ClassWeights = Literal["none", "balanced"]
Preset = Literal["quick", "balanced", "best"]
Attention = Literal["auto", "sdpa", "eager"]

from .scratch import SCRATCH_MODELS

#: Name of the first built-in offline model (a ViT-Tiny with random weights); the default of
#: ``TrainConfig.model``. All offline choices: :data:`vitft_app.scratch.SCRATCH_MODELS`.
SCRATCH_MODEL = "vit-tiny-scratch"
#: Names of every model built with random weights (offline).
SCRATCH_MODEL_NAMES = tuple(SCRATCH_MODELS)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs, validated on construction.

    Raises:
        ValueError: from ``__post_init__`` when a field is out of range, with the field name and
            the value that was given (``"batch_size must be >= 1, got 0"``).
    """

    data_dir: str
    """Dataset folder (one subfolder per class, or train/ and val/ holding them), or a labels CSV (image path, label)."""

    model: str = SCRATCH_MODEL
    """Hub id, local save_pretrained folder, or a model trained from scratch offline: 'pvt-v2-b0-scratch' (recommended) or 'vit-tiny-scratch' (random ViT-Tiny)."""

    image_size: int | None = None
    """Input size in pixels for a scratch model (32 to 224, default 224); pretrained models use their processor's size."""

    freeze_depth: int = 0
    """Encoder blocks to freeze: 0 trains everything; N >= 1 also freezes the patch and position embeddings; all blocks = linear probe."""

    epochs: int = 3
    """Passes over the training split."""

    batch_size: int = 32
    """Images per micro-batch (per forward pass); 'auto' (CLI) starts here and halves on out-of-memory."""

    auto_batch_size: bool = False
    """Find the micro-batch that fits in memory: start at batch_size, halve on out-of-memory, and accumulate more micro-batches so batch_size x grad_accum_steps stays the same (the CLI's --batch-size auto)."""

    lr: float = 5e-5
    """Peak learning rate (the head's rate under layer decay), reached after warmup."""

    optimizer: Optimizer = "adamw"
    """adamw (betas 0.9/0.999) or sgd (momentum 0.9, Nesterov)."""

    weight_decay: float = 0.01
    """Decoupled (AdamW) or L2 (SGD) weight decay; never applied to biases and LayerNorm weights."""

    layer_decay: float = 1.0
    """Layer-wise lr decay: each encoder block's lr is this times the next block's, head at lr (BEiT/timm); 1 = off."""

    scheduler: Scheduler = "cosine"
    """Learning-rate schedule after warmup: cosine or linear decay to 0, or constant."""

    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent in linear warmup from 0 to lr."""

    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size x this)."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value before each optimizer step (0 disables clipping)."""

    precision: Precision = "auto"
    """auto picks bf16 autocast where the device supports it, else fp32; fp16 needs CUDA. Weights stay fp32."""

    attention: Attention = "auto"
    """Attention kernel: auto alternates sdpa and eager over the first 8 training micro-batches and keeps eager only if at least 10% faster (speed only); or force one."""

    augment: Augment = "basic"
    """Training augmentation: none; basic (random resized crop + flip); crop (random resized crop, no flip: digits, text); or basic + a torchvision policy."""

    crop_scale_min: float = 0.08
    """Smallest crop area (fraction of the image) of the random resized crop (torchvision's default 0.08)."""

    color_jitter: float = 0.0
    """Colour jitter strength for brightness, contrast and saturation (0 = off)."""

    random_erasing: float = 0.0
    """Probability of random erasing (a random rectangle replaced by noise) per training image; 0 = off."""

    mixup: float = 0.0
    """MixUp alpha (Beta(alpha, alpha) mixing weights); 0 = off. With cutmix on too, one is picked per batch."""

    cutmix: float = 0.0
    """CutMix alpha; 0 = off. With mixup on too, one is picked per batch."""

    patch_mask_ratio: float = 0.0
    """Fraction of each training image's patches (aligned to the model's patch grid) hidden as a regularizer."""

    patch_dropout: float = 0.0
    """PatchDropout: fraction of patch tokens dropped at random from each training image (fewer FLOPs per step, a regularizer); evaluation uses all. 0 = off."""

    label_smoothing: float = 0.0
    """Cross-entropy label smoothing epsilon (single-label datasets)."""

    class_weights: ClassWeights = "none"
    """balanced weights each class's loss by n_images / (n_classes x n_class_images) (sklearn's rule)."""

    distill_weight: float = 0.0
    """Weight of a feature-matching loss to a frozen copy of the starting model (keeps small-data fine-tunes close); 0 = off."""

    ema_decay: float = 0.0
    """Exponential moving average of the weights per optimizer step (e.g. 0.999); evaluated and saved instead of the raw weights. 0 = off."""

    gradual_unfreeze: int = 0
    """Unfreeze one more encoder block every this many epochs, starting from freeze_depth; 0 = off."""

    early_stopping_patience: int = 0
    """Stop after this many epochs without a validation improvement of at least early_stopping_min_delta; 0 = off."""

    early_stopping_min_delta: float = 0.0
    """Smallest increase of the validation metric that counts as an improvement."""

    max_nonfinite_steps: int = 3
    """A non-finite loss or gradient skips its optimizer step; this many in a row stop the run."""

    val_fraction: float = 0.2
    """Validation fraction for the seeded stratified split when the folder has no val/ split."""

    seed: int = 42
    """Seed for the split, the head initialization, augmentation and shuffling."""

    output_dir: str = "runs"
    """Folder that receives the run folder runs/<run-id>/."""

    log_every_steps: int = 10
    """Optimizer steps between two training-loss rows in metrics.csv (at most: a small dataset logs about
    four times per epoch, and a run's first step is always logged)."""

    num_workers: int = 0
    """DataLoader worker processes (0 decodes images in the training thread)."""

    run_name: str | None = None
    """Optional human name, used as a prefix of the run id."""

    def __post_init__(self) -> None:
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        check(bool(str(self.data_dir).strip()), "data_dir must be a folder path, got an empty string")
        check(bool(str(self.model).strip()), "model must be a Hub id, a local folder or 'vit-tiny-scratch'")
        if self.image_size is not None:
            check(
                32 <= self.image_size <= 1024,
                f"image_size must be between 32 and 1024, got {self.image_size}",
            )
            if self.model in SCRATCH_MODEL_NAMES:
                check(
                    self.image_size <= 224,
                    f"image_size for {self.model} must be between 32 and 224, got {self.image_size}",
                )
        check(self.freeze_depth >= 0, f"freeze_depth must be >= 0, got {self.freeze_depth}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.lr < float("inf"), f"lr must be finite, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        check(
            self.precision in get_args(Precision),
            f"precision must be one of {list(get_args(Precision))}, got {self.precision!r}",
        )
        check(
            self.augment in get_args(Augment),
            f"augment must be one of {list(get_args(Augment))}, got {self.augment!r}",
        )
        choice_fields = (
            ("attention", Attention), ("optimizer", Optimizer), ("scheduler", Scheduler), ("class_weights", ClassWeights)
        )
        for name, choices in choice_fields:
            value = getattr(self, name)
            check(value in get_args(choices), f"{name} must be one of {list(get_args(choices))}, got {value!r}")
        check(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}")
        check(0 < self.crop_scale_min <= 1, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        check(0 <= self.color_jitter <= 1, f"color_jitter must be in [0, 1], got {self.color_jitter}")
        check(0 <= self.random_erasing <= 1, f"random_erasing must be in [0, 1], got {self.random_erasing}")
        check(self.mixup >= 0, f"mixup must be >= 0, got {self.mixup}")
        check(self.cutmix >= 0, f"cutmix must be >= 0, got {self.cutmix}")
        check(0 <= self.patch_mask_ratio < 1, f"patch_mask_ratio must be in [0, 1), got {self.patch_mask_ratio}")
        check(0 <= self.patch_dropout < 1, f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check(self.distill_weight >= 0, f"distill_weight must be >= 0, got {self.distill_weight}")
        check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check(self.gradual_unfreeze >= 0, f"gradual_unfreeze must be >= 0, got {self.gradual_unfreeze}")
        check(
            self.early_stopping_patience >= 0,
            f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}",
        )
        check(
            self.early_stopping_min_delta >= 0,
            f"early_stopping_min_delta must be >= 0, got {self.early_stopping_min_delta}",
        )
        check(self.max_nonfinite_steps >= 1, f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        check(self.log_every_steps >= 1, f"log_every_steps must be >= 1, got {self.log_every_steps}")
        check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-ready dict (the content of ``config.json``)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Returns ``to_dict()`` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Builds a config from a dict, ignoring unknown keys (config.json of older versions).

        Raises:
            ValueError: a field is missing or invalid.
        """
        if not isinstance(values, dict):
            raise ValueError(f"expected an object of settings, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in fields}
        for name, value in kwargs.items():  # a hand-edited file: the type first, then __post_init__
            default = fields[name].default
            if value is None or default is dataclasses.MISSING or default is None:
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif isinstance(default, str):
                ok = isinstance(value, str)
            else:
                ok = True
            if not ok:
                kind = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}.get(
                    type(default).__name__, type(default).__name__)
                raise ValueError(f"{name} must be {kind}, got {value!r}")
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a missing required field, or a type __post_init__ cannot compare
            raise ValueError(str(exc)) from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        """Reads a ``config.json`` written by :meth:`to_json`.

        Raises:
            ValueError: the file is not valid JSON or holds an invalid setting; the message names
                the file and the setting.
            FileNotFoundError: no such file.
        """
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{path.parent.name}/{path.name} is damaged ({exc}); fix the setting in the file or start a new run."
            ) from None


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Returns ``{field_name: docstring line}`` read from the class source (litgpt style).

    Returns an empty string for a field whose docstring cannot be read (source not shipped).
    """
    docs = {f.name: "" for f in dataclasses.fields(cls)}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value.strip()
    return docs
