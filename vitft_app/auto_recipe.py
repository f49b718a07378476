"""A training recipe for a model trained from scratch, chosen from what the dataset scan saw
(``vitft train --preset auto`` and the Train tab's *Auto* preset).

The rule (README, "Offline models"; measurements in benchmarks/README.md):

- **Model**: ``pvt-v2-b0-scratch`` (:data:`vitft_app.scratch.RECOMMENDED_SCRATCH_MODEL`): its
  overlapping convolutional patch embeddings give the locality prior a few thousand images cannot
  teach a plain ViT (Xiao et al. 2021; Wang et al. 2022).
- **Image size**: the scan's median shorter side rounded up to a multiple of 16, at least 32; photos
  are capped at :data:`PHOTO_SIZE_CAP` px (from scratch on a CPU, more pixels cost time and add
  little on a few hundred images).
- **Augmentation**: mostly grayscale images (digits, glyphs, scans) get ``crop`` (random resized
  crop, no flip: a mirrored 7 is no 7); tiny images (at most 48 px) get a mild scale range (area
  >= 0.6: cropping a 28 px digit to 8 % of its area leaves no digit), tiny colour images (CIFAR)
  ``basic`` with that range (flips keep their class); photos get ``basic`` (crop + flip) with area
  >= 0.25; colour images train at lr 5e-4 instead of 2e-3 (measured on hymenoptera: lr 2e-3 with
  RandAugment jumped between the two majority answers, 0.60; lr 5e-4 with ``basic`` reached 0.71;
  on cifar10-subset lr 2e-3 with flips fell to chance by epoch 5 of 30, 5e-4 reached 0.49 by then). Stronger policies (RandAugment) did not pay in these short runs.
- **Epochs and batch**: a budget of training images seen (so a small dataset gets more passes), 3
  to 60 epochs: :data:`TARGET_IMAGE_VIEWS` for grayscale sets (digits reach 0.97 in 8 epochs of
  4,000), :data:`COLOUR_IMAGE_VIEWS` for colour images (cifar10-subset at 7 epochs was still gaining
  0.03 to 0.04 a pass and used 2.3 of its 10 minutes; 30 epochs of 5,000 fit in about 9 quiet
  minutes); batch 32, or 16 below 1,000 training images (more optimizer steps per pass).
- **Optimizer**: AdamW, lr 2e-3 for grayscale images and 5e-4 for colour ones (measured: benchmarks/README.md),
  weight decay 0.01, warmup 5 % of the steps then cosine decay, label smoothing 0.1 for photos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .scratch import RECOMMENDED_SCRATCH_MODEL, scratch_model

#: Largest input size the recipe suggests for photos trained from scratch, pixels.
PHOTO_SIZE_CAP = 64
#: Images at or below this median shorter side are "tiny" (digits, icons, CIFAR), pixels.
TINY_SIDE = 48
#: Training images the recipe aims to show a model of grayscale images (epochs = this / training images).
TARGET_IMAGE_VIEWS = 32_000
#: Training images the recipe aims to show a model of colour images (photos need more passes).
COLOUR_IMAGE_VIEWS = 150_000
#: Most epochs the recipe suggests (small sets: 245 hymenoptera images x 60 epochs took about 100 s).
MAX_EPOCHS = 60
#: Learning rate for colour images from scratch (measured: hymenoptera 0.71 at 5e-4 where 2e-3 jumped between
#: majority answers; cifar10-subset at 2e-3 with flips and a 30-epoch cosine fell to chance by epoch 5,
#: at 5e-4 it reached 0.49 by epoch 5, benchmarks/README.md).
SMALL_PHOTO_LR = 5e-4
#: Share of grayscale ("L", "1", "LA", "I", "I;16") images above which flips are left out.
GRAYSCALE_SHARE = 0.5


@dataclass(frozen=True)
class ScratchRecipe:
    """A suggested scratch recipe and why.

    Attributes:
        values: ``{TrainConfig field: value}`` (model, image_size, epochs, batch_size, lr,
            warmup_ratio, weight_decay, augment, crop_scale_min, label_smoothing, freeze_depth,
            and the regularizers it turns off).
        reasons: one short sentence per decision, for the UI and the CLI log.
    """

    values: dict[str, Any]
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: the key values and the reasons."""
        v = self.values
        head = (f"{v['model']} at {v['image_size']} px, {v['epochs']} epochs, batch {v['batch_size']}, lr {v['lr']:g},"
                f" warmup {v['warmup_ratio']:g}, augment {v['augment']} (crop area >= {v['crop_scale_min']:g})")
        return head + ". " + " ".join(self.reasons)


