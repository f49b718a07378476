import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vitft_app.cli import build_parser, config_from_args, flag_name
from vitft_app.config import TrainConfig

ISSUE_FLAGS = ["--data", "--model", "--freeze-depth", "--epochs", "--batch-size", "--lr", "--weight-decay",
               "--warmup-ratio", "--grad-accum-steps", "--precision", "--augment", "--image-size",
               "--val-fraction", "--seed", "--output-dir"]


def test_every_config_field_has_a_flag_and_the_documented_names_exist():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    flags = {option for action in train._actions for option in action.option_strings}
    assert {flag_name(f.name) for f in dataclasses.fields(TrainConfig)} <= flags
    assert set(ISSUE_FLAGS) <= flags


def test_flags_build_the_same_config_as_keywords():
    args = build_parser().parse_args(
        ["train", "--data", "d", "--model", "m", "--freeze-depth", "3", "--lr", "1e-4", "--precision", "fp32",
         "--augment", "none", "--image-size", "64", "--grad-accum-steps", "2"]
    )
    assert config_from_args(args) == TrainConfig(data_dir="d", model="m", freeze_depth=3, lr=1e-4,
                                                 precision="fp32", augment="none", image_size=64,
                                                 grad_accum_steps=2)


def test_invalid_choice_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--precision", "fp8"])
    assert "invalid choice" in capsys.readouterr().err


