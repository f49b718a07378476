"""Explanations: attention rollout shape and normalization, the gradient fallback, the Predict tab."""

import numpy as np
import pytest
import torch

from vitft_app.explain import attention_rollout, explain_image
from vitft_app.predict import Predictor


def test_rollout_has_the_patch_grid_shape_and_sums_to_one():
    torch.manual_seed(0)
    tokens = 1 + 3 * 4
    attentions = tuple(torch.rand(2, 3, tokens, tokens).softmax(-1) for _ in range(4))
    maps = attention_rollout(attentions, (3, 4))
    assert maps.shape == (2, 3, 4)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(2))
    assert (maps >= 0).all()


def test_uniform_attention_gives_a_uniform_map():
    tokens = 1 + 4
    uniform = torch.full((1, 2, tokens, tokens), 1 / tokens)
    maps = attention_rollout((uniform, uniform), (2, 2))
    assert torch.allclose(maps, torch.full((1, 2, 2), 0.25))


def test_attention_to_one_patch_is_found():
    tokens = 1 + 4
    focused = torch.zeros(1, 1, tokens, tokens)
    focused[..., 3] = 1.0  # every token attends to patch 2 (token 3)
    maps = attention_rollout((focused,), (2, 2))
    assert int(maps.flatten().argmax()) == 2


def test_explain_image_on_a_vit(tiny_vit, digits_small):
    predictor = Predictor(tiny_vit, device="cpu")
    image = sorted((digits_small / "7").iterdir())[0]
    explanation = explain_image(predictor, image)
    assert explanation.method == "attention rollout"
    assert explanation.grid.shape == (4, 4)  # 32 px / patch 8
    assert explanation.grid.sum() == pytest.approx(1.0, abs=1e-5)
    assert explanation.overlay.size == (32, 32) and explanation.overlay.mode == "RGB"
    assert predictor.model.config._attn_implementation != "eager"  # switched back afterwards
    assert explanation.label == predictor.predict([image], top_k=1)[0].labels[0]


def test_gradient_fallback_without_patches(tiny_vit, digits_small, monkeypatch):
    from vitft_app import explain

    predictor = Predictor(tiny_vit, device="cpu")
    monkeypatch.setattr(explain, "_patch_size", lambda model: None)
    explanation = explain_image(predictor, sorted((digits_small / "0").iterdir())[0])
    assert explanation.method == "input gradient"
    assert explanation.grid.shape == (32, 32) and np.isclose(explanation.grid.sum(), 1.0, atol=1e-5)


def test_predict_tab_shows_the_explanation(tmp_path, tiny_vit, digits_small):
    from vitft_app.jobs import JobRunner
    from vitft_app.ui import predict_tab
    from vitft_app.ui.app import AppContext, AppSettings

    settings = AppSettings(data_root=tmp_path, runs_dir=tmp_path / "runs", example_dir=tmp_path, device="cpu")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    image = str(sorted((digits_small / "1").iterdir())[0])
    item = predict_tab.predict_files(ctx, str(tiny_vit), [image], 2, explain=True)[0]
    assert item["method"].startswith("attention rollout") and item["explanation"].size == (32, 32)
