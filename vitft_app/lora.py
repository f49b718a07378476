"""LoRA fine-tuning with the ``peft`` library (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

Each targeted linear layer ``W`` (by default the attention query and value projections, the
paper's choice) gets a trainable low-rank update ``W + (alpha / r) B A`` with ``A: r x in`` and
``B: out x r`` (``B`` starts at zero, so training starts from the pretrained model); every other
weight is frozen except the classification head, which trains in full (peft's
``modules_to_save``).

The training loop keeps working on the same ``nn.Module``: ``peft.get_peft_model`` replaces the
targeted ``nn.Linear`` layers in place, so forward passes, the optimizer's parameter groups
(layer decay included), EMA, checkpoints and resume see an ordinary model whose only trainable
parameters are the adapters and the head. What changes is saving: the run's ``model/`` is the
merged model (``merge_and_unload``: plain ``save_pretrained`` weights, so ``pipeline()``, export
and prediction need no peft), and ``lora_adapter/`` beside it holds the adapter alone (a few
hundred KB; ``peft.PeftModel.from_pretrained(base_model, "RUN/lora_adapter")``).

Which options combine with LoRA (decided here, once):

- freeze depth N: adapters only in blocks N and above (frozen blocks get none); all blocks frozen
  is refused (nothing left to adapt: that is a linear probe, use LoRA rank 0);
- gradual unfreezing: refused by :class:`~vitft_app.config.TrainConfig` (the adapters already
  train in every unfrozen block from the start);
- layer decay, EMA, feature distillation, resume, the decode cache and the frozen-prefix feature
  cache work unchanged (the frozen prefix holds no adapter).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .modeling import encoder_parts

logger = logging.getLogger(__name__)

#: Folder of a run that holds the LoRA adapter (beside ``model/``, the merged model).
ADAPTER_DIR = "lora_adapter"
#: Default targets, first match wins: the attention query and value projections under the names
#: the transformers families use (``query``/``value``: transformers 4.x ViT, DeiT, BEiT, DINOv2,
#: Swin; ``q_proj``/``v_proj``: transformers 5.x ViT and DeiT, CLIP), or a fused ``qkv`` (timm).
DEFAULT_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("qkv",))
#: Classification heads trained in full (``modules_to_save``); DeiT-distilled has two.
HEAD_NAMES = ("classifier", "cls_classifier", "distillation_classifier")


def _block_linears(model: nn.Module, freeze_depth: int) -> dict[str, str]:
    """``{full module name: last name component}`` of every ``nn.Linear`` in the encoder blocks
    from ``freeze_depth`` on (the frozen blocks get no adapter)."""
    _, blocks, _ = encoder_parts(model)
    unfrozen = {id(m) for block in list(blocks)[freeze_depth:] for m in block.modules()}
    return {name: name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module) in unfrozen}


def resolve_lora_targets(model: nn.Module, targets: str | None, freeze_depth: int = 0) -> list[str]:
    """Full names of the linear layers that get adapters.

    Args:
        model: a ViT-style classifier (see :func:`~vitft_app.modeling.encoder_parts`).
        targets: comma-separated last name components (``"q_proj,v_proj"``), or None for the
            model's attention query and value projections (:data:`DEFAULT_TARGETS`).
        freeze_depth: blocks below this get no adapter.

    Returns:
        Module names such as ``vit.layers.3.attention.q_proj``, in model order.

    Raises:
        ValueError: a name matches no linear layer of the blocks (the message lists the names that
            exist), no block is left unfrozen, or the model has no query/value projection.
    """
    _, blocks, _ = encoder_parts(model)
    if freeze_depth >= len(blocks):
        raise ValueError(
            f"LoRA needs at least one unfrozen block, but freeze_depth {freeze_depth} freezes all {len(blocks)};"
            " lower freeze_depth, or set lora_rank 0 for a linear probe."
        )
    linears = _block_linears(model, freeze_depth)
    available = sorted(set(linears.values()))
    if targets is None:
        wanted = next((set(pair) for pair in DEFAULT_TARGETS if set(pair) <= set(available)), None)
        if wanted is None:
            raise ValueError(
                f"This model has no attention query/value projection LoRA knows by name; set lora_targets to some of:"
                f" {', '.join(available)}"
            )
    else:
        wanted = {name.strip() for name in targets.split(",") if name.strip()}
        unknown = sorted(wanted - set(available))
        if unknown:
            raise ValueError(
                f"lora_targets {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a linear layer of this"
                f" model's encoder blocks; choose from: {', '.join(available)}"
            )
    return [name for name, short in linears.items() if short in wanted]


def head_modules(model: nn.Module) -> list[str]:
    """Names of the classification head(s) (trained in full with LoRA)."""
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def count_lora_parameters(model: nn.Module, rank: int, targets: str | None, freeze_depth: int = 0) -> tuple[int, int]:
    """``(trainable, total)`` parameters of a LoRA fine-tune, computed without applying it (the
    model may live on the ``meta`` device): ``rank x (in + out)`` per targeted layer plus the
    head(s); the total adds the adapters and the trained copy of the head(s) to the model's own
    parameters (peft keeps the original head beside its trained copy), as the run log counts.

    Raises:
        ValueError: as :func:`resolve_lora_targets`.
    """
    modules = dict(model.named_modules())
    adapters = sum(rank * (modules[name].in_features + modules[name].out_features)
                   for name in resolve_lora_targets(model, targets, freeze_depth))
    heads = sum(p.numel() for name in head_modules(model) for p in getattr(model, name).parameters())
    return adapters + heads, sum(p.numel() for p in model.parameters()) + adapters + heads


@dataclass
class LoraSetup:
    """A model with LoRA adapters injected (the loop trains ``peft_model.base_model.model``,
    the same object as the model given to :func:`apply_lora`).

    Attributes:
        peft_model: the ``peft.PeftModel`` wrapper (used to save the adapter and merge).
        targets: full names of the adapted linear layers.
        rank: LoRA rank r.
        alpha: LoRA alpha (update scale alpha / r).
    """

    peft_model: Any
    targets: list[str]
    rank: int
    alpha: float

    def describe(self) -> str:
        """One line for the run log: rank, alpha, which layers and how many parameters train."""
        short = sorted({name.rsplit(".", 1)[-1] for name in self.targets})
        trainable, total = self.peft_model.get_nb_trainable_parameters()
        return (f"LoRA rank {self.rank}, alpha {self.alpha:g} on {len(self.targets)} layers ({', '.join(short)}) +"
                f" the full head: {trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f}%)")


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str | None, freeze_depth: int = 0) -> LoraSetup:
    """Injects LoRA adapters in place (``peft.get_peft_model``) and freezes everything else but
    the head(s).

    The adapters have no dropout and no bias (``lora_dropout=0``, ``bias="none"``); ``B`` is
    zero-initialized (peft's default), so the model's outputs are unchanged until the first step.

    Args:
        model: the classifier as built by :func:`~vitft_app.modeling.build_model`.
        rank: r >= 1.
        alpha: scale numerator (update x alpha / r).
        targets: as :func:`resolve_lora_targets`.
        freeze_depth: blocks below this get no adapter.

    Returns:
        The :class:`LoraSetup`; ``model`` itself now holds the adapters.

    Raises:
        ValueError: as :func:`resolve_lora_targets`.
    """
    from peft import LoraConfig, get_peft_model

    names = resolve_lora_targets(model, targets, freeze_depth)
    lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none",
                             modules_to_save=head_modules(model))
    peft_model = get_peft_model(model, lora_config)
    return LoraSetup(peft_model, names, rank, alpha)


def lora_copy(setup: LoraSetup, scored: nn.Module | None = None) -> Any:
    """A CPU copy of the ``PeftModel`` holding ``scored``'s weights (the live model is untouched,
    so training continues while the copy is saved or merged).

    Args:
        setup: from :func:`apply_lora`.
        scored: the module whose weights to take: the trained model or its EMA average (the same
            structure); None takes the live weights.
    """
    clone = copy.deepcopy(setup.peft_model).cpu()
    if scored is not None:
        clone.base_model.model.load_state_dict({k: v.detach().cpu() for k, v in scored.state_dict().items()})
    return clone


def save_best_model(scored: nn.Module, processor: Any, run_dir: str | os.PathLike, lora: LoraSetup | None) -> None:
    """Saves the best model into ``run_dir/model`` (and, with LoRA, the adapter into
    ``run_dir/lora_adapter``), each folder swapped in atomically.

    Without LoRA this is :func:`~vitft_app.runs.save_model_atomically`. With LoRA the adapter is
    saved first (``PeftModel.save_pretrained``: ``adapter_config.json`` + ``adapter_model.safetensors``
    with the adapters and the head), then the merged model (``merge_and_unload``) with the processor.

    Args:
        scored: the model to save (the trained model or its EMA average).
        processor: the image processor saved beside the model.
        run_dir: the run folder.
        lora: the :class:`LoraSetup`, or None for full fine-tuning.
    """
    from .runs import save_folder_atomically, save_model_atomically

    run_dir = Path(run_dir)
    if lora is None:
        save_model_atomically(scored, processor, run_dir / "model")
        return
    clone = lora_copy(lora, scored)
    # before merging: merging removes the adapters
    save_folder_atomically(clone.save_pretrained, run_dir / ADAPTER_DIR, "the LoRA adapter")
    save_model_atomically(clone.merge_and_unload(), processor, run_dir / "model")


def meta_model(name: str, classes: list[str], image_size: int | None = None) -> nn.Module:
    """The classifier built from its config on PyTorch's ``meta`` device (no weights are read,
    so this is fast even for ViT-Base), for checks and parameter counts.

    Raises:
        ModelLoadError: the config cannot be loaded.
    """
    from transformers import AutoModelForImageClassification

    from .modeling import SCRATCH_DEFAULT_IMAGE_SIZE, load_model_config
    from .scratch import is_scratch_model, scratch_model

    id2label = dict(enumerate(classes)) if len(classes) >= 2 else {0: "LABEL_0", 1: "LABEL_1"}
    if is_scratch_model(name):
        config = scratch_model(name).config(image_size or SCRATCH_DEFAULT_IMAGE_SIZE, id2label)
    else:
        config = copy.deepcopy(load_model_config(name))
        config.num_labels = len(id2label)
    with torch.device("meta"):
        return AutoModelForImageClassification.from_config(config)


def check_lora(config: Any, classes: list[str]) -> tuple[int, int]:
    """Preflight of a LoRA run: the targets exist and a block is left to adapt.

    Args:
        config: the :class:`~vitft_app.config.TrainConfig` (``lora_rank > 0``).
        classes: the dataset's class names.

    Returns:
        ``(trainable, total)`` parameters, as :func:`count_lora_parameters`.

    Raises:
        ValueError: as :func:`resolve_lora_targets`; ``peft`` is not installed.
        ModelLoadError: the model's config cannot be loaded.
    """
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError("LoRA needs the peft library: pip install peft (or set lora_rank 0)") from None
    model = meta_model(config.model, classes, config.image_size)
    return count_lora_parameters(model, config.lora_rank, config.lora_targets, config.freeze_depth)
