"""Optional parts of the training loop: small objects with a narrow hook protocol.

The loop calls a part's hooks at five fixed points, in this order; every hook does nothing unless
a part needs it (a protocol, not a callback framework: no events, no priorities, no state shared
through a bus):

- ``on_epoch_start(loop, epoch)``: before the epoch's first micro-batch (gradual unfreezing);
- ``before_micro_batch(loop)`` / ``after_micro_batch(loop, batch)``: around one micro-batch's
  forward and backward (the attention trial times it);
- ``forward_context()``: entered around the training forward only, not evaluation (PatchDropout);
- ``extra_loss(pixels, out)``: a term added to the summed loss (feature distillation);
- ``on_step_end(loop)``: after an optimizer step that was taken, not skipped (weight EMA);
- ``on_epoch_end(loop, stopped)``: after the epoch's last micro-batch (the attention trial
  decides with what it timed).

``loop`` is the run's :class:`~vitft_app.training.setup.LoopContext`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, ContextManager

import torch
from torch import nn

from ..attention import CANDIDATES, AttentionTrial, remember, set_attention
from ..augment import PatchDropout
from ..events import LogMessage
from ..modeling import count_parameters, freeze_layers
from ..optim import create_ema
from .losses import feature_distill_loss


class Part:
    """Base of the optional parts: every hook is a no-op (see the module docstring)."""

    #: True when :meth:`extra_loss` needs the student's ``hidden_states``.
    needs_hidden_states = False

    def on_epoch_start(self, loop: Any, epoch: int) -> None:
        """Before the epoch's first micro-batch."""

    def before_micro_batch(self, loop: Any) -> None:
        """Before one micro-batch's forward."""

    def forward_context(self) -> ContextManager:
        """Entered around the training forward (not evaluation)."""
        return contextlib.nullcontext()

    def extra_loss(self, pixels: torch.Tensor, out: Any) -> torch.Tensor | None:
        """A term added to the batch's summed loss (float32 scalar), or None."""
        return None

    def after_micro_batch(self, loop: Any, batch: dict[str, torch.Tensor]) -> None:
        """After one micro-batch's backward."""

    def on_step_end(self, loop: Any) -> None:
        """After an optimizer step that was taken."""

    def on_epoch_end(self, loop: Any, stopped: bool) -> None:
        """After the epoch's micro-batches (``stopped``: Stop ended the epoch early)."""


class WeightEma(Part):
    """Exponential moving average of the weights (:func:`vitft_app.optim.create_ema`), updated
    after each optimizer step; evaluated and saved instead of the raw weights.

    Args:
        model: the model being trained.
        decay: target decay in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.averaged = create_ema(model, decay)

    @property
    def module(self) -> nn.Module:
        """The averaged model."""
        return self.averaged.module

    def on_step_end(self, loop: Any) -> None:
        self.averaged.update_parameters(loop.model)


class Distillation(Part):
    """Feature distillation to a frozen copy of the starting model
    (:func:`~vitft_app.training.losses.feature_distill_loss`, times ``weight``).

    Args:
        model: the model before training (copied; only its features are used, so its head is
            irrelevant).
        weight: the loss weight (``TrainConfig.distill_weight``).
        device: where the teacher runs.
    """

    needs_hidden_states = True

    def __init__(self, model: nn.Module, weight: float, device: torch.device) -> None:
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval().to(device)
        self.weight = weight

    def extra_loss(self, pixels: torch.Tensor, out: Any) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = self.teacher(pixel_values=pixels, output_hidden_states=True)
        return self.weight * feature_distill_loss(out.hidden_states, teacher_out.hidden_states)


class TokenDropout(Part):
    """PatchDropout (:class:`vitft_app.augment.PatchDropout`): a hook on the embeddings, active
    only inside the training forward.

    Args:
        model: a model with a CLS token.
        rate: fraction of patch tokens dropped, in (0, 1).
    """

    def __init__(self, model: nn.Module, rate: float) -> None:
        self.dropout = PatchDropout(model, rate)

    def forward_context(self) -> ContextManager:
        return self.dropout.applied()


class GradualUnfreeze(Part):
    """One block fewer frozen every ``every`` epochs, from ``freeze_depth``.

    The optimizer already holds every parameter (``include_frozen``); a frozen one has no
    gradient, so it is skipped (decay included) until it is unfrozen.

    Args:
        freeze_depth: the starting depth (``TrainConfig.freeze_depth``).
        every: epochs per unfrozen block (``TrainConfig.gradual_unfreeze``, >= 1).
        depth: the depth the model is frozen at now.
    """

    def __init__(self, freeze_depth: int, every: int, depth: int) -> None:
        self.freeze_depth, self.every, self.depth = freeze_depth, every, depth

    def depth_at(self, epoch: int) -> int:
        """The freeze depth of epoch ``epoch`` (0-based)."""
        return max(0, self.freeze_depth - epoch // self.every)

    def on_epoch_start(self, loop: Any, epoch: int) -> None:
        depth = self.depth_at(epoch)
        if depth == self.depth:
            return
        freeze_layers(loop.model, depth)
        self.depth = depth
        loop.rewrap()  # DDP must see the new trainable set
        trainable = count_parameters(loop.model)[0]
        loop.emit(LogMessage(f"epoch {epoch + 1}: freeze depth now {depth} ({trainable:,} trainable parameters)"))


class AttentionChoice(Part):
    """``attention="auto"``: times the first training micro-batches with each kernel in turn
    (:class:`vitft_app.attention.AttentionTrial`) and keeps the faster for the model and its
    copies (every process votes, at the same micro-batch).

    Args:
        trial: the trial on the model being trained.
        use: sets a kernel on the model and its copies and records it in the loop state.
        memory_key: where to remember the decision for later runs
            (:func:`vitft_app.attention.remember`; only when both kernels were timed), or None.
    """

    def __init__(self, trial: AttentionTrial, use: Any, memory_key: str | None = None) -> None:
        self.trial, self.use, self.memory_key, self._timing = trial, use, memory_key, False

    def before_micro_batch(self, loop: Any) -> None:
        self._timing = not self.trial.done
        if self._timing:
            self.trial.begin()

    def after_micro_batch(self, loop: Any, batch: dict[str, torch.Tensor]) -> None:
        # Only full micro-batches are compared (an epoch's short last one would favour its kernel).
        if self._timing and self.trial.end(valid=batch["labels"].shape[0] == loop.config.batch_size):
            self._decide(loop)

    def on_epoch_end(self, loop: Any, stopped: bool) -> None:
        # An epoch shorter than the trial: the trial goes on in the next epoch (whose images come
        # from the decode cache, as in the rest of the run); after the last epoch it decides with
        # what was timed (for the memory and the log).
        if not stopped and not self.trial.done and loop.state.epoch + 1 >= loop.config.epochs:
            self._decide(loop)

    def _decide(self, loop: Any) -> None:
        alternative = loop.dist.any(self.trial.alternative_is_faster(), loop.device)
        kernel = self.trial.decide(alternative)
        self.use(kernel)
        if self.memory_key is not None and len(self.trial.best()) == len(CANDIDATES):
            remember(self.memory_key, kernel, self.trial.best())
        loop.emit(LogMessage(f"attention: {loop.state.attention} kept ({self.trial.describe()})"))


def use_attention(state: Any, modules: list[nn.Module | None], implementation: str) -> None:
    """Sets the attention kernel on the model and its copies (EMA, distillation teacher) and
    records it in the loop state (a resumed run keeps it)."""
    state.attention = implementation
    for module in modules:
        if module is not None:
            set_attention(module, implementation)
