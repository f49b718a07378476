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
Augment = Literal["none", "basic"]

#: Name of the built-in offline model (a ViT-Tiny with random weights).
SCRATCH_MODEL = "vit-tiny-scratch"


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
    """Hub id, local save_pretrained folder, or 'vit-tiny-scratch' (random ViT-Tiny, works offline)."""

    image_size: int | None = None
    """Input size in pixels for vit-tiny-scratch (32 to 224, default 224); pretrained models use their processor's size."""

    freeze_depth: int = 0
    """Encoder blocks to freeze: 0 trains everything; N >= 1 also freezes the patch and position embeddings; all blocks = linear probe."""

    epochs: int = 3
    """Passes over the training split."""

    batch_size: int = 32
    """Images per micro-batch (per forward pass)."""

    lr: float = 5e-5
    """Peak learning rate of AdamW, reached after warmup."""

    weight_decay: float = 0.01
    """AdamW decoupled weight decay; never applied to biases and LayerNorm weights."""

    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent in linear warmup before the cosine decay."""

    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size x this)."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value before each optimizer step (0 disables clipping)."""

    precision: Precision = "auto"
    """auto picks bf16 autocast where the device supports it, else fp32; fp16 needs CUDA."""

    augment: Augment = "basic"
    """Training augmentation: none, or basic (random resized crop + horizontal flip)."""

    val_fraction: float = 0.2
    """Validation fraction for the seeded stratified split when the folder has no val/ split."""

    seed: int = 42
    """Seed for the split, the head initialization, augmentation and shuffling."""

    output_dir: str = "runs"
    """Folder that receives the run folder runs/<run-id>/."""

    log_every_steps: int = 10
    """Optimizer steps between two training-loss rows in metrics.csv."""

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
            if self.model == SCRATCH_MODEL:
                check(
                    self.image_size <= 224,
                    f"image_size for vit-tiny-scratch must be between 32 and 224, got {self.image_size}",
                )
        check(self.freeze_depth >= 0, f"freeze_depth must be >= 0, got {self.freeze_depth}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
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
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        """Reads a ``config.json`` written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


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
