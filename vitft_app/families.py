"""Model families: what freeze depth, layer decay, the feature cache, explanation and export mean
for each architecture vitft fine-tunes.

One table (:data:`FAMILIES`) and a few functions that modeling, optim, feature_cache, explain,
training and the UI call, so a question such as "what is a freeze unit of a Swin?" is answered in
one place:

========== =============================== ============ ================== ===========================
family     classes (transformers)          freeze unit  explanation        feature cache
========== =============================== ============ ================== ===========================
vit        ViTForImageClassification       block        attention rollout  yes (CLS token)
deit       DeiTForImageClassification      block        attention rollout  yes (CLS token)
beit       BeitForImageClassification      block        attention rollout  no (relative position bias)
dinov2     Dinov2ForImageClassification    block        attention rollout  yes (CLS + mean of patches)
swin       Swin/Swinv2ForImageClassif.     stage        input gradient     no (hierarchical)
mobilevit  MobileViTForImageClassification stage        input gradient     no (hierarchical)
pvt_v2     PvtV2ForImageClassification     stage        input gradient     no (hierarchical)
timm       TimmWrapperForImageClassif.     timm group   input gradient     no (timm's own forward)
========== =============================== ============ ================== ===========================

Freeze depth ``N`` freezes the *stem* (patch/position embeddings, CLS and distillation tokens,
a convolutional stem, BEiT's shared relative position bias) and the first ``N`` *units*; at
``N`` = number of units (a linear probe) also the final norm, so only the head trains. Units are
transformer blocks for the plain (isotropic) families and stages for the hierarchical ones
(each Swin stage: its blocks and the patch merging after them; each MobileViT stage: its
MobileNetV2 and MobileViT blocks). For timm checkpoints the units are timm's own parameter groups
(``model.group_matcher(coarse=True)``: blocks for a ViT, stages for a ConvNeXt), the grouping timm
uses for layer decay (``timm.optim.param_groups_layer_decay``).

Layer-decay ids follow the same units (BEiT, Bao et al. 2021, section 2.4): stem 0, unit ``i``
is ``i + 1``, the final norm and the head ``L + 1``.

DeiT's distilled checkpoints (``DeiTForImageClassificationWithTeacher``) have two heads, one on
the CLS token and one on the distillation token, whose average is the prediction. Fine-tuning
without the teacher gives both heads the same labels, so vitft loads them as
``DeiTForImageClassification``: the backbone (distillation token included) is kept, the new
classification head reads the CLS token, and the distillation head is dropped (:func:`model_class_for`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

FreezeUnit = Literal["block", "stage", "group"]
ExplainMethod = Literal["attention rollout", "input gradient"]
Pooling = Literal["cls", "cls+mean"]


@dataclass(frozen=True)
class ModelFamily:
    """What vitft does with one architecture family.

    Attributes:
        name: key in :data:`FAMILIES`.
        title: the family's name in the UI and README.
        model_types: ``config.model_type`` values of the family.
        freeze_unit: what one step of freeze depth freezes: a transformer ``"block"``, a
            hierarchical ``"stage"``, or a timm parameter ``"group"``.
        explain: :mod:`vitft_app.explain`'s method for it.
        pooling: how the head reads the last hidden states, for the feature cache: ``"cls"`` (the
            CLS token) or ``"cls+mean"`` (DINOv2: the CLS token concatenated with the mean of the
            patch tokens); None when the cache cannot split the model.
        cache_note: why the feature cache is off for the family ('' where it can be on).
        export_note: what to know about its ONNX export.
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    freeze_unit: FreezeUnit
    explain: ExplainMethod
    pooling: Pooling | None
    cache_note: str = ""
    export_note: str = "ONNX (opset 17, TorchScript exporter), checked against PyTorch"
    token_dropping: bool = False
    """PatchDropout can drop its patch tokens: a CLS token the head reads and no position bias tied
    to the full token grid (ViT, DeiT, DINOv2; not BEiT, whose relative position bias is)."""

    @property
    def unit_plural(self) -> str:
        """``"encoder blocks"``, ``"stages"`` or ``"timm groups"`` (see :func:`freeze_unit_name`)."""
        return {"block": "encoder blocks", "stage": "stages", "group": "timm groups"}[self.freeze_unit]


