"""The training engine, as a package read in the order a run goes (nanoGPT's and timm's
``train.py`` split into the pieces a maintainer looks for):

- :mod:`.checks`: :func:`preflight` and the dataset/recipe checks before a run folder exists;
- :mod:`.options`: :class:`EngineOptions` (caches, progress cadence: speed, never results);
- :mod:`.plan`: :func:`resolve_train_plan` -> :class:`TrainPlan`, every "which path?" decided
  once with its reason (device and precision, decode and frozen-feature caches, attention);
- :mod:`.loaders`: datasets, loaders and the checkpointed epoch order;
- :mod:`.setup`: :func:`~.setup.setup_run` builds the model, optimizer, optional parts and
  resumes, into the :class:`~.setup.LoopContext` the loop works on;
- :mod:`.parts`: the optional parts (EMA, distillation, PatchDropout, gradual unfreezing, the
  attention trial) behind a narrow hook protocol;
- :mod:`.loop`: :func:`train` (setup -> :func:`train_one_epoch` -> :func:`evaluate` -> keep the
  best, early stop, checkpoint) and :func:`resume_run`;
- :mod:`.evaluation`: :func:`evaluate`, the loop's validation (metrics from :mod:`vitft_app.metrics`);
- :mod:`.losses`, :mod:`.state`: losses; loop counters, :class:`TrainResult`, errors.

Every public name is importable from ``vitft_app.training``.
"""

from __future__ import annotations

from ..optim import create_optimizer, create_scheduler
from .checks import DatasetError, check_recipe, check_trainable, preflight, prepare_data
from .evaluation import evaluate
from .loaders import TrainData, _window_sizes, build_train_data, optimizer_steps_per_epoch
from .loop import resume_run, train, train_one_epoch
from .losses import class_weight_tensor, compute_loss, feature_distill_loss
from .options import DECODE_CACHE_DIR, DEFAULT_DECODE_CACHE_BUDGET_BYTES, EngineOptions
from .plan import TrainPlan, resolve_train_plan, supports_feature_cache
from .setup import LoopContext, log_interval, setup_run
from .state import NonFiniteLossError, TrainResult

__all__ = [
    "DECODE_CACHE_DIR",
    "DEFAULT_DECODE_CACHE_BUDGET_BYTES",
    "DatasetError",
    "EngineOptions",
    "LoopContext",
    "NonFiniteLossError",
    "TrainData",
    "TrainPlan",
    "TrainResult",
    "_window_sizes",
    "build_train_data",
    "check_recipe",
    "check_trainable",
    "class_weight_tensor",
    "compute_loss",
    "create_optimizer",
    "create_scheduler",
    "evaluate",
    "feature_distill_loss",
    "log_interval",
    "optimizer_steps_per_epoch",
    "preflight",
    "prepare_data",
    "resolve_train_plan",
    "resume_run",
    "setup_run",
    "supports_feature_cache",
    "train",
    "train_one_epoch",
]
