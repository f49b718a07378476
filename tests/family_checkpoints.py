"""Tiny random checkpoints of every model family vitft fine-tunes (hidden ~32, 2 blocks or
stages, 32 px), saved with ``save_pretrained`` as a Hub download would be: a 4-class
"pretraining" head, ``architectures`` set, the family's own image processor."""

from __future__ import annotations

from pathlib import Path

#: What the "pretrained" head predicts (replaced by the dataset's classes when fine-tuning).
PRETRAIN_LABELS = ["tench", "goldfish", "shark", "ray"]
IMAGE_SIZE = 32

#: case -> (family name, number of freeze units, unit kind)
CASES: dict[str, tuple[str, int, str]] = {
    "vit": ("vit", 2, "block"),
    "deit": ("deit", 2, "block"),
    "deit-distilled": ("deit", 2, "block"),
    "beit": ("beit", 2, "block"),
    "dinov2": ("dinov2", 2, "block"),
    "swin": ("swin", 2, "stage"),
    "swinv2": ("swin", 2, "stage"),
    "mobilevit": ("mobilevit", 5, "stage"),
    "timm-vit": ("timm", 2, "group"),
    "timm-convnext": ("timm", 4, "group"),
}


def _labels() -> dict:
    return dict(num_labels=len(PRETRAIN_LABELS), id2label=dict(enumerate(PRETRAIN_LABELS)),
                label2id={label: i for i, label in enumerate(PRETRAIN_LABELS)})


def save_family_checkpoint(case: str, folder: Path, **config_changes) -> Path:
    """Builds the tiny random model of ``case`` (a key of :data:`CASES`) and saves it with its
    image processor to ``folder``.

    Returns:
        ``folder``.
    """
    import torch
    import transformers as T

    torch.manual_seed(0)
    size = IMAGE_SIZE
    square = {"height": size, "width": size}
    vit_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=size, patch_size=8, **_labels())
    if case == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(**vit_like, **config_changes))
        processor = T.ViTImageProcessor(size=square)
    elif case in ("deit", "deit-distilled"):
        config = T.DeiTConfig(**vit_like, **config_changes)
        cls = T.DeiTForImageClassificationWithTeacher if case == "deit-distilled" else T.DeiTForImageClassification
        model = cls(config)
        processor = T.DeiTImageProcessor(size=square, crop_size=square)
    elif case == "beit":
        config = T.BeitConfig(**vit_like, use_mean_pooling=True, use_relative_position_bias=True,
                              layer_scale_init_value=0.1, **config_changes)
        model = T.BeitForImageClassification(config)
        processor = T.BeitImageProcessor(size=square, crop_size=square)
    elif case == "dinov2":
        values = {k: v for k, v in vit_like.items() if k != "intermediate_size"}
        config = T.Dinov2Config(**values, mlp_ratio=2, **config_changes)
        model = T.Dinov2ForImageClassification(config)
        processor = T.BitImageProcessor(size={"shortest_edge": size}, crop_size=square)
    elif case in ("swin", "swinv2"):
        cls_config, cls_model = (T.SwinConfig, T.SwinForImageClassification) if case == "swin" else (
            T.Swinv2Config, T.Swinv2ForImageClassification)
        config = cls_config(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, image_size=size,
                            patch_size=4, **_labels(), **config_changes)
        model = cls_model(config)
        processor = T.ViTImageProcessor(size=square)
    elif case == "mobilevit":
        # initializer_range 0.3: with the default 0.02 a random 32 px MobileViT's activations vanish
        # through its BatchNorms in eval mode (all logits 0); pretrained weights do not have that problem.
        config = T.MobileViTConfig(image_size=size, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                                   initializer_range=0.3, **_labels(), **config_changes)
        model = T.MobileViTForImageClassification(config)
        processor = T.MobileViTImageProcessor(size={"shortest_edge": size}, crop_size=square)
    elif case in ("timm-vit", "timm-convnext"):
        if case == "timm-vit":
            architecture = "vit_tiny_patch16_224"
            model_args = {"img_size": size, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
        else:
            architecture = "convnext_atto"
            model_args = {"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)}
        # A timm checkpoint keeps its preprocessing in config.json's pretrained_cfg (timm's data config).
        pretrained_cfg = {"input_size": [3, size, size], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                          "std": [0.5, 0.5, 0.5], "crop_pct": 0.875, "crop_mode": "center"}
        config = T.TimmWrapperConfig(architecture=architecture, model_args=model_args, pretrained_cfg=pretrained_cfg,
                                     **_labels(), **config_changes)
        model = T.TimmWrapperForImageClassification(config)
        processor = None
    else:
        raise ValueError(case)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder
