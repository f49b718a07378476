"""Presets: named sets of :class:`~vitft_app.config.TrainConfig` values that fill the form (UI)
or the flags (``vitft train --preset``). The user can change any value afterwards.

- ``quick``: a linear probe (every block frozen, only the head trains), 3 epochs, no
  augmentation. Minutes, a first answer to "can a ViT tell these classes apart?".
- ``balanced``: half the blocks frozen, basic augmentation, 10 epochs. The default advice.
- ``best``: most blocks trainable (a quarter frozen), RandAugment, MixUp 0.8 / CutMix 1.0,
  random erasing 0.25, label smoothing 0.1, layer decay 0.75, weight EMA 0.999, 20 epochs:
  the DeiT/BEiT fine-tuning recipe (Touvron et al. 2021, table 9; Bao et al. 2021).

- ``auto``: not a fixed set: a from-scratch recipe (model, image size, epochs, lr, augmentation)
  chosen from the scanned dataset by :func:`vitft_app.auto_recipe.suggest_scratch_recipe`
  (:func:`auto_preset_values`).

A model trained from scratch (``vit-tiny-scratch``, ``pvt-v2-b0-scratch``) has no pretrained features to keep, so for
it ``balanced`` and ``best`` freeze nothing and use no layer decay, and the learning rates are
higher (1e-3, the rate DeiT scales to for small batches). ``quick`` stays a linear probe there
too (on random features: only useful as a smoke test). ``best``'s regularization is made for
fine-tuning pretrained weights: on a random-weight ViT it needs hundreds of epochs (DeiT trains
300), and in its 20 it scores below ``balanced`` (measured on cifar10-subset: README).
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

from .config import Preset, TrainConfig

PRESETS: tuple[str, ...] = get_args(Preset)
#: Fields no preset touches: the data, the model and its input size, the hardware (batch size,
#: accumulation, precision, attention kernel, workers) and bookkeeping. Every other field is the
#: recipe: a preset sets it, or resets it to the ``TrainConfig`` default, so nothing of an
#: earlier choice lingers (a PatchDropout rate left over from another run would make Quick's
#: pixels random and cost it the frozen-feature cache).
PRESET_KEEPS = ("data_dir", "model", "image_size", "batch_size", "grad_accum_steps", "precision", "attention",
                "num_workers", "max_nonfinite_steps", "val_fraction", "seed", "output_dir", "log_every_steps",
                "run_name")


def recipe_defaults() -> dict[str, Any]:
    """``{field: TrainConfig default}`` for every recipe field (every field not in :data:`PRESET_KEEPS`)."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in PRESET_KEEPS}
#: The preset chosen from the data (``vitft train --preset auto``, the Train tab's Auto button):
#: a scratch recipe from :func:`vitft_app.auto_recipe.suggest_scratch_recipe`.
AUTO_PRESET = "auto"


def auto_preset_values(data_dir: str, val_fraction: float = 0.2, seed: int = 42) -> tuple[dict[str, Any], str]:
    """Scans ``data_dir`` and returns the suggested scratch recipe.

    Args:
        data_dir: dataset folder or labels CSV.
        val_fraction: validation share when the folder has no val/ split (as ``TrainConfig``).
        seed: split seed (as ``TrainConfig``).

    Returns:
        ``({TrainConfig field: value}, one-line description with the reasons)``.

    Raises:
        FileNotFoundError: the folder does not exist.
        DatasetError: the folder cannot be scanned as a dataset.
    """
    from .auto_recipe import suggest_scratch_recipe
    from .data import scan_dataset

    recipe = suggest_scratch_recipe(scan_dataset(data_dir, val_fraction=val_fraction, seed=seed))
    return {**recipe_defaults(), **recipe.values}, recipe.describe()


def preset_values(name: str, num_blocks: int, pretrained: bool = True) -> dict[str, Any]:
    """The config values a preset sets.

    Args:
        name: ``quick``, ``balanced`` or ``best``.
        num_blocks: the model's encoder blocks (freeze depths are fractions of it).
        pretrained: False for a randomly initialized model (see the module docstring).

    Returns:
        ``{TrainConfig field: value}`` for every recipe field: the preset's value, else the
        ``TrainConfig`` default (:func:`recipe_defaults`); the fields of :data:`PRESET_KEEPS` are
        not listed and keep their current value. ``quick`` leaves nothing random on the pixels
        (``TrainConfig.random_pixels`` is False), so its frozen blocks' features are computed once.

    Raises:
        ValueError: unknown preset.
    """
    off = recipe_defaults()
    if name == "quick":
        return {**off, "freeze_depth": num_blocks, "epochs": 3, "augment": "none", "lr": 1e-3,
                "weight_decay": 0.0, "crop_scale_min": 0.08}
    if name == "balanced":
        return {**off, "freeze_depth": num_blocks // 2 if pretrained else 0, "epochs": 10, "augment": "basic",
                "crop_scale_min": 0.25, "lr": 1e-4 if pretrained else 1e-3, "weight_decay": 0.01}
    if name == "best":
        return {**off, "freeze_depth": num_blocks // 4 if pretrained else 0, "epochs": 20,
                "augment": "randaugment", "crop_scale_min": 0.25, "mixup": 0.8, "cutmix": 1.0,
                "random_erasing": 0.25, "label_smoothing": 0.1, "layer_decay": 0.75 if pretrained else 1.0,
                "ema_decay": 0.999, "lr": 2e-4 if pretrained else 1e-3, "weight_decay": 0.05}
    raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")


def is_pretrained(model: str) -> bool:
    """False only for the built-in random-weight models (vitft_app.scratch.SCRATCH_MODELS)."""
    from .scratch import is_scratch_model

    return not is_scratch_model(model)


def preset_values_for_model(name: str, model: str, image_size: int | None = None) -> dict[str, Any]:
    """:func:`preset_values` for a model name: reads its block count from its config (no
    weights are loaded; a Hub model must be cached or reachable).

    Raises:
        ValueError: unknown preset.
        ModelLoadError: the model's config cannot be read.
    """
    from .modeling import summarize_model

    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    summary = summarize_model(model, ["a", "b"], 0, image_size if not is_pretrained(model) else None)
    return preset_values(name, summary.num_blocks, is_pretrained(model))
