"""Frozen-prefix feature caching for ViT-style classifiers.

With ``freeze_depth = N`` (see :func:`vitft_app.modeling.freeze_layers`) the embeddings and blocks
``0 .. N-1`` never change, so for images that are not randomly augmented their output (the hidden
states after block ``N-1``) is the same every epoch. This module splits a model into

- a **prefix** ``pixels (B, 3, H, W) -> hidden (B, T, D)``: embeddings + blocks ``0 .. N-1``; for a
  linear probe (``N`` = all blocks) also the final LayerNorm and the pooling, ``-> (B, D)``;
- a **suffix** ``hidden -> logits (B, C)``: blocks ``N ..`` + final LayerNorm + pooling +
  classifier (only the classifier for a linear probe),

where the pooling is the family's (:func:`vitft_app.families.pooler`: the CLS token, or DINOv2's
CLS token and mean of the patch tokens); which models qualify is
:func:`vitft_app.families.feature_cache_blocker`'s rule,

computes the prefix once per dataset (:func:`cache_features`) and then trains/evaluates only
the suffix on the stored features. ``suffix(prefix(x)) == model(x).logits`` in eval mode (the
same operations in the same order; checked to 1e-5 in fp32 by ``tests/test_speed.py``).

Cost model (ViT-Tiny, 224 px): a training image costs about 3x its forward FLOPs; with the
prefix cached, an epoch costs ``3 * (12 - N) / 12`` of the blocks' share, and a linear probe epoch
costs one ``(B, 192) @ (192, C)`` matmul per batch.

Memory: ``N_images * T * D`` values (ViT-Tiny 224: ``197 * 192 = 37,824`` per image: 151 KB fp32,
76 KB bf16); a linear probe keeps ``D`` values per image. Above ``memory_budget_bytes`` the store
is a numpy memmap file in ``spill_dir``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
import contextlib

import numpy as np
import torch
from torch import nn

from .families import pooler
from .modeling import encoder_parts

#: Default budget of the in-memory feature store: 4 GiB.
DEFAULT_FEATURE_BUDGET_BYTES = 4 * 1024**3


class FrozenPrefix(nn.Module):
    """Embeddings + the first ``depth`` blocks (+ final norm and CLS for a full-depth probe).

    Args:
        model: a ViT-style ``*ForImageClassification`` (see :func:`~vitft_app.modeling.encoder_parts`).
        depth: frozen blocks, ``1 .. num_blocks``.
    """

    def __init__(self, model: nn.Module, depth: int):
        super().__init__()
        embeddings, blocks, final_norm = encoder_parts(model)
        self.embeddings = embeddings
        self.blocks = nn.ModuleList(list(blocks[:depth]))
        self.probe = depth == len(blocks)
        self.final_norm = final_norm if self.probe else None
        self.pool = pooler(model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``float (B, 3, H, W)`` -> hidden ``(B, T, D)``, or CLS feature ``(B, D)`` for a probe."""
        projection = getattr(getattr(self.embeddings, "patch_embeddings", None), "projection", None)
        if projection is not None:  # ViTModel casts the pixels to the weights' dtype the same way
            pixel_values = pixel_values.to(projection.weight.dtype)
        hidden = self.embeddings(pixel_values)
        for block in self.blocks:
            hidden = _run_block(block, hidden)
        if self.probe:
            if self.final_norm is not None:
                hidden = self.final_norm(hidden)
            hidden = self.pool(hidden)
        return hidden


