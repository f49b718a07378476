"""The Train tab's LoRA controls (rank, alpha, target layers) and their parameter-count note.

Kept apart from ``train_tab`` so the tab only places the controls and names them in its form;
the counting is :func:`vitft_app.lora.check_lora` (a ``meta``-device model: no weights read).
"""

from __future__ import annotations

from typing import Any


from ..config import TrainConfig
from ..modeling import ModelLoadError
from ..scratch import is_scratch_model


def lora_note(model: str, classes: list[str] | None, freeze_depth: float | None, rank: float | None,
              alpha: float | None, targets: str | None, image_size: float | None = None, settings: Any = None) -> str:
    """Markdown under the LoRA controls: how many parameters train with these settings.

    Args:
        model: the model name or folder as typed.
        classes: the dataset's class names (None or empty: a 2-class head is assumed).
        freeze_depth: blocks without adapters.
        rank: LoRA rank from the form (0 or empty: off).
        alpha: LoRA alpha from the form.
        targets: comma-separated target layer names, blank for the default.
        image_size: the form's image size (used for scratch models only).
        settings: the app's settings; a typed model folder must pass ``check_model`` first.

    Returns:
        One markdown line; never raises (a bad setting gives a line starting with ✗).
    """
    from ..lora import check_lora

    rank = int(rank or 0)
    if rank <= 0:
        return "_LoRA off: every unfrozen weight trains (full fine-tuning). Set a rank (8 is common) to train" \
               " small adapters instead._"
    model = (model or "").strip()
    try:
        if settings is not None and model and not is_scratch_model(model):
            model = settings.check_model(model)
        config = TrainConfig(data_dir=".", model=model or TrainConfig.model, lora_rank=rank,
                             lora_alpha=float(alpha or TrainConfig.lora_alpha), lora_targets=targets or None,
                             freeze_depth=int(freeze_depth or 0),
                             image_size=int(image_size) if image_size and is_scratch_model(model) else None)
        trainable, total = check_lora(config, list(classes or []))
    except (ModelLoadError, ValueError, OSError) as exc:
        return f"✗ {exc}"
    except Exception as exc:  # noqa: BLE001 - shown to the user instead of a server error
        return f"✗ Cannot count LoRA parameters: {type(exc).__name__}: {exc}"
    share = 100.0 * trainable / max(total, 1)
    scratch = ("\n\n⚠ This model has random weights: LoRA adapts what a pretrained model already knows, so from"
               " scratch it learns little. Set LoRA rank 0 to train every weight." if is_scratch_model(model or
                                                                                                  TrainConfig.model) else "")
    return (f"**LoRA rank {rank}: {trainable:,} / {total:,} parameters train ({share:.2f}%)**: adapters on"
            f" {targets or 'the attention query and value projections'} plus the full classification head."
            " The run saves the merged model (predicts and exports as usual) and the adapter in `lora_adapter/`."
            + scratch)


def wire_lora_note(controls: list[Any], note: Any, settings: Any) -> None:
    """Refreshes the note when any of ``controls`` changes.

    Args:
        controls: ``[model, classes, freeze_depth, rank, alpha, targets, image_size]`` components, in
            :func:`lora_note`'s argument order.
        note: the markdown the note goes to.
        settings: the app's settings (model folder confinement).
    """
    for component in controls:
        component.change(lambda *values: lora_note(*values, settings=settings), inputs=controls, outputs=note)
