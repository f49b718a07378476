"""Attention kernel per run: switching, the in-loop timing trial, and how train() uses it."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from vitft_app import attention as attention_mod
from vitft_app.attention import AttentionTrial, can_switch_attention, current_attention, set_attention
from vitft_app.checkpoint import load_checkpoint
from vitft_app.config import TrainConfig
from vitft_app.events import LogMessage, RunStarted, StepLogged
from vitft_app.modeling import build_model
from vitft_app.runs import RunRecorder, RunStore
from vitft_app.training import resume_run, train


def _tiny(tiny_vit):
    return build_model(str(tiny_vit), ["a", "b"]).model.eval()


def test_switching_changes_every_layer_and_computes_the_same_logits(tiny_vit):
    model = _tiny(tiny_vit)
    assert can_switch_attention(model) and current_attention(model) == "sdpa"
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sdpa_logits = model(pixel_values=x).logits
    set_attention(model, "eager")
    assert current_attention(model) == "eager"
    # eager returns attention weights, sdpa does not: proof that the layers really switched
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True)
    assert out.attentions is not None and out.attentions[0].shape == (3, 2, 17, 17)
    torch.testing.assert_close(out.logits, sdpa_logits, atol=1e-5, rtol=1e-5)


def _grads(model, x, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(pixel_values=x, output_attentions=True)
    out.logits.float().sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_vitft_eager_computes_transformers_eager_attention_and_its_gradients(tiny_vit):
    # the kernel `auto` may pick must compute what the library's eager kernel computes: exactly
    # (to float32 rounding) in fp32, and to bf16 rounding under autocast
    model = build_model(str(tiny_vit), ["a", "b"]).model.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    results = {}
    for kernel in ("eager", "vitft_eager"):
        set_attention(model, kernel)
        results[kernel] = (_grads(model, x, autocast=False), _grads(model, x, autocast=True))
    (eager32, eager_grads32), (eager16, eager_grads16) = results["eager"]
    (ours32, ours_grads32), (ours16, ours_grads16) = results["vitft_eager"]
    torch.testing.assert_close(ours32.logits, eager32.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours32.attentions[0], eager32.attentions[0], atol=1e-6, rtol=1e-5)
    for name, grad in eager_grads32.items():
        torch.testing.assert_close(ours_grads32[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # bf16: the probabilities come out in bf16 from both kernels; logits and gradients agree to
    # bf16 precision (8 bits of mantissa)
    assert ours16.attentions[0].dtype == eager16.attentions[0].dtype == torch.bfloat16
    torch.testing.assert_close(ours16.logits.float(), eager16.logits.float(), atol=3e-2, rtol=3e-2)
    # (over all weights at once: some, such as the key bias, have a gradient of zero in exact
    # arithmetic, so their own relative error is rounding noise over noise)
    ours_flat = torch.cat([ours_grads16[name].flatten() for name in eager_grads16])
    eager_flat = torch.cat([grad.flatten() for grad in eager_grads16.values()])
    assert (ours_flat - eager_flat).norm() / eager_flat.norm() < 0.02


def test_vitft_eager_masks_and_hands_what_it_does_not_implement_to_sdpa():
    from vitft_app.attention import vitft_eager_attention

    class Layer(torch.nn.Module):
        is_causal = False

    layer = Layer().eval()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[..., -1] = False  # nobody attends to the last token
    out, probs = vitft_eager_attention(layer, q, k, v, keep)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, reference.transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert probs[..., -1].abs().max() == 0
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(vitft_eager_attention(layer, q, k, v, additive)[0], out, atol=1e-6, rtol=1e-6)
    # a causal layer without an explicit mask goes to transformers' SDPA kernel (no probabilities)
    layer.is_causal = True
    out, probs = vitft_eager_attention(layer, q, k, v, None)
    assert probs is None
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                               .transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_a_model_that_cannot_switch_is_detected_and_forcing_it_is_refused():
    class Plain(torch.nn.Module):
        config = type("Config", (), {"_attn_implementation": "sdpa"})()

    assert not can_switch_attention(Plain())
    with pytest.raises(ValueError, match="cannot switch"):
        set_attention(Plain(), "eager")


def _run_trial(model, durations: dict[str, list[float]], monkeypatch,
               valid: list[bool] | None = None) -> tuple[AttentionTrial, list[str]]:
    """Drives a trial with fake clocks: each micro-batch of kernel K takes the next of durations[K];
    the n-th micro-batch is comparable when valid[n] (default: all)."""
    clock = [0.0]
    monkeypatch.setattr(attention_mod.time, "perf_counter", lambda: clock[0])
    trial = AttentionTrial(model, torch.device("cpu"))
    kernels = []
    queues = {k: list(v) for k, v in durations.items()}
    while not trial.done:
        trial.begin()
        kernels.append(current_attention(model))  # the model really runs this kernel
        clock[0] += queues[kernels[-1]].pop(0)
        trial.end(valid=True if valid is None else valid[len(kernels) - 1])
    return trial, kernels


@pytest.mark.parametrize("eager_s, expected",
                         [(0.5, "vitft_eager"), (0.93, "vitft_eager"), (0.97, "sdpa"), (1.5, "sdpa")])
def test_trial_alternates_times_and_keeps_sdpa_unless_vitft_eager_is_clearly_faster(tiny_vit, monkeypatch, eager_s,
                                                                                      expected):
    model = _tiny(tiny_vit)
    # warmup round is slow for both and must be ignored; one interrupted vitft_eager micro-batch too
    trial, kernels = _run_trial(model, {"sdpa": [9.0, 1.0, 1.1, 1.0], "vitft_eager": [9.0, eager_s, 7.0, eager_s]},
                                monkeypatch)
    assert kernels == ["sdpa", "vitft_eager"] * 4
    assert trial.best() == pytest.approx({"sdpa": 1.0, "vitft_eager": eager_s})
    assert trial.decide() == expected == current_attention(model)
    assert "sdpa 1000 ms" in trial.describe()


def test_a_micro_batch_without_images_advances_the_schedule_but_is_not_timed(tiny_vit, monkeypatch):
    model = _tiny(tiny_vit)
    # a data-parallel run's trial: one schedule in every process, nothing redone
    trial = AttentionTrial(model, torch.device("cpu"), warmup=0, repeats=1, redo_invalid=False)
    trial.begin()
    trial.end(valid=False)  # sdpa slot: every file of the batch failed
    trial.begin()
    assert trial.end() and trial.done
    assert set(trial.best()) == {"vitft_eager"}
    assert not trial.alternative_is_faster() and trial.decide() == "sdpa"  # one kernel untimed: keep the default


def test_an_uncomparable_micro_batch_is_redone_with_its_kernel_so_each_kernel_gets_its_timings(tiny_vit,
                                                                                               monkeypatch):
    model = _tiny(tiny_vit)
    seconds = {"sdpa": [1.0] * 20, "vitft_eager": [1.0] * 20}
    # the 4th micro-batch (a timed vitft_eager slot) is an epoch's short last one: redone at the end
    trial, kernels = _run_trial(model, seconds, monkeypatch, [True, True, True, False] + [True] * 10)
    assert kernels == ["sdpa", "vitft_eager"] * 4 + ["vitft_eager"]
    assert {k: len(v) for k, v in trial.seconds.items()} == {"sdpa": 3, "vitft_eager": 3}
    # a warmup micro-batch is not redone (it is never timed)
    assert _run_trial(model, seconds, monkeypatch, [False] + [True] * 10)[1] == ["sdpa", "vitft_eager"] * 4
    # nothing comparable at all (every micro-batch short: a dataset smaller than the batch): the
    # trial still ends, after `repeats` redone micro-batches, and keeps the default
    trial, kernels = _run_trial(model, seconds, monkeypatch, [False] * 20)
    assert len(kernels) == 8 + 3
    assert trial.best() == {} and trial.decide() == "sdpa"


def test_train_times_the_first_micro_batches_keeps_the_kernel_on_resume_and_saves_a_default_model(
    tmp_path, digits_small, tiny_vit, monkeypatch
):
    from transformers import AutoModelForImageClassification

    # vitft_eager measured clearly faster: the run switches to it after 8 micro-batches and says so
    monkeypatch.setattr(AttentionTrial, "alternative_is_faster", lambda self: True)
    used: list[str] = []
    original_begin = AttentionTrial.begin

    def recording_begin(self):
        original_begin(self)
        used.append(current_attention(self.model))

    monkeypatch.setattr(AttentionTrial, "begin", recording_begin)
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=2, batch_size=4, precision="fp32",
                         log_every_steps=1, output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    recorder = RunRecorder(run_dir)
    events, stop = [], threading.Event()

    def on_event(event):
        events.append(event)
        recorder(event)
        if isinstance(event, StepLogged) and event.step == 10:
            stop.set()

    result = train(config, run_dir, on_event, stop_event=stop, device="cpu")
    assert result.status == "stopped"
    assert used == ["sdpa", "vitft_eager"] * 4  # only the first 8 micro-batches are part of the trial
    notes = next(e for e in events if isinstance(e, RunStarted)).notes
    assert any(n.startswith("attention: auto (the first 8 micro-batches") for n in notes), notes
    kept = [e.text for e in events if isinstance(e, LogMessage) and e.text.startswith("attention:")]
    assert len(kept) == 1 and kept[0].startswith("attention: vitft_eager kept (best forward + backward")
    assert load_checkpoint(run_dir)["loop"]["attention"] == "vitft_eager"

    # the resumed run keeps vitft_eager without a new trial
    used.clear()
    resumed = []
    recorder = RunRecorder(run_dir)
    assert resume_run(run_dir, lambda e: (resumed.append(e), recorder(e)), device="cpu").status == "completed"
    assert used == []
    assert "attention: vitft_eager (chosen when the run started)" in next(e for e in resumed if isinstance(e, RunStarted)).notes

    # the saved model loads with the library's default kernel
    assert AutoModelForImageClassification.from_pretrained(run_dir / "model").config._attn_implementation == "sdpa"


def test_forced_kernel_is_used_from_the_first_step(tmp_path, digits_small, tiny_vit):
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=2, batch_size=8, precision="fp32",
                         attention="eager", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    assert train(config, run_dir, events.append, device="cpu").status == "completed"
    assert "attention: eager (as requested)" in next(e for e in events if isinstance(e, RunStarted)).notes
    # the run's time line (vitft_app.run_timing) names every phase it went through, before RunFinished
    timing = [e.text for e in events if isinstance(e, LogMessage) and e.text.startswith("time: ")]
    assert len(timing) == 1 and type(events[-1]).__name__ == "RunFinished", timing
    for phase in ("set-up", "training first epoch", "training later epochs", "validation", "saving best model",
                  "checkpoints"):
        assert f"{phase} " in timing[0], timing
    assert not any(isinstance(e, LogMessage) and e.text.startswith("attention:") for e in events)


def test_config_refuses_an_unknown_kernel(tmp_path):
    with pytest.raises(ValueError, match="attention must be one of"):
        TrainConfig(data_dir=str(tmp_path), attention="flash")


def test_a_one_epoch_run_shorter_than_the_trial_decides_at_its_end_with_what_was_timed(
    tmp_path, digits_small, tiny_vit
):
    # 48 training images at batch 16: 3 micro-batches per epoch; the first pair is the warmup, so
    # one sdpa time is all the trial gets in the only epoch: the default is kept and the log says
    # why, at the end of the epoch (before its evaluation).
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=16, precision="fp32",
                         augment="none", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    assert train(config, run_dir, events.append, device="cpu").status == "completed"
    kept = [e.text for e in events if isinstance(e, LogMessage) and e.text.startswith("attention:")]
    assert len(kept) == 1 and kept[0].startswith(
        "attention: sdpa kept (too few full micro-batches to compare the kernels (timed: sdpa "), kept
    first_eval = next(i for i, e in enumerate(events) if type(e).__name__ == "EvalDone")
    assert events.index(next(e for e in events if isinstance(e, LogMessage) and e.text in kept)) < first_eval


def test_the_trial_goes_on_into_the_next_epoch_when_an_epoch_is_shorter_than_it(tmp_path, digits_small, tiny_vit,
                                                                               monkeypatch):
    # 3 micro-batches per epoch: the 8 of the trial end in epoch 3, after two evaluations, with
    # three timings of each kernel
    trials: list[AttentionTrial] = []
    original_init = AttentionTrial.__init__
    monkeypatch.setattr(AttentionTrial, "__init__",
                        lambda self, *a, **k: (trials.append(self), original_init(self, *a, **k))[1])
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=3, batch_size=16, precision="fp32",
                         augment="none", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    assert train(config, run_dir, events.append, device="cpu").status == "completed"
    kept = [i for i, e in enumerate(events) if isinstance(e, LogMessage) and e.text.startswith("attention:")]
    evals = [i for i, e in enumerate(events) if type(e).__name__ == "EvalDone"]
    assert len(kept) == 1 and evals[1] < kept[0] < evals[2], (kept, evals)
    assert events[kept[0]].text.split(" (")[1].startswith("best forward + backward per full micro-batch")
    trial = trials[-1]  # the plan builds one first, only to read the schedule's length
    assert {k: len(v) for k, v in trial.seconds.items()} == {"sdpa": 3, "vitft_eager": 3}


def test_a_cached_linear_probe_has_no_attention_to_time(tmp_path, digits_small, tiny_vit):
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=8, precision="fp32",
                         augment="none", freeze_depth=2, output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    assert train(config, run_dir, events.append, device="cpu").status == "completed"
    notes = next(e for e in events if isinstance(e, RunStarted)).notes
    assert any("linear probe on cached features" in n for n in notes), notes
    assert not any(isinstance(e, LogMessage) and e.text.startswith("attention:") for e in events)


def test_an_epochs_short_last_micro_batch_is_not_compared(tmp_path, digits_small, tiny_vit, monkeypatch):
    # 48 images at batch 20: 20, 20, 8. The 8-image micro-batch (a vitft_eager slot) would look 2.5x
    # faster; it must not be recorded.
    recorded: list[bool] = []
    original_end = AttentionTrial.end
    monkeypatch.setattr(AttentionTrial, "end", lambda self, valid=True: (recorded.append(valid),
                                                                        original_end(self, valid))[1])
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=3, batch_size=20, precision="fp32",
                         augment="none", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    assert train(config, run_dir, lambda e: None, device="cpu").status == "completed"
    assert recorded[:3] == [True, True, False]  # the schedule advances past the short batch, untimed



def test_validation_runs_sdpa_and_training_goes_back_to_its_kernel(tmp_path, digits_small, tiny_vit, monkeypatch):
    from vitft_app import training
    from vitft_app.attention import evaluation_attention

    model = _tiny(tiny_vit)
    set_attention(model, "vitft_eager")
    with pytest.raises(RuntimeError, match="boom"), evaluation_attention(model):
        assert current_attention(model) == "sdpa"
        raise RuntimeError("boom")
    assert current_attention(model) == "vitft_eager"  # restored on every exit path

    # a run that trains with vitft_eager: each validation sees SDPA, and the model is back on
    # vitft_eager after it
    seen: list[tuple[str, torch.nn.Module]] = []
    original_evaluate = training.loop.evaluate  # the loop's validation (vitft_app/training/loop.py)

    def recording_evaluate(model, *args, **kwargs):
        seen.append((current_attention(model), model))
        return original_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(training.loop, "evaluate", recording_evaluate)
    monkeypatch.setattr(AttentionTrial, "alternative_is_faster", lambda self: True)  # the trial keeps vitft_eager
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=2, batch_size=8, precision="fp32",
                         augment="none", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    events = []
    assert train(config, run_dir, events.append, device="cpu").status == "completed"
    assert any(isinstance(e, LogMessage) and e.text.startswith("attention: vitft_eager kept") for e in events)
    assert [kernel for kernel, _ in seen] == ["sdpa", "sdpa"]
    assert current_attention(seen[-1][1]) == "vitft_eager"
    # a forced kernel is what the user asked for: validation uses it too
    seen.clear()
    forced = TrainConfig(**{**config.to_dict(), "attention": "eager", "epochs": 1})
    assert train(forced, RunStore(config.output_dir).create_run(forced), lambda e: None, device="cpu").status == "completed"
    assert [kernel for kernel, _ in seen] == ["eager"]
    # the run's time line (vitft_app.run_timing) names every phase it went through, before RunFinished
    timing = [e.text for e in events if isinstance(e, LogMessage) and e.text.startswith("time: ")]
    assert len(timing) == 1 and type(events[-1]).__name__ == "RunFinished", timing
    for phase in ("set-up", "training first epoch", "training later epochs", "validation", "saving best model",
                  "checkpoints"):
        assert f"{phase} " in timing[0], timing


def test_a_trials_decision_is_remembered_for_the_same_shape_and_measured_again_otherwise(
    tmp_path, digits_small, tiny_vit, monkeypatch
):
    from vitft_app.attention import MEMORY_DAYS, TRIAL_VERSION, memory_file, recall
    from vitft_app.training import EngineOptions

    monkeypatch.setattr(AttentionTrial, "alternative_is_faster", lambda self: True)
    trials: list[int] = []
    original_init = AttentionTrial.__init__
    monkeypatch.setattr(AttentionTrial, "__init__", lambda self, *a, **k: (trials.append(1), original_init(self, *a, **k))[1])
    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=8, precision="fp32",
                         augment="none", output_dir=str(tmp_path / "runs"))

    def run(config, options=None):
        trials.clear()
        events = []
        assert train(config, RunStore(config.output_dir).create_run(config), events.append, device="cpu",
                     options=options).status == "completed"
        notes = next(e for e in events if isinstance(e, RunStarted)).notes
        return next(n for n in notes if n.startswith("attention:")), events, notes

    # 1. no memory: the trial runs, keeps vitft_eager, and the decision is written (JSON data)
    line, events, _ = run(config)
    assert line.startswith("attention: auto (the first 8 micro-batches") and trials
    assert any(isinstance(e, LogMessage) and e.text.startswith("attention: vitft_eager kept") for e in events)
    data = json.loads(memory_file().read_text())
    (key, entry), = data["entries"].items()
    assert entry["kernel"] == "vitft_eager" and set(entry["best_ms"]) == {"sdpa", "vitft_eager"}
    assert json.loads(key)["batch_size"] == 8 and json.loads(key)["precision"] == "fp32"
    assert json.loads(key)["trial"] == TRIAL_VERSION  # a decision of an older trial is measured again

    # 2. the same shape again: no trial, the remembered kernel from the first step, and the log says so
    line, events, _ = run(config)
    assert trials == []  # no AttentionTrial was even built
    assert not any(isinstance(e, LogMessage) and e.text.startswith("attention: vitft_eager kept") for e in events)
    assert line.startswith("attention: vitft_eager (this machine's trial of ") and "sdpa " in line, line
    assert f"measured again after {MEMORY_DAYS} days" in line

    # 3. another micro-batch size is another shape: a new trial
    line, _, _ = run(TrainConfig(**{**config.to_dict(), "batch_size": 6}))
    assert line.startswith("attention: auto")
    assert len(json.loads(memory_file().read_text())["entries"]) == 2

    # 4. a decision older than MEMORY_DAYS, or a damaged file, means a new trial (never an error)
    assert recall(key, now=entry["measured"] + (MEMORY_DAYS + 1) * 86400) is None
    memory_file().write_text("{not json")
    line, _, _ = run(config)
    assert line.startswith("attention: auto")
    assert len(json.loads(memory_file().read_text())["entries"]) == 1  # rewritten

    # 5. the engine option off: always a trial, nothing read
    line, _, notes = run(config, EngineOptions(attention_memory=False))
    assert line.startswith("attention: auto") and trials
    assert any("attention memory off" in n for n in notes), notes