class TrainableSuffix(nn.Module):
    """Blocks ``depth ..`` + final norm + CLS pooling + classifier (the classifier alone for a probe).

    Shares its parameters with ``model``: training the suffix trains the model, and
    ``model.save_pretrained`` afterwards saves the result.
    """

    def __init__(self, model: nn.Module, depth: int):
        super().__init__()
        _, blocks, final_norm = encoder_parts(model)
        self.probe = depth == len(blocks)
        self.blocks = nn.ModuleList(list(blocks[depth:]))
        self.final_norm = None if self.probe else final_norm
        classifier = getattr(model, "classifier", None)
        if not isinstance(classifier, nn.Module):
            raise ValueError(f"Feature caching needs a model with a `classifier` head; got {type(model).__name__}")
        self.classifier = classifier
        self.pool = pooler(model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden ``(B, T, D)`` (or ``(B, D)`` for a probe) -> logits ``(B, C)``."""
        if self.probe:
            return self.classifier(hidden)
        for block in self.blocks:
            hidden = _run_block(block, hidden)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return self.classifier(self.pool(hidden))


def _run_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = block(hidden, None)  # transformers 5 ViTLayer returns a tensor; 4.x a tuple
    return out[0] if isinstance(out, tuple) else out


def split_frozen_model(model: nn.Module, depth: int) -> tuple[FrozenPrefix, TrainableSuffix]:
    """Splits a model frozen at ``depth`` into its frozen prefix and trainable suffix.

    Args:
        model: ViT-style classifier, already frozen with ``freeze_layers(model, depth)``.
        depth: ``1 .. num_blocks``.

    Returns:
        ``(prefix, suffix)`` sharing the model's parameters; ``suffix(prefix(x))`` equals
        ``model(pixel_values=x).logits`` in eval mode.

    Raises:
        ValueError: depth out of range, or the prefix still has trainable parameters.
    """
    _, blocks, _ = encoder_parts(model)
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"feature caching needs freeze depth between 1 and {len(blocks)}, got {depth}")
    prefix, suffix = FrozenPrefix(model, depth), TrainableSuffix(model, depth)
    trainable = [n for n, p in prefix.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"the prefix must be frozen (freeze_layers(model, {depth})); trainable: {trainable[:3]}")
    return prefix, suffix


@dataclass
class CachedFeatures:
    """A frozen prefix's outputs for every image of a split, by dataset index.

    Attributes:
        features: ``(N, T, D)`` hidden states (or ``(N, D)`` CLS features for a linear probe), on
            the CPU, in memory or a memmap spilled to disk; rows of failed images are unset.
        targets: ``(N,)`` int64 class indices or ``(N, C)`` multi-hot float targets.
        valid: bool ``(N,)``; False for an image that failed to load (it is skipped).
    """

    features: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        """Images that loaded."""
        return int(self.valid.sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored features."""
        return self.features.numel() * self.features.element_size()

    def take(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of the given dataset indices, features as float32 (failed images dropped
        and counted): ``{"features", "labels", "failed"}``, like a DataLoader batch."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        keep = self.valid[index] if index.numel() else torch.zeros(0, dtype=torch.bool)
        index = index[keep]
        return {"features": self.features[index].float(), "labels": self.targets[index],
                "failed": torch.tensor(int((~keep).sum()))}

    def batches(self, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
        """Every valid row in dataset order, ``batch_size`` at a time (evaluation)."""
        rows = torch.nonzero(self.valid).flatten().tolist()
        for start in range(0, len(rows), batch_size):
            yield self.take(rows[start : start + batch_size])


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, budget: int, spill_dir: str | os.PathLike | None) -> torch.Tensor:
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes <= budget or spill_dir is None:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bfloat16:  # numpy has no bf16: store the bits as int16 and view them back
        np_dtype, view = np.int16, torch.bfloat16
    else:
        np_dtype, view = torch.empty((), dtype=dtype).numpy().dtype, None
    Path(spill_dir).mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="features-", suffix=".bin", dir=spill_dir)
    os.close(fd)
    array = np.memmap(path, dtype=np_dtype, mode="w+", shape=shape)
    os.unlink(path)  # the mapping stays valid; the file disappears with the process
    tensor = torch.from_numpy(array)
    return tensor.view(view) if view is not None else tensor


@torch.no_grad()
def cache_features(
    prefix: nn.Module,
    dataset: Any,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
    batch_size: int = 64,
    store_dtype: torch.dtype = torch.float32,
    memory_budget_bytes: int = DEFAULT_FEATURE_BUDGET_BYTES,
    spill_dir: str | os.PathLike | None = None,
) -> CachedFeatures:
    """Runs the frozen prefix once over every image of a dataset that is not randomly augmented.

    Runs under ``torch.no_grad`` (not ``inference_mode``: inference tensors cannot be saved for
    the suffix's backward) with the prefix in eval mode (frozen blocks then apply no dropout; ViT
    checkpoints use dropout 0.0, so this matches training mode for them).

    Args:
        prefix: from :func:`split_frozen_model`.
        dataset: items ``(float (3, H, W), target)`` or None for an image that fails to load, with
            ``dataset.target(i)`` (:class:`~vitft_app.data.ImageDataset`, or the decode cache's
            dataset), eval transforms.
        device: where the prefix runs.
        autocast: context factory for the forward (``plan.autocast``), or None.
        batch_size: images per forward pass.
        store_dtype: dtype of the store (fp32 exact; bf16 halves memory, read back as fp32).
        memory_budget_bytes: above this the store is a memmap file in ``spill_dir``.
        spill_dir: folder for the memmap (e.g. the run folder); None keeps it in memory.

    Returns:
        :class:`CachedFeatures` indexed like ``dataset``.
    """
    n = len(dataset)
    loader = torch.utils.data.DataLoader(range(n), batch_size=batch_size, shuffle=False,
                                         collate_fn=lambda idx: (list(idx), [dataset[i] for i in idx]))
    store: torch.Tensor | None = None
    valid = torch.zeros(n, dtype=torch.bool)
    was_training = prefix.training
    prefix.eval()
    try:
        for indices, items in loader:
            good = [(i, item) for i, item in zip(indices, items) if item is not None]
            if not good:
                continue
            pixels = torch.stack([item[0] for _, item in good]).to(device)
            with autocast() if autocast is not None else _null():
                out = prefix(pixels).to("cpu", store_dtype)
            if store is None:
                store = _allocate((n, *out.shape[1:]), store_dtype, memory_budget_bytes, spill_dir)
            rows = torch.tensor([i for i, _ in good])
            store[rows] = out
            valid[rows] = True
    finally:
        prefix.train(was_training)
    targets = [dataset.target(i) for i in range(n)]
    if targets and isinstance(targets[0], torch.Tensor):
        target_tensor = torch.stack(targets)
    else:
        target_tensor = torch.tensor(targets, dtype=torch.long)
    return CachedFeatures(store if store is not None else torch.empty(0), target_tensor, valid)


def _null() -> Any:
    return contextlib.nullcontext()
