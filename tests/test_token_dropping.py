"""PatchDropout (token dropping during training): the token subset, the hook, and train()."""

from __future__ import annotations

import pytest
import torch

from vitft_app import training
from vitft_app.augment import PatchDropout, drop_patch_tokens
from vitft_app.config import TrainConfig
from vitft_app.events import RunStarted
from vitft_app.modeling import build_model, encoder_parts
from vitft_app.runs import RunRecorder, RunStore


def test_drop_patch_tokens_keeps_cls_and_a_distinct_random_subset_per_image():
    torch.manual_seed(0)
    b, n, d = 4, 16, 8
    tokens = torch.arange(b * (1 + n) * d, dtype=torch.float32).view(b, 1 + n, d)
    out = drop_patch_tokens(tokens, keep=6, num_prefix=1)
    assert out.shape == (b, 7, d)
    assert torch.equal(out[:, 0], tokens[:, 0])  # CLS stays first
    subsets = []
    for i in range(b):
        rows = {int(r[0].item() - tokens[i, 0, 0].item()) // d for r in out[i, 1:]}
        assert len(rows) == 6 and rows <= set(range(1, 1 + n))  # 6 distinct patch tokens of this image
        subsets.append(frozenset(rows))
    assert len(set(subsets)) > 1  # drawn independently per image


def test_hook_drops_only_inside_applied_and_the_head_still_reads_cls(tiny_vit):
    model = build_model(str(tiny_vit), ["a", "b"]).model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(pixel_values=x).logits
    dropout = PatchDropout(model, 0.5)  # 16 patches -> 8 kept
    assert dropout.num_prefix == 1 and dropout.keep_count(16) == 8
    with torch.no_grad():
        outside = model(pixel_values=x, output_hidden_states=True)
        with dropout.applied():
            inside = model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(outside.logits, before)
    assert outside.hidden_states[0].shape[1] == 17 and inside.hidden_states[0].shape[1] == 9
    assert inside.logits.shape == (2, 2) and not torch.allclose(inside.logits, before)
    assert not dropout.active
    dropout.remove()
    with torch.no_grad(), dropout.applied():
        torch.testing.assert_close(model(pixel_values=x).logits, before)


def test_a_model_without_cls_token_is_refused(tiny_vit):
    model = build_model(str(tiny_vit), ["a", "b"]).model
    encoder_parts(model)[0].cls_token = None
    with pytest.raises(ValueError, match="CLS token"):
        PatchDropout(model, 0.5)


def test_config_range():
    with pytest.raises(ValueError, match="patch_dropout must be in"):
        TrainConfig(data_dir="x", patch_dropout=1.0)


def test_train_drops_tokens_in_the_training_forward_only(tmp_path, digits_small, tiny_vit, monkeypatch):
    seen: list[tuple[bool, int]] = []  # (grad enabled, tokens entering block 0)
    original = training.setup.build_model

    def recording_build_model(*args, **kwargs):
        loaded = original(*args, **kwargs)
        block0 = encoder_parts(loaded.model)[1][0]
        block0.register_forward_pre_hook(lambda m, a: seen.append((torch.is_grad_enabled(), a[0].shape[1])))
        return loaded

    monkeypatch.setattr(training.setup, "build_model", recording_build_model)
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=8, precision="fp32",
                         patch_dropout=0.75, augment="none", freeze_depth=1, output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    recorder = RunRecorder(run_dir)
    result = training.train(config, run_dir, lambda e: (events.append(e), recorder(e)), device="cpu")
    assert result.status == "completed"
    notes = next(e for e in events if isinstance(e, RunStarted)).notes
    assert any("keeps 25% of the patch tokens" in n for n in notes)
    train_lengths = {n for grad, n in seen if grad}
    eval_lengths = {n for grad, n in seen if not grad}
    # 16 patches at 32 px / patch 8: the training forward keeps CLS + 4 tokens; validation (here
    # through the frozen-prefix feature cache's one pass over block 0) sees CLS + all 16
    assert train_lengths == {5}
    assert eval_lengths == {17}


def test_preflight_refuses_patch_dropout_for_a_model_without_cls_token(tmp_path, digits_small):
    """Refused before any run folder exists (Swin pools its tokens; it has no CLS token)."""
    from transformers import SwinConfig, SwinForImageClassification, ViTImageProcessor

    from vitft_app.training import preflight

    folder = tmp_path / "swin"
    swin = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=2,
                      num_labels=3)
    SwinForImageClassification(swin).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    config = TrainConfig(data_dir=str(digits_small), model=str(folder), patch_dropout=0.5,
                         output_dir=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="CLS token"):
        preflight(config, device="cpu")
    preflight(TrainConfig(data_dir=str(digits_small), model=str(folder), output_dir=str(tmp_path / "runs")),
              device="cpu")  # without PatchDropout the same model is fine
    assert not (tmp_path / "runs").exists()
