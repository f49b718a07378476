"""Where the engine's rules live: the plan resolved once (caches, attention, with reasons), the
one "random pixels" property, presets that reset what they do not set, engine options in the log."""

from __future__ import annotations

import dataclasses
import types

import pytest

from vitft_app.config import TrainConfig
from vitft_app.device import resolve_device_plan
from vitft_app.modeling import build_model
from vitft_app.presets import PRESET_KEEPS, PRESETS, preset_values
from vitft_app.runs import RunRecorder, RunStore
from vitft_app.training import EngineOptions, resolve_train_plan, train

REPORT = types.SimpleNamespace(multi_label=False, classes=["a", "b"])


def plan_for(tiny_vit, options=None, dist_ctx=None, resumed=None, **changes):
    config = TrainConfig(data_dir="d", model=str(tiny_vit), **changes)
    model = build_model(str(tiny_vit), ["a", "b"]).model
    return resolve_train_plan(config, REPORT, resolve_device_plan("fp32", "cpu"), model, options, dist_ctx, resumed)


def test_random_pixels_is_one_property_with_its_sources():
    plain = TrainConfig(data_dir="d", augment="none")
    assert not plain.random_pixels and plain.random_pixel_sources() == ()
    # colour jitter rides on an augment: alone it touches nothing
    assert not dataclasses.replace(plain, color_jitter=0.4).random_pixels
    mixed = dataclasses.replace(plain, random_erasing=0.25, mixup=0.8, patch_dropout=0.5)
    assert mixed.random_pixel_sources("image") == ("random_erasing 0.25",)
    assert mixed.random_pixel_sources("batch") == ("mixup 0.8", "patch_dropout 0.5")
    assert mixed.random_pixels
    for name, value in (("augment", "basic"), ("cutmix", 1.0), ("patch_mask_ratio", 0.3)):
        assert dataclasses.replace(plain, **{name: value}).random_pixels, name


def test_presets_reset_every_field_they_do_not_set():
    """Quick after a PatchDropout (and MixUp, balanced-weights, early-stopping) run: nothing of the
    earlier recipe lingers, so Quick's pixels are not random and its frozen features are cached."""
    earlier = TrainConfig(data_dir="d", patch_dropout=0.5, mixup=0.2, class_weights="balanced",
                          early_stopping_patience=3, label_smoothing=0.1, batch_size=8, seed=7)
    recipe_fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(PRESET_KEEPS)
    for name in PRESETS:
        values = preset_values(name, 12)
        assert set(values) == recipe_fields, name
        config = dataclasses.replace(earlier, **values)
        assert config.patch_dropout == 0 and config.class_weights == "none" and config.early_stopping_patience == 0
        assert config.batch_size == 8 and config.seed == 7  # hardware and bookkeeping stay
    quick = dataclasses.replace(earlier, **preset_values("quick", 12))
    assert not quick.random_pixels


def test_plan_caches_and_their_reasons(tiny_vit):
    both = plan_for(tiny_vit, freeze_depth=1, augment="none")
    assert both.feature_cache_val and both.feature_cache_train and both.decode_cache
    assert not both.train_transform_random
    assert any(r.startswith("frozen-feature cache: validation and training") for r in both.reasons)
    assert "decode cache: validation and training (no per-image randomness)" in both.reasons

    augmented = plan_for(tiny_vit, freeze_depth=1, augment="basic", mixup=0.8)
    assert augmented.feature_cache_val and not augmented.feature_cache_train and augmented.train_transform_random
    assert ("frozen-feature cache: validation only (random pixels in training: augment basic, mixup 0.8)"
            in augmented.reasons)
    assert any(r.startswith("decode cache: validation, and training's decoded images up to the memory budget"
                            " (the random transforms run on them every epoch: augment basic") for r in augmented.reasons)
    workers = plan_for(tiny_vit, freeze_depth=1, augment="basic", num_workers=1)
    assert any(r.startswith("decode cache: validation only") and "DataLoader workers decode every epoch" in r
               for r in workers.reasons)
    # batch-level randomness keeps the decode cache for training, not the feature cache
    dropped = plan_for(tiny_vit, freeze_depth=1, augment="none", patch_dropout=0.5)
    assert not dropped.train_transform_random and not dropped.feature_cache_train

    cases = {
        "freeze depth 0: no frozen block": dict(freeze_depth=0),
        "gradual unfreezing changes the frozen blocks": dict(freeze_depth=2, gradual_unfreeze=1),
    }
    for reason, changes in cases.items():
        plan = plan_for(tiny_vit, augment="none", **changes)
        assert not plan.feature_cache_val and f"frozen-feature cache: off ({reason})" in plan.reasons
    off = plan_for(tiny_vit, EngineOptions(feature_cache=False, decode_cache=False), freeze_depth=1, augment="none")
    assert not (off.feature_cache_val or off.decode_cache)
    assert {"frozen-feature cache: off (the engine option is off)",
            "decode cache: off (the engine option is off)"} <= set(off.reasons)
    distill = plan_for(tiny_vit, freeze_depth=1, augment="none", distill_weight=1.0)
    assert "frozen-feature cache: validation only (distillation runs the teacher on the pixels)" in distill.reasons


def test_plan_attention_choice(tiny_vit):
    assert plan_for(tiny_vit, attention="eager").attention_reason == "attention: eager (as requested)"
    auto = plan_for(tiny_vit, freeze_depth=1, augment="basic")
    assert auto.attention_trial and auto.attention is None and auto.attention_reason.startswith("attention: auto")
    assert "alternate sdpa and vitft_eager" in auto.attention_reason
    resumed = plan_for(tiny_vit, resumed="eager")
    assert resumed.attention == "eager" and not resumed.attention_trial
    assert resumed.attention_reason == "attention: eager (chosen when the run started)"
    probe = plan_for(tiny_vit, freeze_depth=2, augment="none")  # every block frozen, features cached
    assert not probe.attention_trial and "linear probe on cached features" in probe.attention_reason


def test_engine_options_and_plan_are_written_to_the_run_log(tmp_path, digits_small, tiny_vit):
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=16, precision="fp32",
                         augment="none", freeze_depth=1, output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    options = EngineOptions(feature_cache=False, decode_cache_budget_bytes=0)
    result = train(config, run_dir, RunRecorder(run_dir), device="cpu", options=options)
    assert result.status == "completed"
    log = (run_dir / "train.log").read_text()
    assert options.describe() in log and "feature cache off, decode cache on (memory tier 0 MiB)" in log
    assert "frozen-feature cache: off (the engine option is off)" in log
    assert "decode cache: validation and training (no per-image randomness)" in log
    assert "frozen blocks cached" not in log


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match="decode_cache_budget_bytes must be >= 0"):
        EngineOptions(decode_cache_budget_bytes=-1)