def _vitft(*args, cwd):
    """``python -m vitft_app.cli ARGS`` in a new process (the real entry point, imports and exit code)."""
    return subprocess.run([sys.executable, "-m", "vitft_app.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_train_then_predict_from_the_command_line(tmp_path, digits_small, tiny_vit):
    result = _vitft("train", "--data", str(digits_small), "--model", str(tiny_vit), "--epochs", "2",
                    "--batch-size", "16", "--lr", "3e-3", "--precision", "fp32", "--output-dir",
                    str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "model" / "config.json").exists()
    assert "epoch 2:" in result.stderr

    images = sorted((digits_small / "7").iterdir())[:2]
    predicted = _vitft("predict", "--model", str(run_dir), *map(str, images), "--top-k", "2", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    records = [json.loads(line) for line in predicted.stdout.strip().splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in images]
    for record in records:
        assert len(record["predictions"]) == 2
        assert {p["label"] for p in record["predictions"]} <= {"0", "1", "7"}
        assert 0 <= record["predictions"][1]["score"] <= record["predictions"][0]["score"] <= 1


def test_predict_reports_a_bad_image_without_crashing(tmp_path, tiny_vit, vitft_here):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    result = vitft_here("predict", "--model", str(tiny_vit), str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"image": str(bad), "error": "not an image"}


def test_train_with_a_bad_setting_prints_the_reason(tmp_path, digits_small, vitft_here):
    result = vitft_here("train", "--data", str(digits_small), "--batch-size", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "batch_size must be >= 1, got 0" in result.stderr


def test_the_entry_point_keeps_the_collector_off_the_imports_and_exits_with_mains_status(tmp_path, monkeypatch):
    # vitft_app.cli.run: collector off while the command's modules load (the preload happens after
    # the arguments are parsed), then freeze + on; freeze again before exit; main's status is the
    # exit status, a failure included
    from vitft_app import cli

    calls: list[str] = []
    for name in ("disable", "enable", "freeze"):
        monkeypatch.setattr(cli.gc, name, lambda name=name: calls.append(name))
    monkeypatch.setattr(cli, "importlib", SimpleNamespace(import_module=lambda module: calls.append(module)))
    monkeypatch.setattr(sys, "argv", ["vitft", "train", "--data", str(tmp_path / "missing")])
    monkeypatch.setattr(cli, "run_train", lambda args: calls.append(f"run_train {Path(args.data_dir).name}") or 2)
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 2
    assert calls == ["disable", "vitft_app.jobs", "freeze", "enable", "run_train missing", "freeze"]
    assert not cli._gc_paused
    # --help exits inside argparse: the collector is still turned back on, nothing is imported
    calls.clear()
    monkeypatch.setattr(sys, "argv", ["vitft", "train", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 0
    assert calls == ["disable", "freeze", "enable"]


def test_help_texts_come_from_the_config_docstrings():
    result = subprocess.run([sys.executable, "-m", "vitft_app.cli", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert "linear probe" in result.stdout and "--grad-accum-steps" in result.stdout


def test_ctrl_c_stops_cleanly_and_keeps_the_run(tmp_path, digits_small, tiny_vit):
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "vitft_app.cli", "train", "--data", str(digits_small), "--model", str(tiny_vit),
         "--epochs", "500", "--batch-size", "8", "--precision", "fp32", "--output-dir", str(tmp_path / "runs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:  # the child is killed on every exit path (a timeout here once leaked it for 14 minutes)
        deadline = time.time() + 120
        status_files = []
        while time.time() < deadline and not status_files:
            status_files = [p for p in (tmp_path / "runs").glob("*/metrics.csv")] if (tmp_path / "runs").exists() else []
            time.sleep(0.2)
        assert status_files, "training did not start"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert process.returncode == 0, err[-2000:]
    run_dir = Path(out.strip().splitlines()[-1])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped", status
    assert "stopping after the current step" in err


def test_ctrl_c_during_shutdown_ends_the_process_without_a_traceback(tmp_path):
    """A Ctrl-C after the command returned (here: from an atexit handler, where a library's clean-up
    runs) used to print "Exception ignored in atexit callback" and a KeyboardInterrupt traceback. It
    now ends the process at once with the command's exit status, its output flushed."""
    import time

    script = ("import atexit, os, signal, time\n"
              "from vitft_app import cli\n"
              "cli.main = lambda argv=None: (print('/runs/the-run-folder'), 0)[1]\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(30)))\n"
              "cli.run()\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 0  # a completed run stays a success for `RUN=$(vitft train ...) && ...`
    assert result.stdout.strip() == "/runs/the-run-folder"  # stdout (a pipe: block-buffered) was flushed
    assert time.monotonic() - started < 30  # at once, not after the handler's 30 s sleep


def test_unusable_output_dir_is_a_message(tmp_path, digits_small, vitft_here):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = vitft_here("train", "--data", str(digits_small), "--output-dir", str(blocker / "runs"), cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot use --output-dir" in result.stderr and "Traceback" not in result.stderr


def test_predict_explains_what_model_it_needs(tmp_path, vitft_here):
    here = dict(cwd=tmp_path)
    result = vitft_here("predict", "--model", "google/vit-base-patch16-224", str(tmp_path / "x.png"), **here)
    assert result.returncode == 2 and "Hub ids are used for training" in result.stderr
    zero = vitft_here("predict", "--model", str(tmp_path), "--top-k", "0", str(tmp_path / "x.png"), **here)
    assert zero.returncode == 2 and "--top-k must be >= 1" in zero.stderr


def test_export_onnx_zip_and_onnx_prediction(tmp_path, digits_small, tiny_vit, vitft_here):
    trained = _vitft("train", "--data", str(digits_small), "--model", str(tiny_vit), "--epochs", "1",
                     "--batch-size", "16", "--precision", "fp32", "--output-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_dir = Path(trained.stdout.strip().splitlines()[-1])

    exported = _vitft("export", str(run_dir), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    onnx_path = Path(exported.stdout.strip().splitlines()[-1])
    assert onnx_path == run_dir / "model" / "onnx" / "model.onnx" and onnx_path.exists()
    diff = float(exported.stderr.split("=")[-1].split("over")[0])
    assert diff < 1e-4

    image = str(sorted((digits_small / "1").iterdir())[0])
    # --precision fp32: exact parity with ONNX (the default, auto, may run bf16 autocast)
    here = dict(cwd=tmp_path)
    torch_out = json.loads(vitft_here("predict", "--model", str(run_dir), "--precision", "fp32", image, **here).stdout)
    onnx_out = json.loads(vitft_here("predict", "--model", str(run_dir), "--backend", "onnx", image, **here).stdout)
    assert [p["label"] for p in onnx_out["predictions"]] == [p["label"] for p in torch_out["predictions"]]
    for a, b in zip(onnx_out["predictions"], torch_out["predictions"]):
        assert abs(a["score"] - b["score"]) < 1e-4

    zipped = vitft_here("export", str(run_dir), "--format", "zip", **here)
    assert zipped.returncode == 0 and Path(zipped.stdout.strip()) == run_dir / "model.zip"


def test_predict_a_folder_with_a_threshold(tmp_path, digits_small, tiny_vit, vitft_here):
    result = vitft_here("predict", "--model", str(tiny_vit), str(digits_small / "7"), "--threshold", "0.99",
                         "--tta", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(records) == 20 and all(r["image"].startswith(str(digits_small / "7")) for r in records)
    assert all(r["answer"] == "not sure" for r in records)  # a random tiny model is never 99% sure


def test_resume_warns_that_other_flags_are_ignored(tmp_path, digits_small, tiny_vit):
    import threading

    from vitft_app.events import StepLogged
    from vitft_app.runs import RunRecorder, RunStore
    from vitft_app.training import train

    config = TrainConfig(data_dir=str(digits_small), model=str(tiny_vit), epochs=1, batch_size=8, precision="fp32",
                         augment="none", log_every_steps=1, output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    recorder, stop = RunRecorder(run_dir), threading.Event()
    train(config, run_dir, lambda e: (recorder(e), isinstance(e, StepLogged) and e.step == 2 and stop.set()),
          stop_event=stop, device="cpu")
    result = _vitft("train", "--resume", str(run_dir), "--epochs", "5", "--attention", "sdpa", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: --resume continues with the run's saved config.json; ignoring --epochs --attention" \
        in result.stderr
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 1