_HIERARCHICAL = "hierarchical stages change the token grid between stages; the cache splits only plain ViT-style encoders"

#: The families, by name (see the module docstring for the table).
FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("vit", "ViT", ("vit", "vit_msn"), "block", "attention rollout", "cls", token_dropping=True),
        ModelFamily("deit", "DeiT", ("deit",), "block", "attention rollout", "cls",
                    export_note="ONNX; distilled checkpoints export the single fine-tuned head", token_dropping=True),
        ModelFamily("beit", "BEiT", ("beit", "data2vec-vision"), "block", "attention rollout", None,
                    cache_note="BEiT blocks take a relative position bias computed for the image size, which the cache"
                    " does not pass"),
        ModelFamily("dinov2", "DINOv2", ("dinov2", "dinov2_with_registers"), "block", "attention rollout",
                    "cls+mean", token_dropping=True),
        ModelFamily("swin", "Swin / Swinv2", ("swin", "swinv2"), "stage", "input gradient", None,
                    cache_note=_HIERARCHICAL,
                    export_note="ONNX; shifted-window attention, checked against PyTorch like the others"),
        ModelFamily("mobilevit", "MobileViT", ("mobilevit", "mobilevitv2"), "stage", "input gradient", None,
                    cache_note=_HIERARCHICAL),
        ModelFamily("pvt_v2", "PVTv2", ("pvt_v2",), "stage", "input gradient", None, cache_note=_HIERARCHICAL),
        ModelFamily("timm", "timm (TimmWrapper)", ("timm_wrapper",), "group", "input gradient", None,
                    cache_note="timm models run their own forward, which the cache does not split",
                    export_note="ONNX through transformers' TimmWrapper; needs the timm package"),
    )
}

#: Fallback for an unknown ViT-like model: treated as plain blocks, explained by input gradient.
GENERIC = ModelFamily("other", "other (ViT-like)", (), "block", "input gradient", None,
                      cache_note="vitft does not know this architecture's pooling")


def encoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module | None]:
    """Returns ``(embeddings, encoder blocks, final norm)`` of a ViT-style model.

    For MobileViT (``base.conv_stem``, ``encoder.layer``, ``conv_1x1_exp``) the parts are the
    convolutional stem, the 5 stages and the final 1x1 expansion convolution. For PVTv2 they are
    the first stage's patch embedding, the 4 stages (each with its own patch embedding, blocks and
    LayerNorm) and None.

    Raises:
        ValueError: the model has no ``embeddings`` and ``encoder.layer`` (not ViT-like).
    """
    base = getattr(model, "base_model", model)
    if getattr(base, "embeddings", None) is None and isinstance(getattr(base, "conv_stem", None), nn.Module):
        blocks = getattr(getattr(base, "encoder", None), "layer", None)
        if isinstance(blocks, nn.ModuleList):
            return base.conv_stem, blocks, getattr(base, "conv_1x1_exp", None)
    stages = getattr(getattr(base, "encoder", None), "layers", None)
    if getattr(base, "embeddings", None) is None and isinstance(stages, nn.ModuleList) and stages \
            and hasattr(stages[0], "patch_embedding"):
        return stages[0].patch_embedding, stages, None  # PVTv2: each stage embeds its own patches
    embeddings = getattr(base, "embeddings", None)
    # transformers < 5 keeps blocks in `encoder.layer`; 5.x moved ViT's to `layers`.
    encoder = getattr(base, "encoder", None)
    candidates = (getattr(encoder, "layer", None), getattr(encoder, "layers", None), getattr(base, "layers", None))
    blocks = next((c for c in candidates if isinstance(c, nn.ModuleList)), None)
    if embeddings is None or blocks is None:
        raise ValueError(
            f"Freezing needs a ViT-style model (embeddings + encoder blocks); got {type(model).__name__}"
        )
    return embeddings, blocks, getattr(base, "layernorm", None)


