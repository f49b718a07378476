"""LoRA fine-tuning (peft) through the real loop: a tiny ViT saved to tmp_path, real digits."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_vit
from vitft_app.checkpoint import load_checkpoint
from vitft_app.config import TrainConfig
from vitft_app.events import RunStarted, StepLogged
from vitft_app.lora import ADAPTER_DIR, count_lora_parameters, meta_model, resolve_lora_targets
from vitft_app.modeling import build_model
from vitft_app.runs import RunRecorder, RunStore
from vitft_app.training import preflight, resume_run, train


def lora_config(data, model, tmp_path, **changes) -> TrainConfig:
    values = dict(data_dir=str(data), model=str(model), epochs=2, batch_size=8, lr=3e-3, warmup_ratio=0.0,
                  augment="none", precision="fp32", log_every_steps=1, output_dir=str(tmp_path / "runs"),
                  lora_rank=4, lora_alpha=8, attention="sdpa")  # runs compared for exactness: one kernel (test_recipe)
    values.update(changes)
    return TrainConfig(**values)


def run_train(config, stop_event=None, on_event=None):
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    recorder = RunRecorder(run_dir)

    def emit(event):
        events.append(event)
        recorder(event)
        if on_event is not None:
            on_event(event)

    return run_dir, events, train(config, run_dir, emit, stop_event=stop_event, device="cpu")


@pytest.fixture(scope="module")
def start_vit(tmp_path_factory) -> Path:
    """The starting checkpoint: a tiny ViT with 4 blocks (so freeze depth can leave some unfrozen)."""
    return save_tiny_vit(tmp_path_factory.mktemp("lora-start"), layers=4)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, digits_root, start_vit):
    """A LoRA rank-4 run on 3 real digit classes, plus the starting weights to compare with."""
    tmp_path = tmp_path_factory.mktemp("lora-run")
    data = tmp_path / "digits3"
    for name in ("0", "1", "7"):
        (data / name).mkdir(parents=True)
        for path in sorted((digits_root / name).iterdir())[:20]:
            (data / name / path.name).write_bytes(path.read_bytes())
    config = lora_config(data, start_vit, tmp_path)
    run_dir, events, result = run_train(config)
    return config, run_dir, events, result


def _param_names_that_changed(run_dir: Path, config: TrainConfig) -> tuple[set[str], set[str]]:
    """Names of the saved (merged) model's weights that differ from the starting weights, and the
    names of all its weights (the head is re-initialized from the seed as in the run)."""
    torch.manual_seed(config.seed)
    start = build_model(config.model, ["0", "1", "7"]).model.state_dict()
    from transformers import AutoModelForImageClassification

    trained = AutoModelForImageClassification.from_pretrained(run_dir / "model").state_dict()
    changed = {name for name, value in trained.items() if not torch.equal(value, start[name])}
    return changed, set(trained)


def test_only_the_adapted_projections_and_the_head_change(lora_run):
    config, run_dir, events, result = lora_run
    assert result.status == "completed"
    changed, names = _param_names_that_changed(run_dir, config)
    # The merged model has the plain ViT layout (no lora_ / modules_to_save names).
    assert not any("lora" in n or "modules_to_save" in n or "original_module" in n for n in names)
    adapted = {n for n in changed if not n.startswith("classifier.")}
    assert {"classifier.weight", "classifier.bias"} <= changed
    # LoRA changes only the weights of the query and value projections (bias="none"), in every block.
    assert adapted, "the adapters were merged into the projections"
    for name in adapted:
        assert name.endswith(("q_proj.weight", "v_proj.weight", "query.weight", "value.weight")), name
    assert len(adapted) == 2 * 4
    started = next(e for e in events if isinstance(e, RunStarted))
    assert any(note.startswith("LoRA rank 4, alpha 8") for note in started.notes), started.notes
    # trainable: 4 blocks x 2 projections x r (32 + 32) + head (32 x 3 + 3)
    assert started.trainable_params == 4 * 2 * 4 * 64 + 99


def test_trainable_parameters_are_only_lora_and_head(start_vit):
    from vitft_app.lora import apply_lora

    torch.manual_seed(0)
    model = build_model(str(start_vit), ["a", "b", "c"]).model
    setup = apply_lora(model, rank=4, alpha=8, targets=None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n or "classifier.modules_to_save" in n for n in trainable)
    assert sum("classifier.modules_to_save" in n for n in trainable) == 2
    # the analytic count (used by preflight and the Train tab) equals what peft built
    predicted = count_lora_parameters(meta_model(str(start_vit), ["a", "b", "c"]), 4, None)
    assert predicted[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert setup.peft_model.get_nb_trainable_parameters() == predicted


def test_merged_model_reloads_with_pipeline_in_a_new_process(lora_run):
    """The run's model/ needs no peft: a fresh interpreter's pipeline() predicts the same top-1 as
    the in-process LoRA model (adapters not merged) on real images."""
    from PIL import Image

    from vitft_app.data import build_transforms

    config, run_dir, _, _ = lora_run
    images = sorted(Path(config.data_dir).rglob("*.png"))[::7][:6]
    # The in-process model: the starting model with the trained adapter loaded by peft.
    from peft import PeftModel
    from transformers import AutoImageProcessor

    torch.manual_seed(config.seed)
    base = build_model(config.model, ["0", "1", "7"]).model
    peft_model = PeftModel.from_pretrained(base, run_dir / ADAPTER_DIR).eval()
    processor = AutoImageProcessor.from_pretrained(run_dir / "model")
    transform = build_transforms(processor, False)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        expected = [base.config.id2label[i] for i in peft_model(pixel_values=pixels).logits.argmax(-1).tolist()]

    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        "classify = pipeline('image-classification', model=sys.argv[1], device='cpu')\n"
        "print(json.dumps([classify(p)[0]['label'] for p in sys.argv[2:]]))\n"
    )
    assert "peft" not in json.loads((run_dir / "model" / "config.json").read_text()).get("architectures", [""])[0]
    out = subprocess.run([sys.executable, "-c", script, str(run_dir / "model"), *map(str, images)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_adapter_is_small_and_loads_with_peft(lora_run):
    from peft import PeftConfig

    config, run_dir, _, _ = lora_run
    adapter = run_dir / ADAPTER_DIR
    peft_config = PeftConfig.from_pretrained(adapter)
    assert peft_config.r == 4 and peft_config.lora_alpha == 8
    assert set(peft_config.modules_to_save) == {"classifier"}
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert size < (run_dir / "model" / "model.safetensors").stat().st_size / 3
    keys = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_A" in k for k in keys) and any("classifier" in k for k in keys)


def test_freeze_depth_puts_adapters_only_in_unfrozen_blocks_and_the_feature_cache_matches(
        tmp_path, digits_small, start_vit):
    """Freeze depth 2 of 4: adapters in blocks 2-3 only; the frozen-prefix feature cache (on by
    default) gives the same trained model as the uncached loop."""
    import vitft_app.training as training

    config = lora_config(digits_small, start_vit, tmp_path / "cached", freeze_depth=2, epochs=1)
    model = build_model(config.model, ["0", "1", "7"]).model
    targets = resolve_lora_targets(model, None, freeze_depth=2)
    assert len(targets) == 4 and all(".2." in t or ".3." in t for t in targets)
    cached_dir, cached_events, _ = run_train(config)
    assert any("frozen blocks cached" in getattr(e, "text", "") for e in cached_events)
    training.USE_FEATURE_CACHE = False
    try:
        plain_dir, _, _ = run_train(lora_config(digits_small, start_vit, tmp_path / "plain", freeze_depth=2, epochs=1))
    finally:
        training.USE_FEATURE_CACHE = True
    a = load_file(cached_dir / "model" / "model.safetensors")
    b = load_file(plain_dir / "model" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    changed, _ = _param_names_that_changed(cached_dir, config)
    assert all(".0." not in n and ".1." not in n for n in changed), changed


def test_lora_with_ema_and_layer_decay_resumes_exactly(tmp_path, digits_small, start_vit):
    """Stopped at step 3 and resumed: the same losses and merged weights as the uninterrupted run."""
    recipe = dict(ema_decay=0.9, layer_decay=0.8, batch_size=4, grad_accum_steps=2, augment="basic")
    full_dir, full_events, full = run_train(lora_config(digits_small, start_vit, tmp_path / "full", **recipe))
    stop = threading.Event()
    part_dir, _, part = run_train(lora_config(digits_small, start_vit, tmp_path / "part", **recipe), stop_event=stop,
                                  on_event=lambda e: isinstance(e, StepLogged) and e.step == 3 and stop.set())
    assert part.status == "stopped" and load_checkpoint(part_dir)["loop"]["step"] == 3
    resumed = []
    result = resume_run(part_dir, lambda e: (resumed.append(e), RunRecorder(part_dir)(e)), device="cpu")
    assert result.status == "completed"
    full_losses = {e.step: e.loss for e in full_events if isinstance(e, StepLogged)}
    for event in resumed:
        if isinstance(event, StepLogged):
            assert event.loss == pytest.approx(full_losses[event.step], abs=1e-5), event.step
    a = load_file(full_dir / "model" / "model.safetensors")
    b = load_file(part_dir / "model" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert (part_dir / ADAPTER_DIR / "adapter_model.safetensors").is_file()


# ---- refusals ---------------------------------------------------------------------------------------


def test_config_refuses_gradual_unfreezing_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="gradual_unfreeze does not combine with LoRA"):
        TrainConfig(data_dir="d", lora_rank=4, freeze_depth=2, gradual_unfreeze=1)
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        TrainConfig(data_dir="d", lora_rank=-1)
    with pytest.raises(ValueError, match="lora_alpha must be > 0"):
        TrainConfig(data_dir="d", lora_rank=4, lora_alpha=0)
    with pytest.raises(ValueError, match="lora_targets must be comma-separated"):
        TrainConfig(data_dir="d", lora_rank=4, lora_targets="query; rm -rf")
    assert TrainConfig(data_dir="d", lora_targets="  ").lora_targets is None  # blank = the default
    assert TrainConfig(data_dir="d", gradual_unfreeze=1, freeze_depth=2).lora_rank == 0  # off: no change


def test_preflight_refuses_unknown_targets_and_a_full_freeze(tmp_path, digits_small, start_vit):
    with pytest.raises(ValueError, match=r"lora_targets attn_out is not a linear layer.*choose from: .*fc1"):
        preflight(lora_config(digits_small, start_vit, tmp_path, lora_targets="attn_out"), device="cpu")
    with pytest.raises(ValueError, match="LoRA needs at least one unfrozen block, but freeze_depth 4 freezes all 4"):
        preflight(lora_config(digits_small, start_vit, tmp_path, freeze_depth=4), device="cpu")
    # explicit targets that exist are accepted
    preflight(lora_config(digits_small, start_vit, tmp_path, lora_targets="fc1,fc2"), device="cpu")


def test_cli_lists_the_lora_and_image_size_flags():
    out = subprocess.run([sys.executable, "-m", "vitft_app.cli", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--lora-rank", "--lora-alpha", "--lora-targets", "--image-size"):
        assert flag in out.stdout


# ---- Train tab ------------------------------------------------------------------------------------


def test_train_tab_note_counts_lora_parameters(start_vit):
    from vitft_app.ui.lora_panel import lora_note

    note = lora_note(str(start_vit), ["0", "1", "7"], 0, 4, 8, "")
    assert f"{4 * 2 * 4 * 64 + 99:,} / " in note and "LoRA rank 4" in note
    assert "LoRA off" in lora_note(str(start_vit), ["0", "1", "7"], 0, 0, 8, "")
    assert lora_note(str(start_vit), ["0", "1", "7"], 0, 4, 8, "nope").startswith("✗ lora_targets nope is not")
    assert lora_note(str(start_vit), ["0", "1", "7"], 4, 4, 8, "").startswith("✗ LoRA needs at least one unfrozen")
    assert "random weights" not in note
    assert "random weights: LoRA adapts" in lora_note("vit-tiny-scratch", ["0", "1"], 0, 4, 8, "", image_size=32)


def test_train_tab_form_builds_a_lora_config(tmp_path):
    from vitft_app.ui.train_tab import config_from_form

    config = config_from_form({"model": "vit-tiny-scratch", "lora_rank": 8.0, "lora_alpha": 16, "lora_targets": ""},
                              tmp_path)
    assert (config.lora_rank, config.lora_alpha, config.lora_targets) == (8, 16.0, None)
