import time

import pytest
import torch

from conftest import save_tiny_vit
from vitft_app.modeling import (
    ModelLoadError,
    build_model,
    count_parameters,
    encoder_parts,
    freeze_layers,
    scratch_patch_size,
    summarize_model,
)
from vitft_app.training import create_optimizer

CLASSES = ["cat", "dog", "fox"]


def test_loads_local_folder_with_dataset_labels(tiny_vit):
    loaded = build_model(str(tiny_vit), CLASSES)
    assert loaded.model.config.num_labels == 3
    assert loaded.model.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    assert loaded.model.config.label2id == {"cat": 0, "dog": 1, "fox": 2}
    assert loaded.head_reinitialized
    assert any("re-initialized" in note for note in loaded.notes)


def test_head_is_kept_when_labels_match(tmp_path):
    folder = save_tiny_vit(tmp_path / "m", labels=CLASSES)
    loaded = build_model(str(folder), CLASSES)
    assert not loaded.head_reinitialized
    from transformers import ViTForImageClassification

    original = ViTForImageClassification.from_pretrained(folder)
    assert torch.equal(loaded.model.classifier.weight, original.classifier.weight)


def test_head_is_reset_when_same_size_but_other_labels(tmp_path):
    folder = save_tiny_vit(tmp_path / "m", labels=["x", "y", "z"])
    from transformers import ViTForImageClassification

    original = ViTForImageClassification.from_pretrained(folder)
    loaded = build_model(str(folder), CLASSES)
    assert loaded.head_reinitialized
    assert not torch.equal(loaded.model.classifier.weight, original.classifier.weight)
    assert torch.count_nonzero(loaded.model.classifier.bias) == 0


def test_scratch_model_is_vit_tiny():
    loaded = build_model("vit-tiny-scratch", CLASSES, image_size=32)
    config = loaded.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (192, 12, 3)
    assert config.image_size == 32 and config.patch_size == 4
    assert loaded.processor.size == {"height": 32, "width": 32}
    assert scratch_patch_size(224) == 16 and scratch_patch_size(96) == 8


def test_image_size_off_the_patch_grid_is_refused_for_a_pretrained_checkpoint(tiny_vit):
    # Another size is allowed for a ViT checkpoint (tests/test_resolution.py), but not between patches.
    with pytest.raises(ValueError, match="multiple of the model's patch size 8, got 60"):
        build_model(str(tiny_vit), CLASSES, image_size=60)


def test_offline_hub_model_gives_clear_message_quickly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    from vitft_app import modeling

    modeling._hub_config.cache_clear()
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        build_model("google/vit-base-patch16-224", CLASSES)
    message = str(info.value)
    assert "google/vit-base-patch16-224" in message
    assert "vit-tiny-scratch" in message and "cannot be reached" in message
    assert "Traceback" not in message
    assert time.perf_counter() - start < 20  # no long retry loop


def test_unreachable_hub_is_detected_without_offline_flag(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    from vitft_app import modeling

    assert modeling._hub_reachable(timeout_s=1.0) is False


def test_a_cached_hub_checkpoint_loads_offline_without_asking_the_hub(tmp_path):
    """A checkpoint in the local Hugging Face cache loads with the Hub unreachable and without one
    request: transformers 5's AutoModel* ignored local_files_only in its PEFT-adapter lookup and
    retried the Hub 5 times (23 s) before loading (``modeling.cache_only_kwargs``)."""
    import os
    import subprocess
    import sys

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-vit"
    save_tiny_vit(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)  # the cache alone must keep the loader off the network
    script = ("from vitft_app.modeling import build_model; "
              "print(type(build_model('acme/tiny-vit', ['a', 'b']).model).__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ViTForImageClassification"
    assert "Retrying" not in result.stderr and "127.0.0.1:9" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_trainable_counts_per_freeze_depth(tiny_vit, depth):
    model = build_model(str(tiny_vit), CLASSES).model
    embeddings, blocks, norm = encoder_parts(model)
    freeze_layers(model, depth)
    trainable, total = count_parameters(model)
    frozen = 0
    if depth:
        frozen = sum(p.numel() for p in embeddings.parameters()) + sum(
            p.numel() for b in blocks[:depth] for p in b.parameters()
        )
        if depth == len(blocks):
            frozen += sum(p.numel() for p in norm.parameters())
    assert total - trainable == frozen
    if depth == len(blocks):  # linear probe: only the head trains
        head = sum(p.numel() for p in model.classifier.parameters())
        assert trainable == head


def test_freeze_depth_beyond_blocks_is_refused(tiny_vit):
    model = build_model(str(tiny_vit), CLASSES).model
    with pytest.raises(ValueError, match="between 0 and 2"):
        freeze_layers(model, 3)


def test_frozen_tensors_stay_bit_identical_under_adamw_with_weight_decay(tiny_vit):
    torch.manual_seed(0)
    model = build_model(str(tiny_vit), CLASSES).model
    freeze_layers(model, 1)
    _, blocks, _ = encoder_parts(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = blocks[1].mlp.fc1.weight.detach().clone()
    optimizer = create_optimizer(model, lr=1e-2, weight_decay=0.5)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in optimized for n, p in model.named_parameters() if not p.requires_grad)
    for _ in range(5):
        loss = model(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, parameter in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), name
    assert not torch.equal(blocks[1].mlp.fc1.weight, trained_before)


def test_no_weight_decay_on_bias_and_layernorm(tiny_vit):
    model = build_model(str(tiny_vit), CLASSES).model
    optimizer = create_optimizer(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    plain = [names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert decayed and plain
    assert not any(n.endswith("bias") or "layernorm" in n for n in decayed)
    assert any("layernorm" in n and n.endswith("weight") for n in plain)
    assert optimizer.defaults["betas"] == (0.9, 0.999)


def test_summary_on_meta_device_matches_real_counts(tiny_vit):
    for depth in (0, 1, 2):
        summary = summarize_model(str(tiny_vit), CLASSES, depth)
        model = build_model(str(tiny_vit), CLASSES).model
        freeze_layers(model, depth)
        assert (summary.trainable_params, summary.total_params) == count_parameters(model)
        assert summary.num_blocks == 2
    assert "re-initialized" in summarize_model(str(tiny_vit), CLASSES, 0).head_note
    scratch = summarize_model("vit-tiny-scratch", CLASSES, 12, image_size=32)
    assert scratch.num_blocks == 12 and scratch.trainable_params == 192 * 3 + 3