def family_for_type(model_type: str | None) -> ModelFamily:
    """The family of a ``config.model_type`` (:data:`GENERIC` when unknown)."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return GENERIC


def family_of(model_or_config: Any) -> ModelFamily:
    """The family of a model or a ``PretrainedConfig`` (by ``config.model_type``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_for_type(getattr(config, "model_type", None))


def is_distilled_deit(config: Any) -> bool:
    """True for a DeiT checkpoint saved with its two heads (``DeiTForImageClassificationWithTeacher``)."""
    return "DeiTForImageClassificationWithTeacher" in (getattr(config, "architectures", None) or [])


def model_class_for(config: Any) -> Any:
    """The class that loads a checkpoint for fine-tuning with a new head.

    ``AutoModelForImageClassification``, except for DeiT: transformers maps ``deit`` to two
    classes and picks by ``config.architectures``, so a distilled checkpoint would load with its two
    heads (``DeiTForImageClassificationWithTeacher``, an inference-only class). vitft loads every DeiT
    as ``DeiTForImageClassification`` (one head on the CLS token; the distillation head is dropped,
    the distillation token stays in the backbone), which also builds DeiT configs that name no
    architecture.
    """
    from transformers import AutoModelForImageClassification, DeiTForImageClassification

    if getattr(config, "model_type", None) == "deit":
        return DeiTForImageClassification
    return AutoModelForImageClassification


def sync_label_names(model: nn.Module) -> None:
    """Makes a timm checkpoint save its new class names.

    ``TimmWrapperConfig`` saves ``label_names`` instead of ``id2label`` and keeps a loaded
    checkpoint's ``label_names`` (the pretraining classes) even when ``id2label`` was replaced,
    so a fine-tuned model would reload as ``LABEL_0, LABEL_1, ...``. Setting ``label_names``
    from ``id2label`` keeps the real names through ``save_pretrained`` and ``pipeline()``.
    """
    config = model.config
    if family_of(model).name == "timm":
        config.label_names = [config.id2label[i] for i in sorted(config.id2label)]


# --------------------------------------------------------------------------------------------
# Freeze units
# --------------------------------------------------------------------------------------------

Named = list[tuple[str, nn.Parameter]]


@dataclass
class FreezeGroups:
    """A model's parameters in freezing order.

    Attributes:
        stem: what feeds unit 0 (embeddings, tokens, convolutional stem, shared position bias).
        units: one list per freeze unit (block or stage), input to output.
        final: the norm after the last unit (frozen only by a linear probe).
        rest: everything else: the classification head(s), a pooler without weights.
    """

    stem: Named
    units: list[Named]
    final: Named
    rest: Named


def _timm_groups(model: nn.Module) -> FreezeGroups:
    """timm's coarse parameter groups (``group_matcher(coarse=True)``) as freeze groups."""
    from timm.models import group_parameters

    timm_model = model.timm_model
    groups = group_parameters(timm_model, timm_model.group_matcher(coarse=True))
    head = getattr(timm_model, "get_classifier", lambda: None)()
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    params = dict(timm_model.named_parameters())
    ordered = [[("timm_model." + n, params[n]) for n in names] for _, names in sorted(groups.items())]
    matcher = timm_model.group_matcher(coarse=True)
    has_stem = "stem" in matcher
    stem = ordered.pop(0) if has_stem and ordered else []
    rest = [(n, p) for group in ordered for n, p in group if id(p) in head_ids]
    ordered = [[(n, p) for n, p in group if id(p) not in head_ids] for group in ordered]
    ordered = [group for group in ordered if group]
    # timm gives the norm after the blocks (ViT ``norm``, ``fc_norm``; ConvNeXt ``head.norm``) a
    # group of its own after the blocks (id 99999 and up): that is the final norm.
    final: Named = []
    n_blocks = _timm_block_count(timm_model)
    if n_blocks is not None and len(ordered) > n_blocks:
        final = [np_ for group in ordered[n_blocks:] for np_ in group]
        ordered = ordered[:n_blocks]
    return FreezeGroups(stem, ordered, final, rest)


def _timm_block_count(timm_model: nn.Module) -> int | None:
    """Number of coarse groups that are blocks or stages (``blocks`` / ``stages`` / ``layers``)."""
    for attr in ("blocks", "stages", "layers"):
        sequence = getattr(timm_model, attr, None)
        if isinstance(sequence, (nn.Sequential, nn.ModuleList)):
            return len(sequence)
    return None


def freeze_groups(model: nn.Module) -> FreezeGroups:
    """Splits a model's parameters into stem, freeze units, final norm and the rest.

    For transformers models the split comes from :func:`vitft_app.modeling.encoder_parts`
    (embeddings, blocks or stages, final norm), with two additions: BEiT's shared relative
    position bias belongs to the stem (it feeds every block) and BEiT's mean-pooling LayerNorm
    (``pooler.layernorm``) is its final norm. For timm checkpoints see :func:`_timm_groups`.

    Raises:
        ValueError: the model has none of the known layouts.
    """
    if family_of(model).name == "timm":
        return _timm_groups(model)
    embeddings, blocks, final_norm = encoder_parts(model)
    base = getattr(model, "base_model", model)
    stem_modules = [embeddings]
    shared_bias = getattr(base, "shared_position_bias", None) or getattr(
        getattr(base, "encoder", None), "relative_position_bias", None)
    if isinstance(shared_bias, nn.Module):
        stem_modules.append(shared_bias)
    final_modules = [final_norm] if isinstance(final_norm, nn.Module) else []
    pooler_norm = getattr(getattr(base, "pooler", None), "layernorm", None)
    if isinstance(pooler_norm, nn.Module):
        final_modules.append(pooler_norm)
    seen: set[int] = set()

    def take(modules: list[nn.Module]) -> set[int]:
        ids = {id(p) for m in modules for p in m.parameters()} - seen
        seen.update(ids)
        return ids

    stem_ids = take(stem_modules)
    unit_ids = [take([block]) for block in blocks]
    final_ids = take(final_modules)
    named = list(model.named_parameters())
    return FreezeGroups(
        stem=[(n, p) for n, p in named if id(p) in stem_ids],
        units=[[(n, p) for n, p in named if id(p) in ids] for ids in unit_ids],
        final=[(n, p) for n, p in named if id(p) in final_ids],
        rest=[(n, p) for n, p in named if id(p) not in seen],
    )


def freeze_unit_name(model: nn.Module) -> str:
    """What one step of freeze depth freezes, plural, for the UI: ``"encoder blocks"`` or
    ``"stages"`` (a timm checkpoint says which by its layout: ``blocks`` or ``stages``)."""
    family = family_of(model)
    if family.name == "timm":
        timm_model = getattr(model, "timm_model", None)
        return "encoder blocks" if isinstance(getattr(timm_model, "blocks", None), nn.Module) else "stages"
    return family.unit_plural


def num_freeze_units(model: nn.Module) -> int:
    """The largest freeze depth of the model (its blocks, stages or timm groups)."""
    return len(freeze_groups(model).units)


def apply_freeze_depth(model: nn.Module, depth: int) -> list[nn.Parameter]:
    """Sets ``requires_grad`` for a freeze depth (see the module docstring) and returns the
    frozen parameters.

    Raises:
        ValueError: ``depth`` is negative or larger than the number of units.
    """
    groups = freeze_groups(model)
    if not 0 <= depth <= len(groups.units):
        raise ValueError(f"freeze_depth must be between 0 and {len(groups.units)} for this model, got {depth}")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    frozen: Named = []
    if depth >= 1:
        frozen = groups.stem + [np_ for unit in groups.units[:depth] for np_ in unit]
        if depth == len(groups.units):
            frozen += groups.final
    for _, parameter in frozen:
        parameter.requires_grad_(False)
    return [p for _, p in frozen]


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Layer id of every parameter for layer-wise lr decay: stem 0, freeze unit ``i`` is
    ``i + 1``, the final norm and the head ``L + 1`` (BEiT section 2.4; timm's
    ``param_groups_layer_decay`` with the same groups).

    Returns:
        ``{parameter name: layer id}`` for every named parameter.
    """
    groups = freeze_groups(model)
    top = len(groups.units) + 1
    ids = {name: 0 for name, _ in groups.stem}
    for i, unit in enumerate(groups.units):
        ids.update({name: i + 1 for name, _ in unit})
    ids.update({name: top for name, _ in groups.final + groups.rest})
    return ids


# --------------------------------------------------------------------------------------------
# Feature cache rule
# --------------------------------------------------------------------------------------------


def _random_modules(modules: list[nn.Module]) -> list[str]:
    """Descriptions of modules that are random in training mode: dropout with p > 0 and
    stochastic depth (``DropPath``: transformers' ``*DropPath`` and timm's, ``drop_prob > 0``)."""
    found = []
    for module in modules:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
                found.append(f"dropout p={sub.p:g}")
            elif "DropPath" in type(sub).__name__ and float(getattr(sub, "drop_prob", 0) or 0) > 0:
                found.append(f"drop path p={float(sub.drop_prob):g}")
    return found


def frozen_depth(model: nn.Module) -> int:
    """Number of leading freeze units whose parameters are all frozen (0 when the stem trains)."""
    groups = freeze_groups(model)
    if any(p.requires_grad for _, p in groups.stem):
        return 0
    depth = 0
    for unit in groups.units:
        if any(p.requires_grad for _, p in unit):
            break
        depth += 1
    return depth


def feature_cache_blocker(model: nn.Module, depth: int | None = None) -> str | None:
    """Why the frozen prefix of ``model`` cannot be cached exactly, or None when it can.

    The cache (:mod:`vitft_app.feature_cache`) stores the output of the stem and the first
    ``depth`` units once and replays it every epoch. That equals training only when (1) vitft can
    split the model there (plain ViT-style encoders whose head reads a CLS token, or DINOv2's CLS +
    mean pooling) and (2) nothing in the prefix is random in training mode (dropout or stochastic
    depth with p > 0: frozen blocks still run in training mode without the cache).

    Args:
        model: the model, frozen with :func:`apply_freeze_depth`.
        depth: the freeze depth; default :func:`frozen_depth` of the model as it is.

    Returns:
        A reason for the log, or None.
    """
    family = family_of(model)
    if family.pooling is None:
        return f"{family.title}: {family.cache_note}"
    depth = frozen_depth(model) if depth is None else depth
    if depth < 1:
        return "nothing is frozen"
    embeddings, blocks, _ = encoder_parts(model)
    random_parts = _random_modules([embeddings, *blocks[:depth]])
    if random_parts:
        return (f"the frozen blocks are random in training ({', '.join(sorted(set(random_parts)))}), so their output"
                " changes every epoch")
    return None


def pooler(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the classification head reads from the last hidden states ``(B, T, D)``: the CLS
    token ``(B, D)``, or for DINOv2 the CLS token concatenated with the mean of the patch tokens
    ``(B, 2D)`` (as ``Dinov2ForImageClassification``; register tokens are left out of the mean).

    Returns:
        A function of the hidden states (it holds no reference to the model).
    """
    if family_of(model).pooling == "cls+mean":
        start = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        return functools.partial(_cls_and_mean, start=start)
    return _cls


def _cls(hidden: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0, :]


def _cls_and_mean(hidden: torch.Tensor, start: int) -> torch.Tensor:
    return torch.cat([hidden[:, 0], hidden[:, start:].mean(dim=1)], dim=1)


def explain_method(model: nn.Module) -> ExplainMethod:
    """``"attention rollout"`` for families with a CLS token and one token per patch (ViT, DeiT,
    BEiT, DINOv2), ``"input gradient"`` for the others (windowed or hierarchical attention, timm)."""
    return family_of(model).explain
