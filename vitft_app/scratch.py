"""Models trained from scratch (offline): the list the model picker reads, their configs and
image processors.

Every entry is a stock transformers ``*ForImageClassification`` class, so a trained model saves
with ``save_pretrained``, reloads with ``pipeline("image-classification")``, exports to ONNX and
is explained by :mod:`vitft_app.explain` like a Hub checkpoint.

Two families:

- ``vit``: a plain ViT (``ViTForImageClassification``). ``vit-tiny-scratch`` is ViT-Tiny (DeiT-Ti
  shape). Plain ViTs have no locality prior and need millions of images or hundreds of epochs
  (Dosovitskiy et al. 2021; Touvron et al. 2021): on a few thousand images they learn slowly.
- ``pvt``: PVTv2 (Wang et al. 2022, "PVT v2: Improved baselines with Pyramid Vision Transformer",
  ``PvtV2ForImageClassification``): a pyramid of 4 stages whose tokens come from overlapping
  convolutions and whose MLPs hold a depthwise convolution, so it has the locality prior small
  datasets lack (Xiao et al. 2021, "Early convolutions help transformers see better"); LayerNorm
  only (no BatchNorm), eager attention. Strides are adapted to small images (:func:`pvt_strides`).
  Measured on 1,000 digits (4 epochs, bf16, 2 shared cores; benchmarks/README.md): it learned
  faster than a 6-block ViT (patch 4) and MobileViT-XXS, whose BatchNorm-heavy network predicted a
  single class in eval mode for the first epochs; Swin (windowed attention) learned about as fast
  but its outputs depended on the other images of the batch and failed ONNX parity in this
  transformers version.

Freeze depth per family (see :func:`vitft_app.modeling.encoder_parts`): for ``vit`` the blocks are
the 12 transformer blocks and depth >= 1 also freezes the patch and position embeddings; for
``pvt`` the blocks are the 4 stages (each: patch embedding, transformer blocks, LayerNorm), so
depth N freezes the first N stages and depth 4 is a linear probe (only the head trains).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: The name that existing runs and tests use (a random ViT-Tiny).
VIT_TINY_SCRATCH = "vit-tiny-scratch"
#: The offline default a fresh install should offer (fast, learns from a few thousand images).
RECOMMENDED_SCRATCH_MODEL = "pvt-v2-b0-scratch"
#: Pretraining data of every scratch model.
NO_PRETRAINING = "none: random weights, trained on your images only"


@dataclass(frozen=True)
class ScratchModel:
    """One offline model choice, as the model picker and README describe it.

    Attributes:
        name: the name given to ``--model`` and the model dropdown.
        family: ``"vit"`` or ``"pvt"`` (decides config, freeze-depth meaning, explanation).
        description: one line: architecture and shape.
        params: parameter count with a 10-class head, e.g. ``"0.95 M"``.
        use_for: what it is for, in a few words.
        expected: accuracy to expect on small data (measured; see README and
            benchmarks/README.md).
        pretraining: what the weights saw before your data.
        blocks: number of freezable blocks (the freeze-depth range is 0..blocks).
        explanation: how :mod:`vitft_app.explain` explains its predictions.
        lr: the AdamW learning rate it trains well with from scratch (the Train tab's default
            when it is chosen, and the auto recipe's).
        shape: family-specific config values.
    """

    name: str
    family: Literal["vit", "pvt"]
    description: str
    params: str
    use_for: str
    expected: str
    blocks: int
    explanation: str
    lr: float = 1e-3
    pretraining: str = NO_PRETRAINING
    shape: dict[str, Any] = field(default_factory=dict)

    def config(self, image_size: int, id2label: dict[int, str]) -> Any:
        """The transformers config for ``image_size`` px inputs and these labels.

        Raises:
            ValueError: ``image_size`` outside 32..224 (or, for ``vit``, not a multiple of the
                patch size).
        """
        if not 32 <= image_size <= 224:
            raise ValueError(f"image_size for {self.name} must be between 32 and 224, got {image_size}")
        labels = dict(
            num_labels=len(id2label),
            id2label={int(k): v for k, v in id2label.items()},
            label2id={v: int(k) for k, v in id2label.items()},
            problem_type="single_label_classification",
        )
        if self.family == "vit":
            return scratch_config(image_size, id2label)
        from transformers import PvtV2Config

        return PvtV2Config(image_size=image_size, **pvt_strides(image_size), **self.shape, **labels)

    def processor(self, image_size: int) -> Any:
        """The image processor saved with the model: resize to a square, mean and std 0.5 (the
        ``ViTImageProcessor`` defaults; for every family, so ``pipeline()`` and the training
        transforms agree)."""
        from transformers import ViTImageProcessor

        return ViTImageProcessor(size={"height": image_size, "width": image_size})

    def as_dict(self) -> dict[str, Any]:
        """The public fields (for a model picker or ``--help`` text)."""
        return {"name": self.name, "family": self.family, "description": self.description, "params": self.params,
                "pretraining": self.pretraining, "use_for": self.use_for, "expected": self.expected,
                "blocks": self.blocks, "explanation": self.explanation, "lr": self.lr}


def pvt_strides(image_size: int) -> dict[str, list[int]]:
    """Patch-embedding strides and kernel sizes of the 4 PVTv2 stages for an input size.

    PVTv2 downsamples by 4, 2, 2, 2 (32 in all): a 32 px image would end as a 1x1 map and its
    first stage would see only 8x8 tokens. Below 64 px the first stage strides 2 (kernel 3), so
    it sees at least 16x16 tokens and the last stage at least 2x2.
    """
    first = 2 if image_size < 64 else 4
    return {"strides": [first, 2, 2, 2], "patch_sizes": [3 if first == 2 else 7, 3, 3, 3]}


#: Offline models, by name. Order: the one existing runs use, then the recommended one.
SCRATCH_MODELS: dict[str, ScratchModel] = {
    m.name: m
    for m in (
        ScratchModel(
            name=VIT_TINY_SCRATCH,
            family="vit",
            description="ViT-Tiny (DeiT-Ti shape: 12 blocks, hidden 192, 3 heads), patch 4/8/16 by image size",
            params="5.4 M",
            use_for="comparison with the plain-ViT literature; needs far more data or epochs",
            expected="weak on small data: 0.18 after one epoch on the 4,000 built-in digits; 0.56 on "
                     "hymenoptera (majority 0.54); 0.39 on cifar10-subset after a sweep",
            blocks=12,
            explanation="attention rollout",
        ),
        ScratchModel(
            name=RECOMMENDED_SCRATCH_MODEL,
            family="pvt",
            description="PVTv2-b0 (4 stages, hidden 32/64/160/256, overlapping conv patch embeddings, "
                        "spatial-reduction attention, depthwise-conv MLP), strides adapted to small images",
            params="3.0 M",
            use_for="the offline default: digits, icons, small photo sets trained from scratch",
            expected="built-in digits 0.972 in 2 minutes (majority 0.10); cifar10-subset 0.645 after 30 "
                     "epochs, about 15 minutes (majority 0.10); hymenoptera 0.71 in 2 minutes, 0.74 fine-tuned from "
                     "our own cifar10-subset model (majority 0.54): modest on small photo sets, where a "
                     "pretrained checkpoint does far better (benchmarks/README.md)",
            blocks=4,
            explanation="input gradient",
            lr=2e-3,
            shape=dict(num_encoder_blocks=4, depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256],
                       num_attention_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4], sr_ratios=[4, 2, 1, 1]),
        ),
    )
}


def is_scratch_model(name: str | None) -> bool:
    """True for a name of :data:`SCRATCH_MODELS` (a model built with random weights, offline)."""
    return name in SCRATCH_MODELS


def scratch_model(name: str) -> ScratchModel:
    """The :class:`ScratchModel` called ``name``.

    Raises:
        KeyError: not a scratch model name.
    """
    return SCRATCH_MODELS[name]


def scratch_patch_size(image_size: int) -> int:
    """Patch size of vit-tiny-scratch: 16 from 128 px (14x14 patches at 224, as ViT-Ti/16),
    8 from 64 px, 4 below (8x8 patches at 32 px, the usual CIFAR ViT setting)."""
    return 16 if image_size >= 128 else 8 if image_size >= 64 else 4


def scratch_config(image_size: int, id2label: dict[int, str]) -> Any:
    """ViT-Tiny (DeiT-Ti shape: hidden 192, 12 blocks, 3 heads, MLP 768) with the given labels.

    Raises:
        ValueError: ``image_size`` is outside 32..224 or not a multiple of its patch size.
    """
    if not 32 <= image_size <= 224:
        raise ValueError(f"image_size for vit-tiny-scratch must be between 32 and 224, got {image_size}")
    patch = scratch_patch_size(image_size)
    if image_size % patch:
        raise ValueError(
            f"image_size {image_size} for vit-tiny-scratch must be a multiple of its patch size {patch}"
        )
    from transformers import ViTConfig  # local: config (and so `vitft --help`) imports this module

    return ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=image_size,
        patch_size=patch,
        num_labels=len(id2label),
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
        problem_type="single_label_classification",
    )


def scratch_processor(image_size: int) -> Any:
    """The image processor saved with vit-tiny-scratch: resize to a square, mean and std 0.5
    (the ``ViTImageProcessor`` defaults)."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": image_size, "width": image_size})
