"""The one training configuration: :class:`TrainConfig`.

The UI form, the ``vitft train`` flags and ``runs/<id>/config.json`` are all built from the fields
below. Each field carries a docstring line (the string right under it) that the CLI reuses as its
``--help`` text, so the two cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Augment = Literal["none", "basic", "crop", "randaugment", "trivialaugment", "autoaugment"]
Optimizer = Literal["adamw", "sgd"]
Scheduler = Literal["cosine", "linear", "constant"]
ClassWeights = Literal["none", "balanced"]
Preset = Literal["quick", "balanced", "best"]
Attention = Literal["auto", "sdpa", "vitft_eager", "eager"]

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

    data_dir: str = field(metadata={"section": "model", "label": "Dataset folder"})
    """Dataset folder (one subfolder per class, or train/ and val/ holding them), or a labels CSV (image path, label)."""

    model: str = field(default=SCRATCH_MODEL, metadata={"section": "model", "label": "Model"})
    """Hub id, local save_pretrained folder, or a model trained from scratch offline: 'pvt-v2-b0-scratch' (recommended) or 'vit-tiny-scratch' (random ViT-Tiny)."""

    image_size: int | None = field(
        default=None,
        metadata={
            "section": "model", "label": "Image size", "ge": 32, "le": 1024, "between": True,
            "widget": "slider", "ui_max": 224, "step": 16, "form_default": 224,
        },
    )
    """Input size in pixels (default: the model's own). Scratch models: 32 to 224; the app fills in the dataset's median shorter side rounded up to a multiple of 16 (32 for 28 px digits, 224 for photos). A pretrained ViT/DeiT is fine-tuned at this size with its position embeddings interpolated (bicubic) once at load; the saved model and processor keep the new size."""

    freeze_depth: int = field(
        default=0,
        metadata={
            "section": "model", "label": "Freeze depth", "ge": 0, "widget": "slider", "ui_max": 12, "step": 1,
        },
    )
    """Encoder blocks (stages for Swin, MobileViT, PVTv2) to freeze: 0 trains everything; N >= 1 also freezes the patch and position embeddings; all blocks = linear probe."""

    epochs: int = field(default=3, metadata={"section": "training", "label": "Epochs", "ge": 1})
    """Passes over the training split."""

    batch_size: int = field(default=32, metadata={"section": "training", "label": "Batch size", "ge": 1})
    """Images per micro-batch (per forward pass); 'auto' (CLI) starts here and halves on out-of-memory."""

    auto_batch_size: bool = field(
        default=False,
        metadata={"section": "optimization", "label": "Auto batch size",
                  "info": "halve the batch on out-of-memory; more accumulation keeps the effective batch"},
    )
    """Find the micro-batch that fits in memory: start at batch_size, halve on out-of-memory, and accumulate more micro-batches so batch_size x grad_accum_steps stays the same (the CLI's --batch-size auto)."""

    lr: float = field(
        default=5e-5,
        metadata={
            "section": "training", "label": "Learning rate", "gt": 0,
            "info": "5e-5 for fine-tuning, 1e-3 to 2e-3 from scratch",
        },
    )
    """Peak learning rate (the head's rate under layer decay), reached after warmup."""

    optimizer: Optimizer = field(default="adamw", metadata={"section": "optimization", "label": "Optimizer"})
    """adamw (betas 0.9/0.999) or sgd (momentum 0.9, Nesterov)."""

    weight_decay: float = field(default=0.01, metadata={"section": "optimization", "label": "Weight decay", "ge": 0})
    """Decoupled (AdamW) or L2 (SGD) weight decay; never applied to biases and LayerNorm weights."""

    layer_decay: float = field(
        default=1.0,
        metadata={
            "section": "optimization", "label": "Layer decay", "gt": 0, "le": 1, "ui_min": 0.01,
        },
    )
    """Layer-wise lr decay: each encoder block's lr is this times the next block's, head at lr (BEiT/timm); 1 = off."""

    scheduler: Scheduler = field(default="cosine", metadata={"section": "optimization", "label": "Schedule"})
    """Learning-rate schedule after warmup: cosine or linear decay to 0, or constant."""

    warmup_ratio: float = field(
        default=0.1,
        metadata={
            "section": "optimization", "label": "Warmup ratio", "ge": 0, "lt": 1, "ui_max": 0.99,
        },
    )
    """Fraction of the optimizer steps spent in linear warmup from 0 to lr."""

    grad_accum_steps: int = field(
        default=1,
        metadata={
            "section": "optimization", "label": "Gradient accumulation steps", "ge": 1,
        },
    )
    """Micro-batches accumulated per optimizer step (effective batch = batch_size x this)."""

    max_grad_norm: float = field(
        default=1.0,
        metadata={
            "section": "optimization", "label": "Max gradient norm", "ge": 0,
        },
    )
    """Clip the global gradient norm to this value before each optimizer step (0 disables clipping)."""

    precision: Precision = field(default="auto", metadata={"section": "system", "label": "Precision"})
    """auto picks bf16 autocast where the device supports it, else fp32; fp16 needs CUDA. Weights stay fp32."""

    attention: Attention = field(default="auto", metadata={"section": "system", "label": "Attention kernel"})
    """Attention kernel: auto alternates sdpa and vitft_eager (matmul + softmax in the compute dtype) over the first 8 training micro-batches and keeps vitft_eager only if at least 10% faster (speed only); or force one (eager: transformers' own matmul + softmax kernel)."""

    augment: Augment = field(
        default="basic",
        metadata={
            "section": "training", "label": "Augmentation", "widget": "dropdown", "info": "",
        },
    )
    """Training augmentation: none; basic (random resized crop + flip); crop (random resized crop, no flip: digits, text); or basic + a torchvision policy."""

    crop_scale_min: float = field(
        default=0.08,
        metadata={
            "section": "augmentation", "label": "Random crop: smallest area", "gt": 0, "le": 1, "ui_min": 0.01,
        },
    )
    """Smallest crop area (fraction of the image) of the random resized crop (torchvision's default 0.08)."""

    color_jitter: float = field(
        default=0.0,
        metadata={
            "section": "augmentation", "label": "Colour jitter", "ge": 0, "le": 1,
        },
    )
    """Colour jitter strength for brightness, contrast and saturation (0 = off)."""

    random_erasing: float = field(
        default=0.0,
        metadata={
            "section": "augmentation", "label": "Random erasing probability", "ge": 0, "le": 1,
        },
    )
    """Probability of random erasing (a random rectangle replaced by noise) per training image; 0 = off."""

    mixup: float = field(default=0.0, metadata={"section": "augmentation", "label": "MixUp alpha", "ge": 0})
    """MixUp alpha (Beta(alpha, alpha) mixing weights); 0 = off. With cutmix on too, one is picked per batch."""

    cutmix: float = field(default=0.0, metadata={"section": "augmentation", "label": "CutMix alpha", "ge": 0})
    """CutMix alpha; 0 = off. With mixup on too, one is picked per batch."""

    patch_mask_ratio: float = field(
        default=0.0,
        metadata={
            "section": "augmentation", "label": "Patch mask ratio", "ge": 0, "lt": 1, "ui_max": 0.99,
        },
    )
    """Fraction of each training image's patches (aligned to the model's patch grid) hidden as a regularizer."""

    patch_dropout: float = field(
        default=0.0,
        metadata={
            "section": "augmentation", "label": "PatchDropout (token drop rate)", "ge": 0, "lt": 1,
            "ui_max": 0.99,
        },
    )
    """PatchDropout: fraction of patch tokens dropped at random from each training image (fewer FLOPs per step, a regularizer); evaluation uses all. 0 = off."""

    label_smoothing: float = field(
        default=0.0,
        metadata={
            "section": "augmentation", "label": "Label smoothing", "ge": 0, "lt": 1, "ui_max": 0.99,
        },
    )
    """Cross-entropy label smoothing epsilon (single-label datasets)."""

    class_weights: ClassWeights = field(default="none", metadata={"section": "augmentation", "label": "Class weights"})
    """balanced weights each class's loss by n_images / (n_classes x n_class_images) (sklearn's rule)."""

    distill_weight: float = field(
        default=0.0,
        metadata={
            "section": "optimization", "label": "Distillation weight", "ge": 0,
        },
    )
    """Weight of a feature-matching loss to a frozen copy of the starting model (keeps small-data fine-tunes close); 0 = off."""

    lora_rank: int = field(default=0, metadata={"section": "optimization", "label": "LoRA rank (0 = off)", "ge": 0})
    """LoRA rank r: train low-rank adapters (peft) on the attention projections plus the full classifier head instead of every weight; model/ is the merged model, lora_adapter/ the adapter. 0 = off (full fine-tuning)."""

    lora_alpha: float = field(default=16.0, metadata={"section": "optimization", "label": "LoRA alpha", "gt": 0})
    """LoRA scaling alpha: the adapter's update is multiplied by alpha / rank (peft's lora_alpha)."""

    lora_targets: str | None = field(default=None, metadata={"section": "optimization", "label": "LoRA target layers"})
    """Comma-separated names of the linear layers that get LoRA adapters (e.g. query,value); default: the model's attention query and value projections (q_proj,v_proj in ViT/DeiT, qkv for fused ones)."""

    ema_decay: float = field(
        default=0.0,
        metadata={
            "section": "optimization", "label": "EMA decay", "ge": 0, "lt": 1, "ui_max": 0.99999,
        },
    )
    """Exponential moving average of the weights per optimizer step (e.g. 0.999); evaluated and saved instead of the raw weights. 0 = off."""

    gradual_unfreeze: int = field(
        default=0,
        metadata={
            "section": "optimization", "label": "Gradual unfreeze (epochs per block)", "ge": 0,
        },
    )
    """Unfreeze one more encoder block every this many epochs, starting from freeze_depth; 0 = off."""

    early_stopping_patience: int = field(
        default=0,
        metadata={
            "section": "optimization", "label": "Early stopping patience", "ge": 0,
        },
    )
    """Stop after this many epochs without a validation improvement of at least early_stopping_min_delta; 0 = off."""

    early_stopping_min_delta: float = field(
        default=0.0,
        metadata={
            "section": "optimization", "label": "Early stopping min improvement", "ge": 0,
        },
    )
    """Smallest increase of the validation metric that counts as an improvement."""

    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "section": "system", "label": "Non-finite steps before stopping", "ge": 1,
        },
    )
    """A non-finite loss or gradient skips its optimizer step; this many in a row stop the run."""

    val_fraction: float = field(
        default=0.2,
        metadata={
            "section": "system", "label": "Validation fraction", "gt": 0, "lt": 1,
            "info": "used when the folder has no val/ split",
        },
    )
    """Validation fraction for the seeded stratified split when the folder has no val/ split."""

    seed: int = field(default=42, metadata={"section": "system", "label": "Seed"})
    """Seed for the split, the head initialization, augmentation and shuffling."""

    output_dir: str = field(default="runs", metadata={"section": "system", "label": "Runs folder"})
    """Folder that receives the run folder runs/<run-id>/."""

    log_every_steps: int = field(default=10, metadata={"section": "system", "label": "Log every N steps", "ge": 1})
    """Optimizer steps between two training-loss rows in metrics.csv (at most: a small dataset logs about
    four times per epoch, and a run's first step is always logged)."""

    num_workers: int = field(default=0, metadata={"section": "system", "label": "Loader workers", "ge": 0})
    """DataLoader worker processes (0 decodes images in the training thread)."""

    run_name: str | None = field(default=None, metadata={"section": "system", "label": "Run name"})
    """Optional human name, used as a prefix of the run id."""

    def __post_init__(self) -> None:
        # Choices (the Literal types) and bounds (each field's metadata) are checked from the
        # field declarations, the same ones the form and the CLI flags are built from.
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        check(bool(str(self.data_dir).strip()), "data_dir must be a folder path, got an empty string")
        check(bool(str(self.model).strip()), "model must be a Hub id, a local folder or 'vit-tiny-scratch'")
        for spec in field_specs().values():
            value = getattr(self, spec.name)
            if value is None:
                continue
            if spec.choices:
                check(value in spec.choices, f"{spec.name} must be one of {list(spec.choices)}, got {value!r}")
            problem = spec.bounds_error(value)
            check(problem is None, problem or "")
        if self.image_size is not None and self.model in SCRATCH_MODEL_NAMES:
            check(self.image_size <= 224, f"image_size for {self.model} must be between 32 and 224, got {self.image_size}")
        check(self.lr < float("inf"), f"lr must be finite, got {self.lr}")
        check(0 < self.lora_alpha < float("inf"), f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.lora_targets is not None and not str(self.lora_targets).strip():
            object.__setattr__(self, "lora_targets", None)  # a blank form field means the default
        if self.lora_targets is not None:
            names = [name.strip() for name in str(self.lora_targets).split(",")]
            check(all(name.replace("_", "").replace(".", "").isalnum() for name in names),
                  f"lora_targets must be comma-separated layer names such as 'query,value', got {self.lora_targets!r}")
        if self.lora_rank > 0:
            check(self.gradual_unfreeze == 0,
                  "gradual_unfreeze does not combine with LoRA (the adapters train in every unfrozen block from"
                  f" the start); set gradual_unfreeze to 0 or lora_rank to 0, got gradual_unfreeze {self.gradual_unfreeze}")

    def random_pixel_sources(self, stage: Literal["image", "batch", "any"] = "any") -> tuple[str, ...]:
        """What draws random numbers on a training image's pixels: the one place that answers
        "does anything random touch the pixels?" (caches, presets and the UI all ask here).

        ``image``: the per-image transform of the loader (``augment``: random resized crop, flip,
        a policy and the colour jitter that rides on it; ``random_erasing``). ``batch``: what acts
        on a whole batch after the loader (``mixup``, ``cutmix``, ``patch_mask_ratio``,
        ``patch_dropout``). ``color_jitter`` alone is no source: it only runs with an ``augment``.

        Args:
            stage: ``"image"``, ``"batch"`` or ``"any"`` (both).

        Returns:
            Short descriptions such as ``("augment basic", "mixup 0.8")``; empty when training
            sees every image exactly as evaluation does.
        """
        image = [f"augment {self.augment}"] if self.augment != "none" else []
        image += [f"random_erasing {self.random_erasing:g}"] if self.random_erasing > 0 else []
        batch = [f"{name} {getattr(self, name):g}" for name in ("mixup", "cutmix", "patch_mask_ratio", "patch_dropout")
                 if getattr(self, name) > 0]
        return tuple({"image": image, "batch": batch, "any": image + batch}[stage])

    @property
    def random_pixels(self) -> bool:
        """True when anything random touches a training image's pixels (see
        :meth:`random_pixel_sources`); False: training inputs are a pure function of the files,
        so decoded images and frozen blocks' features can be computed once."""
        return bool(self.random_pixel_sources())

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


#: Titles of the ``section`` values in the fields' metadata: the form's groups and the CLI's
#: ``--help`` groups, in display order.
SECTIONS = {
    "model": "Data and model",
    "training": "Training",
    "augmentation": "Augmentation and regularization",
    "optimization": "Optimization",
    "system": "Data, speed, precision and logging",
}


@dataclass(frozen=True)
class FieldSpec:
    """What the form and the CLI need to know about one :class:`TrainConfig` field, read from its
    declaration: type, choices (from the ``Literal``), default, docstring and the
    ``field(metadata=...)`` keys.

    Metadata keys: ``section`` (a key of :data:`SECTIONS`), ``label``, bounds ``ge``/``gt``/``le``/``lt``
    (checked by ``__post_init__``; ``between`` words a closed range as "between a and b"),
    ``widget`` (``slider`` or ``dropdown`` instead of the default number box or radio), ``step``,
    ``ui_min``/``ui_max`` (a widget's limits where a bound is open or the form offers less),
    ``form_default`` (the form's value where the field's default is None) and ``info`` (the form's
    hint instead of the docstring; empty: none).
    """

    name: str
    kind: type
    """int, float or str (``X | None`` unwrapped)."""
    choices: tuple[str, ...] | None
    default: Any
    doc: str
    metadata: dict[str, Any]

    @property
    def section(self) -> str:
        return self.metadata.get("section", "system")

    @property
    def label(self) -> str:
        return self.metadata.get("label", self.name.replace("_", " ").capitalize())

    @property
    def info(self) -> str:
        """The form's hint: the metadata ``info`` when given, else the docstring (on one line)."""
        return self.metadata.get("info", " ".join(self.doc.split()))

    @property
    def minimum(self) -> float | None:
        """The smallest value a widget offers (an open lower bound needs ``ui_min``)."""
        return self.metadata.get("ui_min", self.metadata.get("ge"))

    @property
    def maximum(self) -> float | None:
        """The largest value a widget offers (an open upper bound needs ``ui_max``)."""
        return self.metadata.get("ui_max", self.metadata.get("le"))

    @property
    def form_default(self) -> Any:
        return self.metadata.get("form_default", self.default)

    def bounds_text(self) -> str:
        """The allowed range in words: ``>= 1``, ``in [0, 1)``, ``between 32 and 1024``; empty
        when unbounded."""
        meta = self.metadata
        low = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
        high = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
        if low and high:
            if meta.get("between"):
                return f"between {low[1]} and {high[1]}"
            return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
        return ""

    def bounds_error(self, value: Any) -> str | None:
        """The ``ValueError`` message for a value outside the bounds, else None."""
        meta = self.metadata
        inside = (("ge" not in meta or value >= meta["ge"]) and ("gt" not in meta or value > meta["gt"])
                  and ("le" not in meta or value <= meta["le"]) and ("lt" not in meta or value < meta["lt"]))
        return None if inside else f"{self.name} must be {self.bounds_text()}, got {value}"


def _unwrap(annotation: Any) -> tuple[type, tuple[str, ...] | None]:
    """``(python type, Literal choices or None)`` of an annotation such as ``int | None``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return str, get_args(annotation)
    if origin in (Union, types.UnionType):
        return _unwrap(next(a for a in get_args(annotation) if a is not type(None)))
    return annotation, None


@functools.cache
def field_specs() -> dict[str, FieldSpec]:
    """``{field name: FieldSpec}`` of :class:`TrainConfig`, in declaration order."""
    hints = get_type_hints(TrainConfig)
    docs = field_docs()
    specs = {}
    for f in dataclasses.fields(TrainConfig):
        kind, choices = _unwrap(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        specs[f.name] = FieldSpec(f.name, kind, choices, default, docs.get(f.name, ""), dict(f.metadata))
    return specs