def suggest_scratch_recipe(report: Any) -> ScratchRecipe:
    """The scratch recipe for a scanned dataset (see the module docstring for the rule).

    Args:
        report: a :class:`~vitft_app.data.DatasetReport` (uses ``train``, ``classes``, ``files``
            and :meth:`~vitft_app.data.DatasetReport.suggested_image_size`).

    Returns:
        A :class:`ScratchRecipe`.
    """
    usable = [r.check for r in report.files if r.check.reason is None]
    modes = [str(c.mode or "") for c in usable]
    gray = sum(m in ("L", "1", "LA", "I", "I;16", "P;L") for m in modes) / max(len(modes), 1)
    median_side = report.suggested_image_size()
    tiny = median_side <= TINY_SIDE
    n_train = max(len(report.train), 1)
    per_class = n_train / max(len(report.classes), 1)
    reasons: list[str] = []

    size = median_side if tiny else min(median_side, PHOTO_SIZE_CAP)
    reasons.append(f"Image size {size} px: median shorter side {'kept' if size == median_side else f'capped at {PHOTO_SIZE_CAP} for training from scratch'}.")
    if gray > GRAYSCALE_SHARE:
        augment, crop_min, smoothing = "crop", 0.6, 0.0
        reasons.append("Augment crop (no flip, crop area >= 0.6): grayscale images such as digits or glyphs change"
                       " meaning when mirrored and lose their content under strong crops.")
    elif tiny:
        augment, crop_min, smoothing = "basic", 0.6, 0.1
        reasons.append(f"Augment basic (flip, crop area >= 0.6) and lr {SMALL_PHOTO_LR:g}: tiny ({median_side} px)"
                       " colour images keep their class when mirrored but lose it under strong crops; at lr 2e-3"
                       " cifar10-subset fell to chance by epoch 5 of 30, at lr 5e-4 it reached 0.49 by epoch 5.")
    elif per_class < 200:
        augment, crop_min, smoothing = "basic", 0.25, 0.1
        reasons.append(f"Augment basic (crop + flip) and lr {SMALL_PHOTO_LR:g}: with {per_class:.0f} training images"
                       " per class, lr 2e-3 with RandAugment jumped between majority answers (hymenoptera 0.60);"
                       f" lr {SMALL_PHOTO_LR:g} with basic reached 0.71.")
    else:
        augment, crop_min, smoothing = "basic", 0.25, 0.1
        reasons.append("Augment basic (crop + flip) for photos.")
    batch = 16 if n_train < 1000 else 32
    views = TARGET_IMAGE_VIEWS if gray > GRAYSCALE_SHARE else COLOUR_IMAGE_VIEWS
    epochs = int(min(MAX_EPOCHS, max(3, math.ceil(views / n_train))))
    reasons.append(f"{epochs} epochs of {n_train} training images (about {epochs * n_train:,} images seen), batch {batch}.")
    values = {
        "model": RECOMMENDED_SCRATCH_MODEL, "image_size": int(size), "epochs": epochs, "batch_size": batch,
        "lr": SMALL_PHOTO_LR if gray <= GRAYSCALE_SHARE else scratch_model(RECOMMENDED_SCRATCH_MODEL).lr, "warmup_ratio": 0.05, "weight_decay": 0.01, "scheduler": "cosine", "optimizer": "adamw",
        "augment": augment, "crop_scale_min": crop_min, "label_smoothing": smoothing, "freeze_depth": 0,
        "layer_decay": 1.0, "mixup": 0.0, "cutmix": 0.0, "random_erasing": 0.0, "ema_decay": 0.0,
        "patch_mask_ratio": 0.0, "gradual_unfreeze": 0, "distill_weight": 0.0, "color_jitter": 0.0,
    }
    return ScratchRecipe(values, reasons)
