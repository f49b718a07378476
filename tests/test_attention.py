"""Attention kernel per run: forcing, the timed auto choice, and how train() uses it."""

from __future__ import annotations

import threading

import pytest
import torch

from vitft_app import attention as attention_mod
from vitft_app.attention import choose_attention, current_attention, set_attention
from vitft_app.checkpoint import load_checkpoint
from vitft_app.config import TrainConfig
from vitft_app.device import resolve_device_plan
from vitft_app.events import RunStarted, StepLogged
from vitft_app.modeling import build_model
from vitft_app.runs import RunRecorder, RunStore
from vitft_app.training import resume_run, train


def _tiny(tiny_vit):
    model = build_model(str(tiny_vit), ["a", "b"]).model
    return model.eval()


def test_forced_kernel_switches_every_layer_and_computes_the_same_logits(tiny_vit):
    model = _tiny(tiny_vit)
    plan = resolve_device_plan("fp32", "cpu")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sdpa_logits = model(pixel_values=x).logits
    choice = choose_attention(model, plan, 8, (32, 32), "eager")
    assert choice.implementation == "eager" == current_attention(model)
    assert "as requested" in choice.reason and choice.seconds == {}
    # eager returns attention weights, sdpa does not: proof that the layers really switched
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True)
    assert out.attentions is not None and out.attentions[0].shape == (3, 2, 17, 17)
    torch.testing.assert_close(out.logits, sdpa_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eager_s, expected", [(0.5, "eager"), (0.95, "sdpa"), (1.5, "sdpa")])
def test_auto_keeps_sdpa_unless_eager_is_clearly_faster(tiny_vit, monkeypatch, eager_s, expected):
    timings = {"sdpa": 1.0, "eager": eager_s}
    monkeypatch.setattr(attention_mod, "_block_seconds", lambda block, hidden, plan, name: timings[name])
    model = _tiny(tiny_vit)
    choice = choose_attention(model, resolve_device_plan("fp32", "cpu"), 32, (32, 32))
    assert choice.implementation == expected == current_attention(model)
    assert choice.seconds == timings and "17 tokens" in choice.reason


def test_auto_probe_really_times_both_kernels_and_leaves_weights_and_rng_alone(tiny_vit):
    model = _tiny(tiny_vit)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    choice = choose_attention(model, resolve_device_plan("bf16", "cpu"), 64, (32, 32))
    assert torch.equal(torch.rand(4), expected_next)  # the probe drew nothing from the global RNG
    assert set(choice.seconds) == {"sdpa", "eager"} and all(s > 0 for s in choice.seconds.values())
    assert choice.implementation in ("sdpa", "eager")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_model_that_cannot_switch_keeps_its_kernel_and_forcing_it_is_refused():
    class Plain(torch.nn.Module):
        config = type("Config", (), {"_attn_implementation": "sdpa"})()

    plan = resolve_device_plan("fp32", "cpu")
    assert choose_attention(Plain(), plan, 8, (32, 32)).implementation == "sdpa"
    with pytest.raises(ValueError, match="cannot switch"):
        set_attention(Plain(), "eager")


def test_config_refuses_an_unknown_kernel(tmp_path):
    with pytest.raises(ValueError, match="attention must be one of"):
        TrainConfig(data_dir=str(tmp_path), attention="flash")


def test_train_uses_the_kernel_reports_it_keeps_it_on_resume_and_saves_a_default_model(
    tmp_path, digits_small, tiny_vit, monkeypatch
):
    from transformers import AutoModelForImageClassification

    # auto with eager measured faster: the run trains with eager and says why
    monkeypatch.setattr(attention_mod, "_block_seconds", lambda b, h, p, name: {"sdpa": 1.0, "eager": 0.5}[name])
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=2, batch_size=8, precision="fp32",
                         log_every_steps=1, output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    recorder = RunRecorder(run_dir)
    events, stop = [], threading.Event()

    def on_event(event):
        events.append(event)
        recorder(event)
        if isinstance(event, StepLogged) and event.step == 2:
            stop.set()

    result = train(config, run_dir, on_event, stop_event=stop, device="cpu")
    assert result.status == "stopped"
    started = next(e for e in events if isinstance(e, RunStarted))
    assert any(n.startswith("attention: eager (auto;") for n in started.notes), started.notes
    assert load_checkpoint(run_dir)["loop"]["attention"] == "eager"

    # the resumed run keeps eager without timing again, even if sdpa would now win
    monkeypatch.setattr(attention_mod, "_block_seconds", lambda b, h, p, name: {"sdpa": 0.1, "eager": 1.0}[name])
    resumed = []
    recorder = RunRecorder(run_dir)
    assert resume_run(run_dir, lambda e: (resumed.append(e), recorder(e)), device="cpu").status == "completed"
    notes = next(e for e in resumed if isinstance(e, RunStarted)).notes
    assert "attention: eager (chosen when the run started)" in notes

    # the saved model loads with the library's default kernel
    saved = AutoModelForImageClassification.from_pretrained(run_dir / "model")
    assert saved.config._attn_implementation == "sdpa"
