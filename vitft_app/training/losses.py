"""Losses of the training loop: classification loss (summed per sample), class weights, and the
feature-distillation loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..data import DatasetReport


def class_weight_tensor(report: DatasetReport, kind: str) -> torch.Tensor | None:
    """Per-class loss weights from the training split.

    ``balanced`` is scikit-learn's ``compute_class_weight("balanced")``: ``n_samples /
    (n_classes * n_samples_of_class)``, so every class contributes the same total weight. For a
    multi-label dataset it returns BCE ``pos_weight`` instead: ``negatives / positives`` per
    label (the ``BCEWithLogitsLoss`` documentation's rule), clamped to [1/100, 100].

    Args:
        report: the dataset report (``train`` items, ``classes``, ``multi_label``).
        kind: ``"none"`` or ``"balanced"``.

    Returns:
        float32 ``(C,)``, or None for ``"none"``. A class with no training image gets weight 0
        (single-label) or 1 (multi-label).
    """
    if kind == "none":
        return None
    num_classes = len(report.classes)
    if report.multi_label:
        positives = torch.zeros(num_classes)
        for item in report.train:
            positives[list(item.labels or (item.label,))] += 1
        negatives = len(report.train) - positives
        weights = torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones(num_classes))
        return weights.clamp(0.01, 100.0)
    counts = torch.bincount(torch.tensor([item.label for item in report.train]), minlength=num_classes).float()
    return torch.where(counts > 0, len(report.train) / (num_classes * counts.clamp(min=1)), torch.zeros(num_classes))


def compute_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    multi_label: bool = False,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Summed per-sample classification loss of a batch (divide by the sample count for the mean).

    Single-label: ``F.cross_entropy`` with class-index targets ``(B,)`` int64 or soft targets
    ``(B, C)`` float (MixUp/CutMix), optional class weights and label smoothing (PyTorch applies
    the smoothing to soft targets too). Multi-label: ``BCEWithLogitsLoss`` on multi-hot targets,
    averaged over the C labels per sample (the value ``ViTForImageClassification`` reports),
    ``class_weights`` used as ``pos_weight``.

    Args:
        logits: ``(B, C)``, any float dtype (computed in float32).
        targets: see above.
        multi_label: BCE instead of cross-entropy.
        class_weights: ``(C,)`` from :func:`class_weight_tensor`, or None.
        label_smoothing: epsilon in [0, 1) (single-label only).

    Returns:
        A float32 scalar: the sum over the batch of the per-sample losses.
    """
    logits = logits.float()
    if multi_label:
        per_label = F.binary_cross_entropy_with_logits(
            logits, targets.float(), pos_weight=class_weights, reduction="none"
        )
        return per_label.mean(dim=1).sum()
    return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing, reduction="sum")


def feature_distill_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature-matching loss between two ViTs' CLS features, summed over the batch.

    For every encoder block's output (``hidden_states[1:]``), the CLS token of each model is
    normalized with a parameter-free LayerNorm and the two are compared by mean squared error;
    the per-sample loss is the mean over blocks and channels. MSE on normalized features, not KL
    between softened distributions: CLS features are not probability vectors, and whitened
    feature distillation (Wei et al. 2022, "Contrastive Learning Rivals Masked Image Modeling in
    Fine-tuning via Feature Distillation") normalizes them the same way so the loss does not
    depend on each block's feature scale. Blocks that are frozen in both models contribute 0.

    Args:
        student_hidden: ``hidden_states`` of the trained model, tuple of ``(B, T, D)``.
        teacher_hidden: the frozen starting model's ``hidden_states``, same shapes.

    Returns:
        float32 scalar: sum over the batch of the per-sample loss.
    """
    losses = []
    for student, teacher in zip(student_hidden[1:], teacher_hidden[1:]):
        s = F.layer_norm(student[:, 0].float(), student.shape[-1:])
        t = F.layer_norm(teacher[:, 0].float(), teacher.shape[-1:])
        losses.append((s - t).pow(2).mean(dim=1))
    return torch.stack(losses).mean(dim=0).sum()
