"""The default-model rule (Hub reachable / cached / offline, mocked at the socket), the catalogue
data, FLOP counts and the epoch-time estimate."""

from __future__ import annotations

import socket

import pytest

from vitft_app import model_catalog as mc
from vitft_app.config import SCRATCH_MODEL
from vitft_app.modeling import CURATED_MODELS

DEIT_TINY = "facebook/deit-tiny-patch16-224"
DEIT_SMALL = "facebook/deit-small-patch16-224"
VIT_BASE = "google/vit-base-patch16-224"


def fake_cache(root, model_id: str, files=("config.json", "model.safetensors")):
    """Writes the Hugging Face hub cache layout (refs/main -> snapshots/<commit>/<file>) for a model."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + model_id.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")
    return root


class _Connection:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def network(monkeypatch):
    """Controls the one network call (socket.create_connection); records the calls."""
    state = {"reachable": False, "calls": 0}

    def connect(address, timeout=None):
        state["calls"] += 1
        if state["reachable"]:
            return _Connection()
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", connect)
    return state


def test_rule_reachable_picks_the_device_model():
    assert mc.default_model("cpu", True, []) == DEIT_TINY
    assert mc.default_model("mps", True, []) == DEIT_TINY
    assert mc.default_model("cuda:0", True, []) == VIT_BASE


def test_rule_offline_uses_the_cache_then_scratch():
    assert mc.default_model("cpu", False, [DEIT_SMALL]) == DEIT_SMALL
    assert mc.default_model("cpu", False, [VIT_BASE, DEIT_TINY]) == DEIT_TINY  # the device's preference order
    assert mc.default_model("cuda", False, [DEIT_TINY]) == DEIT_TINY
    assert mc.default_model("cpu", False, []) == mc.RECOMMENDED_SCRATCH_MODEL
    assert mc.default_model_note(mc.RECOMMENDED_SCRATCH_MODEL) == mc.SCRATCH_NOTE
    assert mc.default_model_note(DEIT_TINY) == ""


def test_resolve_reachable(network, tmp_path):
    network["reachable"] = True
    assert mc.resolve_default_model("cpu", cache_dir=tmp_path) == (DEIT_TINY, "")
    assert network["calls"] == 1


def test_resolve_offline_nothing_cached(network, tmp_path):
    model, note = mc.resolve_default_model("cpu", cache_dir=tmp_path)
    assert model == mc.RECOMMENDED_SCRATCH_MODEL == "pvt-v2-b0-scratch"
    assert note.startswith("random weights: expect low accuracy on small datasets")
    assert network["calls"] == 1


def test_resolve_offline_with_a_cached_checkpoint(network, tmp_path):
    fake_cache(tmp_path, DEIT_SMALL)
    assert mc.resolve_default_model("cpu", cache_dir=tmp_path) == (DEIT_SMALL, "")
    assert network["calls"] == 1  # deit-tiny (the first choice) is not cached: the Hub was asked


def test_resolve_first_choice_cached_skips_the_network(network, tmp_path):
    fake_cache(tmp_path, DEIT_TINY)
    assert mc.resolve_default_model("cpu", cache_dir=tmp_path) == (DEIT_TINY, "")
    assert network["calls"] == 0


def test_a_config_without_weights_is_not_cached(tmp_path):
    fake_cache(tmp_path, DEIT_TINY, files=("config.json",))
    assert not mc.is_cached(DEIT_TINY, tmp_path)
    assert mc.cached_models(tmp_path) == []


def test_hub_offline_env_counts_as_unreachable(network, monkeypatch):
    network["reachable"] = True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert mc.hub_reachable() is False
    assert network["calls"] == 0


def test_catalog_covers_every_picker_choice():
    for model_id in (SCRATCH_MODEL, *CURATED_MODELS):
        entry = mc.CATALOG[model_id]
        assert entry.params_millions > 0 and entry.pretrained_on
    for order in mc.PREFERRED_DEFAULTS.values():
        assert set(order) <= set(mc.CATALOG)


def _analytic_vit_flops(d: int, m: int, layers: int, patch: int = 16, size: int = 224, labels: int = 2) -> float:
    """2 x multiply-adds of a ViT forward (patch embedding, L blocks, head)."""
    patches = (size // patch) ** 2
    tokens = patches + 1
    block = 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * m
    return 2 * (layers * block + patches * 3 * patch * patch * d + d * labels)


@pytest.mark.parametrize("model_id,shape", [(DEIT_TINY, (192, 768, 12)), (VIT_BASE, (768, 3072, 12))])
def test_flops_match_the_analytic_vit_count(model_id, shape):
    flops = mc.forward_flops_per_image(mc.model_config_for(model_id))
    assert flops == pytest.approx(_analytic_vit_flops(*shape), rel=1e-3)


def test_estimate_arithmetic_and_errors():
    # 3 x 2 GFLOP x 100 images at 10 GFLOP/s x 0.5 efficiency = 120 s
    assert mc.estimate_epoch_seconds(2e9, 100, 1e10, efficiency=0.5) == pytest.approx(120.0)
    with pytest.raises(ValueError, match="positive"):
        mc.estimate_epoch_seconds(2e9, 100, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        mc.estimate_epoch_seconds(2e9, -1, 1e10)


def test_matmul_probe_is_measured_once():
    mc.matmul_flops_per_second.cache_clear()
    first = mc.matmul_flops_per_second("cpu")
    assert first > 1e6
    assert mc.matmul_flops_per_second("cpu") == first
    assert mc.matmul_flops_per_second.cache_info().hits == 1


def test_describe_catalogue_and_saved_models(tiny_vit):
    info = mc.describe_model(DEIT_TINY, 200, device="cpu")
    assert info.params_millions == 5.7 and "ImageNet-1k" in info.pretrained_on
    expected = mc.estimate_epoch_seconds(mc.forward_flops_per_image(mc.model_config_for(DEIT_TINY)), 200,
                                         mc.matmul_flops_per_second("cpu"))
    assert info.epoch_seconds == pytest.approx(expected)
    text = info.markdown()
    assert "5.7M parameters" in text and "estimate" in text and "per epoch" in text

    saved = mc.describe_model(str(tiny_vit), None, device="cpu")
    from transformers import ViTForImageClassification

    real = sum(p.numel() for p in ViTForImageClassification.from_pretrained(tiny_vit).parameters())
    assert saved.params_millions == pytest.approx(real / 1e6)
    assert saved.epoch_seconds is None and "per epoch" not in saved.markdown()
    assert "a saved model" in saved.markdown()

    scratch = mc.describe_model(SCRATCH_MODEL, 50, image_size=64, device="cpu")
    assert scratch.pretrained_on.startswith("nothing")
    assert scratch.forward_gflops < mc.describe_model(SCRATCH_MODEL, 50, image_size=224, device="cpu").forward_gflops


def test_train_tab_info_line(digits_small, tiny_vit):
    """The Train tab's handler: estimate for the chosen dataset, the scratch note, no traceback."""
    from vitft_app.data import scan_dataset
    from vitft_app.ui.app import AppSettings
    from vitft_app.ui.train_tab import catalog_info

    settings = AppSettings(data_root=digits_small.parent, runs_dir=digits_small.parent / "runs",
                           example_dir=digits_small, device="cpu", confined=False)
    text = catalog_info(SCRATCH_MODEL, 32, str(digits_small), settings)
    num_train = len(scan_dataset(digits_small).train)
    info = mc.describe_model(SCRATCH_MODEL, num_train, image_size=32, device="cpu")
    assert text.startswith(info.markdown())
    assert "Random weights: expect low accuracy on small datasets" in text and "estimate" in text
    assert "Random weights" not in catalog_info(str(tiny_vit), None, str(digits_small), settings)
    assert "per epoch" not in catalog_info(SCRATCH_MODEL, 32, "/no/such/folder", settings)
    assert catalog_info("no-such-org/no-such-model-offline", None, "", settings).startswith("_No size")
