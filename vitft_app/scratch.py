"""Models trained from scratch (offline): the list the model picker reads, their configs and
image processors.

Every entry is a stock transformers ``*ForImageClassification`` class, so a trained model saves
with ``save_pretrained``, reloads with ``pipeline("image-classification")``, exports to ONNX and
is explained by :mod:`vitft_app.explain` like a Hub checkpoint.

Two families:

- ``vit``: a plain ViT (``ViTForImageClassification``). ``vit-tiny-scratch`` is ViT-Tiny (DeiT-Ti
  shape). Plain ViTs have no locality prior and need millions of images or hundreds of epochs
  (Dosovitskiy et al. 2021; Touvron et al. 2021): on a few thousand images they learn slowly.
- ``mobilevit``: MobileViT (Mehta & Rastegari 2022, ``MobileViTForImageClassification``), a hybrid
  of MobileNetV2 convolution blocks and transformer blocks that attend over unfolded 2x2 patches
  of the feature map. The convolutions give the locality prior that small datasets lack
  (Xiao et al. 2021, "Early convolutions help transformers see better"). The output stride is
  chosen from the input size (:func:`mobilevit_output_stride`) so the last feature map is at least
  4x4 even for 32 px images (the later stages then use dilation instead of striding, as in
  MobileViT's segmentation setting).

Freeze depth per family (see :func:`vitft_app.modeling.encoder_parts`): for ``vit`` the blocks are
the 12 transformer blocks and depth >= 1 also freezes the patch and position embeddings; for
``mobilevit`` the blocks are the 5 stages (two MobileNetV2 stages, then three MobileViT stages,
each a strided MobileNetV2 block followed by transformer blocks), depth >= 1 also freezes the
convolutional stem, and depth 5 (a linear probe) also freezes the final 1x1 expansion
convolution. Frozen BatchNorm layers keep their running statistics (they run in eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: The name that existing runs and tests use (a random ViT-Tiny).
VIT_TINY_SCRATCH = "vit-tiny-scratch"
#: The offline default a fresh install should offer (fast, learns from a few thousand images).
RECOMMENDED_SCRATCH_MODEL = "mobilevit-xxs-scratch"
#: Pretraining data of every scratch model.
NO_PRETRAINING = "none: random weights, trained on your images only"


@dataclass(frozen=True)
class ScratchModel:
    """One offline model choice, as the model picker and README describe it.

    Attributes:
        name: the name given to ``--model`` and the model dropdown.
        family: ``"vit"`` or ``"mobilevit"`` (decides config, freeze-depth meaning, explanation).
        description: one line: architecture and shape.
        params: parameter count with a 10-class head, e.g. ``"0.95 M"``.
        use_for: what it is for, in a few words.
        expected: accuracy to expect on small data (measured; see README and
            benchmarks/README.md).
        pretraining: what the weights saw before your data.
        blocks: number of freezable blocks (the freeze-depth range is 0..blocks).
        explanation: how :mod:`vitft_app.explain` explains its predictions.
        shape: family-specific config values.
    """

    name: str
    family: Literal["vit", "mobilevit"]
    description: str
    params: str
    use_for: str
    expected: str
    blocks: int
    explanation: str
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
            from .modeling import scratch_config

            return scratch_config(image_size, id2label)
        from transformers import MobileViTConfig

        return MobileViTConfig(image_size=image_size, output_stride=mobilevit_output_stride(image_size),
                               **self.shape, **labels)

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
                "blocks": self.blocks, "explanation": self.explanation}


def mobilevit_output_stride(image_size: int) -> int:
    """MobileViT output stride for an input size: 8 below 64 px, 16 below 128 px, else 32, so the
    last feature map is at least 4x4 (the stock stride 32 leaves 1x1 at 32 px, too small for the
    2x2 patch unfolding of the last transformer stage)."""
    return 8 if image_size < 64 else 16 if image_size < 128 else 32


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
            family="mobilevit",
            description="MobileViT-XXS (conv stem + MobileNetV2 blocks + 3 transformer stages, hidden 64/80/96)",
            params="0.95 M",
            use_for="the offline default: digits, icons, small photo sets from scratch",
            expected="see README 'Offline models': built-in digits, cifar10-subset and hymenoptera rows of "
                     "benchmarks/README.md",
            blocks=5,
            explanation="input-gradient saliency",
            shape=dict(hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0),
        ),
        ScratchModel(
            name="mobilevit-xs-scratch",
            family="mobilevit",
            description="MobileViT-XS (conv stem + MobileNetV2 blocks + 3 transformer stages, hidden 96/120/144)",
            params="1.9 M",
            use_for="larger photos (96 px and up) when a few more minutes are fine",
            expected="see README 'Offline models'",
            blocks=5,
            explanation="input-gradient saliency",
            shape=dict(hidden_sizes=[96, 120, 144], neck_hidden_sizes=[16, 32, 48, 64, 80, 96, 384], expand_ratio=4.0),
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
