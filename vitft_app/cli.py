"""``vitft``: the same engine as the app, headless.

    vitft train --data DIR --model NAME_OR_PATH [--preset quick|balanced|best] [--freeze-depth N] ...
                [--report-to none|tensorboard|mlflow]
    vitft train --resume RUN_DIR
    vitft sweep --data DIR --model NAME_OR_PATH --trials N [--space FILE] [--sampler tpe|grid] [--name NAME] ...
    vitft predict --model DIR IMAGE... [--top-k K]
    vitft scan DIR [--json]
    vitft evaluate RUN_DIR [--data DIR] [--split val|test]
    vitft export RUN_DIR [--format onnx|onnx-int8|zip] [--force]
    vitft report RUN_DIR
    vitft zero-shot --data DIR --model CLIP_OR_SIGLIP_ID_OR_DIR [--template "a photo of a {}."]
    vitft demo RUN_DIR [--host 127.0.0.1] [--port 7870] [--no-browser] | vitft demo RUN_DIR --bundle DIR
    vitft app [--host 127.0.0.1] [--port 7860] ...   (same as ``python app.py``)

``train`` flags are generated from the :class:`~vitft_app.config.TrainConfig` fields (their
docstrings are the help texts); its last line of stdout is the run folder's path. ``sweep`` takes
the same flags as fixed values for every trial; its last line of stdout is the best run's folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from .config import SECTIONS, TrainConfig, field_specs
from .log_setup import configure_logging

#: Flag names that differ from ``--field-name``.
FLAG_OVERRIDES = {"data_dir": "--data"}


def flag_name(field_name: str) -> str:
    """``--data`` for ``data_dir``, else ``--`` + the field name with dashes."""
    return FLAG_OVERRIDES.get(field_name, "--" + field_name.replace("_", "-"))


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per TrainConfig field (type, choices, docstring, default in the help), plus
    ``--preset`` and ``--resume``.

    Every field flag defaults to None in the parser, so :func:`config_from_args` can tell a value
    the user typed (it wins over the preset) from one left out (preset, then field default).
    """
    from .presets import AUTO_PRESET, PRESETS

    parser.add_argument("--preset", choices=(*PRESETS, AUTO_PRESET), default=None,
                        help="fill the settings from a preset (quick: linear probe; balanced: partial freeze +"
                             " basic augmentation; best: RandAugment, MixUp/CutMix, layer decay, EMA, label"
                             " smoothing; auto: a from-scratch recipe chosen from the scanned data: model, image"
                             " size, epochs, lr, augmentation); flags given explicitly override it")
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)  # the app's multi-GPU launch
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue a stopped, failed or interrupted run from its checkpoint (other flags are"
                             " ignored: the run keeps its config)")
    # One flag per field, grouped by the field's section; type, choices, bounds and help all come
    # from the field's declaration (vitft_app.config.field_specs), as do the form's widgets.
    groups = {key: parser.add_argument_group(title) for key, title in SECTIONS.items()}
    for spec in field_specs().values():
        if spec.name == "auto_batch_size":  # also spelled --batch-size auto
            groups.get(spec.section, parser).add_argument(
                flag_name(spec.name), dest=spec.name, action="store_const", const=True, default=None,
                help="same as --batch-size auto: " + spec.doc.replace("%", "%%"))
            continue
        help_text = spec.doc.replace("%", "%%")  # argparse %-formats help strings
        if spec.name == "data_dir":
            help_text += " (required unless --resume)"
        elif spec.default is not None:
            help_text += f" (default: {spec.default})"
        if spec.bounds_text():
            help_text += f" (allowed: {spec.bounds_text()})"
        groups.get(spec.section, parser).add_argument(
            flag_name(spec.name),
            dest=spec.name,
            type=_batch_size_arg if spec.name == "batch_size" else spec.kind,
            choices=spec.choices,
            default=None,
            help=help_text,
            metavar=None if spec.choices else spec.name.split("_")[-1].upper(),
        )


def _batch_size_arg(text: str) -> int | str:
    """``--batch-size``: a whole number, or ``auto`` (find the size that fits, see vitft_app.auto_batch)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def _given_train_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields whose flags were given (every train flag defaults to None);
    ``--batch-size auto`` gives ``auto_batch_size=True`` and leaves ``batch_size`` as the start."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if given.get("batch_size") == "auto":
        del given["batch_size"]
        given["auto_batch_size"] = True
    return given


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Builds the TrainConfig from parsed ``train`` flags (by keyword, never by position): field
    defaults, then the ``--preset`` values, then the flags given explicitly.

    Raises:
        ValueError: a missing ``--data``, an invalid value, or a preset for a model that cannot
            be inspected.
    """
    given = _given_train_fields(args)
    if "data_dir" not in given:
        raise ValueError("the following arguments are required: --data")
    values: dict[str, Any] = {}
    if getattr(args, "preset", None) == "auto":
        from .presets import auto_preset_values

        values, description = auto_preset_values(given["data_dir"], given.get("val_fraction", TrainConfig.val_fraction),
                                                 given.get("seed", TrainConfig.seed))
        print(f"preset auto: {description}", file=sys.stderr)
    elif getattr(args, "preset", None):
        from .presets import preset_values_for_model

        values = preset_values_for_model(args.preset, given.get("model", TrainConfig.model), given.get("image_size"))
    return TrainConfig(**{**values, **given})


def add_report_to_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--report-to none|tensorboard|mlflow`` (kept out of TrainConfig for now)."""
    from .tracking import REPORT_TO_CHOICES

    parser.add_argument("--report-to", choices=list(REPORT_TO_CHOICES), default="none",
                        help="also write the metrics to TensorBoard (RUN_DIR/tensorboard) or MLflow (RUN_DIR/mlruns,"
                             " or MLFLOW_TRACKING_URI); needs pip install -e '.[tracking]' (default: none)")


def _add_demo_and_data_commands(commands: Any) -> None:
    """The ``demo``, ``label-issues`` and ``zero-shot`` commands (part of :func:`build_parser`)."""
    demo = commands.add_parser(
        "demo", help="serve a clean demo page for one trained run, or write it as a standalone folder",
        description="Serve one page for a run's model: its classes and validation accuracy beside the"
                    " majority-class baseline, a drop zone and webcam, top-k bars, an optional attention"
                    " overlay and example images from the validation split. No training controls. With"
                    " --bundle DIR, write a folder that runs without vitft (pip install -r requirements.txt"
                    " && python app.py) and can be pushed as a Hugging Face Space, then exit.")
    demo.add_argument("run", metavar="RUN_DIR", help="a run folder with a saved model")
    demo.add_argument("--bundle", metavar="DIR", default=None,
                      help="write app.py, requirements.txt, README.md (Space header), model/ (safetensors) and"
                           " examples/ into DIR (new or empty) instead of serving")
    demo.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes the page)")
    demo.add_argument("--port", type=int, default=7870, help="port (default: 7870)")
    demo.add_argument("--auth", metavar="USER:PASS", default=None, help="require this login")
    demo.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    issues = commands.add_parser(
        "label-issues", help="find suspected label errors, outliers and exact duplicates (confident learning)",
        description="Out-of-sample probabilities for every training and validation image (k-fold linear head on"
                    " the model's features; the run's model on validation images of a fine-tune), then"
                    " cleanlab's find_label_issues (default filter: the images with the lowest self-confidence,"
                    " as many as cleanlab estimates are mislabeled), ranked by self-confidence. Writes"
                    " RUN_DIR/label_issues.csv"
                    " (path, split, given_label, suggested_label, score; flagged images only, most suspicious"
                    " first) and RUN_DIR/label_issues.json (method, outliers, duplicates). Nothing in the"
                    " dataset is changed.")
    issues.add_argument("run", metavar="RUN_DIR", help="a run folder with a saved model")
    issues.add_argument("--data", default=None, help="dataset folder or labels CSV (default: the run's)")
    issues.add_argument("--folds", type=int, default=5, help="k of the cross-validated linear head (default: 5)")
    issues.add_argument("--filter-by", default="low_self_confidence",
                        choices=("low_self_confidence", "prune_by_noise_rate", "both", "confident_learning",
                                 "low_normalized_margin"),
                        help="cleanlab's find_label_issues filter (default: low_self_confidence, the most precise on"
                             " the digits benchmark; prune_by_noise_rate is cleanlab's own default)")
    issues.add_argument("--show", type=int, default=10, help="flagged images to print (default: 10)")

    zero_shot = commands.add_parser(
        "zero-shot", help="zero-shot baseline: validation accuracy of a CLIP or SigLIP model from the class names",
        description="Classify the dataset's validation split (split as vitft train splits it) with an image-text"
                    " model, each class name put into a prompt template; print the accuracy beside the"
                    " majority-class baseline and save it as a run of kind zero-shot in the runs folder (a row of"
                    " the Runs table). Real weights come from the Hugging Face Hub (openai/clip-vit-base-patch32,"
                    " google/siglip-base-patch16-224, ...); a local save_pretrained folder works offline.")
    zero_shot.add_argument("--data", required=True, help="dataset folder (one subfolder per class) or labels CSV")
    zero_shot.add_argument("--model", required=True, help="CLIP or SigLIP Hub id or local folder")
    zero_shot.add_argument("--template", default="a photo of a {}.",
                           help="prompt template, {} is the class name (underscores read as spaces)"
                                " (default: 'a photo of a {}.')")
    zero_shot.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction,
                           help=f"validation share of the automatic split, as in train (default: {TrainConfig.val_fraction})")
    zero_shot.add_argument("--seed", type=int, default=TrainConfig.seed,
                           help=f"seed of the automatic split, as in train (default: {TrainConfig.seed})")
    zero_shot.add_argument("--output-dir", default=TrainConfig.output_dir,
                           help=f"runs folder the result is saved in (default: {TrainConfig.output_dir})")


def build_parser() -> argparse.ArgumentParser:
    """The ``vitft`` argument parser with its ``train``, ``predict`` and ``app`` commands."""
    from .server import add_server_arguments

    parser = argparse.ArgumentParser(prog="vitft", description="Fine-tune a Vision Transformer on an image folder.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model on an image folder (headless)",
                                description="Train a model; the last stdout line is the run folder.")
    add_train_arguments(train)
    add_report_to_argument(train)

    sweep = commands.add_parser(
        "sweep", help="hyperparameter search (Optuna): several runs, pruned early when hopeless",
        description="Search hyperparameters with Optuna. Each trial is a normal run named <NAME>-t<N>; the study"
                    " is stored in OUTPUT_DIR/sweeps.db, so running the same --name again continues it. The"
                    " TrainConfig flags below are fixed for every trial; the searched ones come from --space."
                    " The last stdout line is the best run's folder.")
    sweep.add_argument("--trials", type=int, required=True,
                       help="total number of trials the sweep should have: trials an earlier session of the same"
                            " --name already ran count, so --trials 10 after 6 adds 4")
    sweep.add_argument("--space", default=None, metavar="FILE",
                       help="search space as JSON or YAML: {\"lr\": {\"low\": 1e-5, \"high\": 1e-2, \"log\": true},"
                            " \"batch_size\": [16, 32]}; searchable: lr, weight_decay, freeze_depth, batch_size,"
                            " augment (and label_smoothing, mixup, cutmix where this version has them)"
                            " (default: lr on a log range 1e-5..1e-2 and weight_decay 0..0.1)")
    sweep.add_argument("--sampler", choices=["tpe", "grid"], default="tpe",
                       help="tpe: Optuna's TPE seeded with --seed; grid: every combination (a range becomes 3"
                            " points) (default: tpe)")
    sweep.add_argument("--name", default=None, help="sweep name; an existing name continues that sweep"
                                                    " (default: sweep-<date>-<time>)")
    sweep.add_argument("--no-pruning", action="store_true", help="never stop a trial early")
    sweep.add_argument("--pruning-startup-trials", type=int, default=3,
                       help="finished trials before the median pruner may stop a trial (default: 3)")
    add_train_arguments(sweep)
    add_report_to_argument(sweep)

    predict = commands.add_parser("predict", help="predict images with a trained model",
                                  description="Print one JSON object per image: {image, predictions}.")
    predict.add_argument("--model", required=True, help="a run folder or its model/ folder (save_pretrained format)")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (searched recursively)")
    predict.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    predict.add_argument("--threshold", type=float, default=0.0,
                         help="top-1 probability under which the answer is 'not sure' (default: 0); for a"
                              " multi-label model, the score at or above which a label is listed in 'labels'"
                              " (default 0 means 0.5)")
    predict.add_argument("--tta", action="store_true", help="average over the image and its horizontal flip")
    predict.add_argument("--precision", choices=["auto", "fp32"], default="auto",
                         help="torch backend: auto uses bf16 autocast where the hardware has it (faster,"
                              " probabilities within about 0.01 of fp32), fp32 for exact scores (default: auto)")
    predict.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"], default="torch",
                         help="onnx runs MODEL/onnx/model.onnx with onnxruntime (make it with vitft export);"
                              " onnx-int8 runs MODEL/onnx/model_int8.onnx (vitft export --format onnx-int8)")

    scan = commands.add_parser("scan", help="check a dataset folder (the dataset doctor)",
                               description="Decode every image, report classes, counts, skipped and ignored"
                                           " files, duplicates, imbalance. Exit 0 when the dataset can train,"
                                           " 2 when it cannot (reasons on stderr).")
    scan.add_argument("data", metavar="DIR", help="dataset folder")
    scan.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    scan.add_argument("--val-fraction", type=float, default=0.2, help="automatic split share (default: 0.2)")
    scan.add_argument("--seed", type=int, default=42, help="automatic split seed (default: 42)")
    scan.add_argument("--max-pixels", type=int, default=None,
                      help="skip images with more pixels than this as too large (default: Pillow's limit)")
    scan.add_argument("--no-cache", action="store_true", help="decode every file again, ignoring the scan cache")

    evaluate = commands.add_parser("evaluate", help="evaluate a trained run on its validation or test split",
                                   description="Write RUN_DIR/eval/<split>/metrics.json, predictions.csv and"
                                               " figures, and print the summary.")
    evaluate.add_argument("run", metavar="RUN_DIR", help="a run folder (or a save_pretrained folder with --data)")
    evaluate.add_argument("--data", default=None, help="dataset folder (default: the run's)")
    evaluate.add_argument("--split", choices=["val", "test"], default="val",
                          help="val: the run's validation split; test: DATA/test/, never used in training"
                               " (default: val)")
    evaluate.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy (default: 5)")

    export = commands.add_parser("export", help="export a trained model (ONNX, or a zip for transformers.pipeline)",
                                 description="onnx: write MODEL/onnx/model.onnx, checked against PyTorch on the"
                                             " run's validation images; onnx-int8: also MODEL/onnx/model_int8.onnx"
                                             " (onnxruntime dynamic quantization), checked against the fp32 ONNX model"
                                             " on the run's validation split (accuracy of both, top-1 agreement,"
                                             " single-image latency) and refused when it loses more than 1 accuracy"
                                             " point unless --force; zip: the save_pretrained folder as a zip.")
    export.add_argument("run", metavar="RUN_DIR", help="a run folder or a save_pretrained folder")
    export.add_argument("--format", choices=["onnx", "onnx-int8", "zip"], default="onnx", help="(default: onnx)")
    export.add_argument("--force", action="store_true",
                        help="onnx-int8: keep the int8 model even when it loses more than 1 accuracy point")
    export.add_argument("--output", default=None,
                        help="onnx: output folder (default MODEL/onnx); zip: file (default RUN_DIR/model.zip)")

    report = commands.add_parser("report", help="write a one-page HTML report of a run (opens offline)",
                                 description="Evaluate the validation split if needed and write RUN_DIR/report.html.")
    report.add_argument("run", metavar="RUN_DIR", help="a run folder")
    report.add_argument("--output", default=None, help="HTML file (default: RUN_DIR/report.html)")

    _add_demo_and_data_commands(commands)

    app = commands.add_parser("app", help="start the web app (same as python app.py)")
    add_server_arguments(app)
    return parser


def progress_listener(state: dict[str, Any]) -> Callable[[Any], None]:
    """The CLI's event listener: a tqdm bar per run on stderr, epoch lines, the final status
    (kept in ``state["status"]``)."""
    from tqdm import tqdm

    from .baseline import Baseline, accuracy_with_baseline, format_accuracy, weak_model_warning
    from .events import EvalDone, LogMessage, RunFailed, RunFinished, RunStarted, StepLogged, StepProgress

    def listener(event: Any) -> None:
        bar = state["bar"]
        if isinstance(event, RunStarted):
            state["baseline"] = Baseline.from_dict(event.val_baseline)
            if state.get("announce_runs"):
                print(f"== {event.run_id}", file=sys.stderr)
            for note in event.notes:
                print(note, file=sys.stderr)
            print(f"{event.num_train} train / {event.num_val} val images, {len(event.classes)} classes;"
                  f" {event.trainable_params:,} / {event.total_params:,} parameters trainable", file=sys.stderr)
            state["bar"] = tqdm(total=event.total_steps, unit="step", file=sys.stderr, dynamic_ncols=True,
                                initial=event.resumed_from_step or 0)
        elif isinstance(event, StepProgress) and bar is not None:
            bar.update(event.step - bar.n)
        elif isinstance(event, StepLogged) and bar is not None:
            bar.update(event.step - bar.n)
            bar.set_postfix(epoch=f"{event.epoch:.2f}", loss=f"{event.loss:.4f}", img_s=f"{event.images_per_sec:.1f}")
        elif isinstance(event, EvalDone):
            text = (f"epoch {event.epoch}: train loss {event.train_loss:.4f} acc {event.train_accuracy:.4f} | "
                    f"val loss {event.val_loss:.4f} acc {event.val_accuracy:.4f}"
                    + (f" mAP {event.val_map:.4f}" if event.val_map is not None else "")
                    + (" (best, saved)" if event.is_best else ""))
            if event.early_stopping_patience:
                left = event.early_stopping_patience - event.epochs_without_improvement
                text += f" | early stopping in {left} epoch(s) without improvement"
            (bar.write if bar is not None else print)(text, file=sys.stderr)
        elif isinstance(event, LogMessage):
            (bar.write if bar is not None else print)(event.text, file=sys.stderr)
        elif isinstance(event, RunFinished):
            state["status"] = event.status
            if bar is not None:
                bar.close()
            baseline = state.get("baseline")
            best = (f"best val mAP {event.best_metric:.4f} (val accuracy {format_accuracy(event.best_val_accuracy)})"
                    if event.monitor == "val_map" and event.best_metric is not None
                    else "best val accuracy " + (accuracy_with_baseline(event.best_val_accuracy, baseline)
                                                 if event.best_val_accuracy is not None else "- (no epoch finished)"))
            print(f"{event.status} in {event.duration_s:.1f} s after {event.step} steps; {best}"
                  + (f" ({event.reason})" if event.reason else ""), file=sys.stderr)
            warning = None if event.monitor == "val_map" else weak_model_warning(event.best_val_accuracy, baseline)
            if warning:
                print(warning, file=sys.stderr)
        elif isinstance(event, RunFailed):
            if bar is not None:
                bar.close()
            state["status"] = "failed"
            print(f"failed: {event.error}", file=sys.stderr)

    return listener


def _scan_progress_bar() -> tuple[Any, Callable[[int, int], None]]:
    from tqdm import tqdm

    scan_bar = tqdm(unit="file", file=sys.stderr, desc="checking images", disable=None, leave=False)

    def scan_progress(done: int, total: int) -> None:
        scan_bar.total = total
        scan_bar.update(done - scan_bar.n)

    return scan_bar, scan_progress




def _wait_for_job(job: Any, runner: Any, what: str, stop_file: Path | None = None) -> None:
    """Waits for a job; the first Ctrl-C (or ``stop_file`` appearing) presses Stop, later
    Ctrl-Cs say it is still stopping."""
    stopping = False
    while not job.done.is_set():
        try:
            job.wait(timeout=0.5)
            if stop_file is not None and not stopping and stop_file.exists():  # the app's Stop
                runner.stop()
                stopping = True
        except KeyboardInterrupt:
            if not stopping:
                from .runs import kept_model_note

                print(f"\nstopping {what}... ({kept_model_note(getattr(job, 'run_dir', None))})", file=sys.stderr)
                runner.stop()
                stopping = True
            else:
                print("\nstill stopping: waiting for the current step to end", file=sys.stderr)
    # ``done`` is the thread's last statement, but its frame still holds the model, the optimizer
    # and (on resume) the checkpoint: let it release them before the interpreter shuts down, or a
    # tensor freed in a daemon thread during finalization aborts the process ("terminate called
    # without an active exception").
    job.thread.join(timeout=60)


def _train_follower(args: argparse.Namespace, dist_ctx: Any) -> int:
    """A data-parallel process other than rank 0: trains its share silently in the run folder
    that rank 0 created (rank 0 reports and writes every file)."""
    import threading

    from .training import train

    message = dist_ctx.broadcast(None)  # rank 0 sends {"run_dir"} or {"error"}
    if "error" in message:
        return 2
    config = TrainConfig.from_json_file(Path(message["run_dir"]) / "config.json")
    stop_event, outcome = threading.Event(), {"code": 1}

    def target() -> None:
        try:
            train(config, message["run_dir"], lambda event: None, stop_event=stop_event)
            outcome["code"] = 0
        except Exception as exc:  # noqa: BLE001 - rank 0 reports the run; this process only exits
            print(f"vitft train (rank {dist_ctx.rank}): {exc}", file=sys.stderr)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            thread.join(0.5)
        except KeyboardInterrupt:
            stop_event.set()
    return outcome["code"]


def run_train(args: argparse.Namespace) -> int:
    """Trains with a text progress bar on stderr; prints the run folder last on stdout.

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``) every process runs this:
    rank 0 creates the run folder, reports and writes; the others train their share."""
    from .distributed import env_world_size, init_distributed

    if env_world_size() <= 1:
        return _run_train(args, None)
    dist_ctx = init_distributed()
    try:
        if args.resume:
            print("vitft train: error: --resume runs in one process; resume, then launch again", file=sys.stderr)
            return 2
        if not dist_ctx.is_main:
            return _train_follower(args, dist_ctx)
        code = _run_train(args, dist_ctx)
        if not getattr(args, "_announced", False):
            dist_ctx.broadcast({"error": "rank 0 refused the run"})  # the others exit too
        return code
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _run_train(args: argparse.Namespace, dist_ctx: Any) -> int:
    """``vitft train`` in one process, or as rank 0 of a data-parallel run (``dist_ctx``)."""
    from .checkpoint import ResumeError
    from .jobs import JobRunner
    from .modeling import ModelLoadError
    from .runs import STOP_FILE

    existing = getattr(args, "run_dir", None)
    if args.resume:
        run_dir = Path(args.resume).expanduser()
        if refusal := _zero_shot_refusal(run_dir, "resume"):
            print(f"vitft train: error: {refusal}", file=sys.stderr)
            return 2
        output_dir = str(run_dir.resolve().parent)
        ignored = [flag_name(name) for name in _given_train_fields(args)] + (
            ["--preset"] if getattr(args, "preset", None) else [])
        if ignored:
            print(f"vitft train: warning: --resume continues with the run's saved config.json; ignoring"
                  f" {' '.join(ignored)}", file=sys.stderr)
    elif existing:
        # A run folder the app created and handed to this launch (multi-GPU from the UI).
        try:
            config = TrainConfig.from_json_file(Path(existing) / "config.json")
        except (OSError, ValueError) as exc:
            print(f"vitft train: error: --run-dir {existing}: {exc}", file=sys.stderr)
            return 2
        output_dir = str(Path(existing).resolve().parent)
    else:
        try:
            config = config_from_args(args)
        except (ValueError, ModelLoadError, OSError) as exc:
            print(f"vitft train: error: {exc}", file=sys.stderr)
            return 2
        output_dir = config.output_dir
    try:
        runner = JobRunner(output_dir)
    except OSError as exc:
        print(f"vitft train: error: cannot use --output-dir {output_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    state: dict[str, Any] = {"bar": None, "status": "failed"}
    def announce(path: Path) -> None:
        """Tells the other processes of a data-parallel run where the run folder is."""
        dist_ctx.broadcast({"run_dir": str(path)})
        args._announced = True
    scan_bar, scan_progress = _scan_progress_bar()
    try:
        if args.resume:
            job = runner.resume(run_dir, listener=progress_listener(state), progress=scan_progress,
                                report_to=args.report_to)
        else:
            job = runner.start(config, listener=progress_listener(state), progress=scan_progress,
                               report_to=args.report_to, on_run_created=announce if dist_ctx is not None else None,
                               run_dir=Path(existing) if existing else None)
    except (ModelLoadError, ResumeError, ValueError, FileNotFoundError, OSError) as exc:
        scan_bar.close()
        print(f"vitft train: error: {exc}", file=sys.stderr)
        return 2
    scan_bar.close()
    if existing:
        (Path(existing) / STOP_FILE).unlink(missing_ok=True)
    _wait_for_job(job, runner, "after the current step", Path(existing) / STOP_FILE if existing else None)
    print(job.run_dir)
    return 0 if state["status"] in ("completed", "stopped") else 1


def run_sweep(args: argparse.Namespace) -> int:
    """Runs a sweep with a progress bar per trial on stderr; prints the trials table, then the
    best run's folder last on stdout."""
    from .jobs import BusyError, JobRunner
    from .modeling import ModelLoadError
    from .sweep import default_pruner, load_space_file, start_sweep, study_summary, trials_frame

    try:
        config = config_from_args(args)
        space = load_space_file(args.space) if args.space else None
        runner = JobRunner(config.output_dir)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"vitft sweep: error: {exc}", file=sys.stderr)
        return 2
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # vitft prints its own per-trial lines
    pruner = optuna.pruners.NopPruner() if args.no_pruning else default_pruner(args.pruning_startup_trials)
    state: dict[str, Any] = {"bar": None, "status": "failed", "announce_runs": True}
    scan_bar, scan_progress = _scan_progress_bar()
    try:
        job = start_sweep(runner, config, space, args.trials, name=args.name, sampler=args.sampler, pruner=pruner,
                          report_to=args.report_to, listener=progress_listener(state), progress=scan_progress)
    except (ModelLoadError, ValueError, FileNotFoundError, OSError, BusyError) as exc:
        scan_bar.close()
        print(f"vitft sweep: error: {exc}", file=sys.stderr)
        return 2
    scan_bar.close()
    _wait_for_job(job, runner, "the sweep after the current trial")
    if job.error is not None:
        print(f"vitft sweep: error: {job.error}", file=sys.stderr)
        return 1
    result = job.result
    from .sweep import load_sweep

    study = load_sweep(runner.store.root, result.name)
    print(study_summary(study).replace("**", ""), file=sys.stderr)
    print(trials_frame(study).to_string(index=False))
    if result.best_run_dir:
        print(result.best_run_dir)
    return 0


def run_scan(args: argparse.Namespace) -> int:
    """Scans with a progress bar on stderr; prints the report (text or ``--json``) on stdout."""
    from tqdm import tqdm

    from .data import scan_dataset

    bar = tqdm(unit="file", file=sys.stderr, dynamic_ncols=True, desc="decoding", disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    if not 0 < args.val_fraction < 1:  # the same rule as TrainConfig.val_fraction
        print(f"vitft scan: error: --val-fraction must be in (0, 1), got {args.val_fraction}", file=sys.stderr)
        return 2
    if args.max_pixels is not None and args.max_pixels < 1:
        print(f"vitft scan: error: --max-pixels must be >= 1, got {args.max_pixels}", file=sys.stderr)
        return 2
    try:
        report = scan_dataset(args.data, val_fraction=args.val_fraction, seed=args.seed, max_pixels=args.max_pixels,
                              cache=None if args.no_cache else "default", progress=progress)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as exc:
        bar.close()
        print(f"vitft scan: error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
        if report.classes:
            print(report.counts().to_string(index=False))
        for path, reason in report.skipped:
            print(f"skipped: {report.relative(path)}: {reason}")
        for group in report.duplicates:
            print(f"duplicates ({', '.join(group.kinds)}): "
                  + ", ".join(report.relative(p) for p in group.paths))
        if report.ignored:
            print(f"ignored: {len(report.ignored)} entries (hidden, system or non-image files)")
        for warning in report.warnings:
            print(f"warning: {warning}")
    for error in report.errors:
        print(f"cannot train: {error}", file=sys.stderr)
    return 0 if report.ok else 2


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluates, writes ``eval/<split>/`` and prints the summary and the output folder."""
    from .evaluate import EvaluationError, evaluate_run, summary_text

    if refusal := _zero_shot_refusal(args.run, "evaluate"):
        print(f"vitft evaluate: error: {refusal}", file=sys.stderr)
        return 2
    try:
        result = evaluate_run(args.run, data_dir=args.data, split=args.split, top_k=args.top_k)
    except (EvaluationError, FileNotFoundError, ValueError) as exc:
        print(f"vitft evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(summary_text(result.metrics))
    print(result.out_dir)
    return 0


def run_label_issues(args: argparse.Namespace) -> int:
    """Finds label issues, prints the method, counts and the most suspicious images, writes the CSV."""
    from .label_issues import LabelIssuesError, find_run_label_issues

    if args.folds < 2:
        print(f"vitft label-issues: error: --folds must be >= 2, got {args.folds}", file=sys.stderr)
        return 2
    try:
        result = find_run_label_issues(args.run, data_dir=args.data, folds=args.folds, filter_by=args.filter_by)
    except (LabelIssuesError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"vitft label-issues: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    for row in result.issues.head(max(0, args.show)).itertuples():
        print(f"  {row.score:.3f}  {row.given_label} -> {row.suggested_label}  {row.path}")
    for row in result.outliers.head(max(0, min(args.show, 5))).itertuples():
        print(f"  outlier ({row.distance:.3f})  {row.label}  {row.path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Exports and prints the written path (and, for ONNX, the measured parity)."""
    from .export import ExportError, export_model_zip, export_onnx, validation_images

    try:
        if args.format == "zip":
            dest = args.output or str(Path(args.run) / "model.zip")
            print(export_model_zip(args.run, dest))
            return 0
        if args.format == "onnx-int8":
            from .quantize import export_onnx_int8

            if args.output:
                raise ExportError("--output is not used with onnx-int8: the int8 model lies beside MODEL/onnx/model.onnx")
            int8 = export_onnx_int8(args.run, force=args.force)
            print(int8.check.summary() + ("\nkept despite the drop (--force)" if int8.check.forced else ""),
                  file=sys.stderr)
            print(int8.path)
            return 0
        images = validation_images(args.run)
        result = export_onnx(args.run, output_dir=args.output, images=images or None)
    except (ExportError, FileNotFoundError, OSError, ValueError) as exc:
        print(f"vitft export: error: {exc}", file=sys.stderr)
        return 2
    print(f"ONNX opset {result.opset}; largest |p_onnx - p_torch| = {result.max_abs_prob_diff:.3g}"
          f" over {result.num_images} images", file=sys.stderr)
    print(result.path)
    return 0


def _zero_shot_refusal(run_dir: Any, action: str) -> str | None:
    """The message for a zero-shot run given to a command that needs a trained model, else None."""
    from .zero_shot import zero_shot_refusal

    return zero_shot_refusal(run_dir, action)


def run_zero_shot(args: argparse.Namespace) -> int:
    """Evaluates the zero-shot baseline, prints the summary (stderr) and the saved run folder (stdout)."""
    from .zero_shot import ZeroShotError, evaluate_zero_shot, save_zero_shot_run

    try:
        result = evaluate_zero_shot(args.data, args.model, args.template, val_fraction=args.val_fraction,
                                    seed=args.seed)
        run_dir = save_zero_shot_run(result, args.output_dir)
    except (ZeroShotError, OSError) as exc:
        print(f"vitft zero-shot: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary(), file=sys.stderr)
    print(run_dir)
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Writes the HTML report and prints its path."""
    from .evaluate import EvaluationError
    from .report import write_html_report

    try:
        print(write_html_report(args.run, args.output))
    except (EvaluationError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"vitft report: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Prints ``{"image": PATH, "predictions": [{"label", "score"}, ...]}`` per image (JSON lines);
    a multi-label model adds ``"labels"``: every label at or above the threshold.

    An unreadable image prints ``{"image": PATH, "error": reason}`` and makes the exit code 1.
    """
    from .images import ImageLoadError
    from .predict import Predictor

    if args.top_k < 1:
        print("vitft predict: error: --top-k must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.backend in ("onnx", "onnx-int8"):
            from .export import ExportError, OnnxPredictor
            from .quantize import INT8_FILE_NAME

            try:
                predictor = OnnxPredictor(args.model, **({"file_name": INT8_FILE_NAME} if args.backend == "onnx-int8" else {}))
            except ExportError as exc:
                raise ValueError(str(exc)) from exc
        else:
            predictor = Predictor(args.model, precision=args.precision)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"vitft predict: error: {exc}", file=sys.stderr)
        return 2
    from .predict import apply_threshold, expand_image_paths

    code = 0
    images = expand_image_paths(args.images)
    if not images:
        print("vitft predict: error: no image files in " + " ".join(args.images)
              + " (image files: .jpg .jpeg .png .bmp .gif .webp .tif .tiff)", file=sys.stderr)
        return 1
    for image in images:
        try:
            prediction = predictor.predict([image], top_k=args.top_k, tta=args.tta)[0]
            record: dict[str, Any] = {
                "image": image,
                "predictions": [{"label": l, "score": s} for l, s in zip(prediction.labels, prediction.scores)],
            }
            if prediction.multi_label:
                from .predict import labels_present

                record["labels"] = labels_present(prediction, args.threshold)
            elif args.threshold > 0:
                record["answer"] = apply_threshold(prediction, args.threshold)
        except ImageLoadError as exc:
            record, code = {"image": image, "error": exc.reason}, 1
        print(json.dumps(record), flush=True)
    return code


def run_demo(args: argparse.Namespace) -> int:
    """``vitft demo``: serve the run's demo page (blocks), or write the bundle with ``--bundle``."""
    from .demo import DemoError, demo_summary, write_bundle

    try:
        if args.bundle:
            out = write_bundle(args.run, args.bundle)
            print(f"Wrote the demo bundle to {out}: cd {out} && pip install -r requirements.txt && python app.py",
                  file=sys.stderr)
            print(out)
            return 0
        from .server import parse_auth
        from .ui.demo_page import serve_demo

        auth = parse_auth(args.auth)
        demo_summary(args.run)  # a bad folder fails here, before the banner
        print(f"Demo page of {args.run} on http://{args.host}:{args.port} (Ctrl+C stops it)", file=sys.stderr, flush=True)
        serve_demo(args.run, args.host, args.port, open_browser=not args.no_browser, auth=auth)
    except (DemoError, FileNotFoundError, OSError, ValueError) as exc:
        print(f"vitft demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _quiet_library_progress_bars() -> None:
    """Hides transformers' own "Loading weights" / "Writing model shards" bars, which would
    interleave with vitft's progress bar; warnings and errors still print."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def install_sigint_handler() -> None:
    """Makes Ctrl-C (SIGINT) raise ``KeyboardInterrupt`` even when the process started with SIGINT
    ignored: a shell starts a background job (``vitft train ... &``) that way, and Python then
    keeps the inherited "ignore", so ``kill -INT`` would do nothing. Main thread only."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


#: What each command imports anyway, loaded by :func:`run` while the garbage collector is paused.
PRELOAD = {
    "train": "vitft_app.jobs", "sweep": "vitft_app.jobs", "label-issues": "vitft_app.jobs",
    "evaluate": "vitft_app.modeling", "predict": "vitft_app.modeling", "export": "vitft_app.modeling",
    "zero-shot": "vitft_app.modeling", "demo": "vitft_app.modeling", "app": "vitft_app.server",
}
_gc_paused = False


def _end_gc_pause(command: str) -> None:
    """Imports what ``command`` needs, then freezes what exists and turns the collector back on
    (see :func:`run`); does nothing unless :func:`run` paused the collector."""
    global _gc_paused
    if not _gc_paused:
        return
    try:
        if command in PRELOAD:
            importlib.import_module(PRELOAD[command])
    finally:
        gc.freeze()
        gc.enable()
        _gc_paused = False


def run() -> NoReturn:
    """The ``vitft`` console script and ``python -m vitft_app.cli``: :func:`main` with the garbage
    collector kept off the import graph, then exit with its status.

    Importing torch and transformers creates about 520,000 Python objects, and the cyclic garbage
    collector walks them again and again while they arrive (8 full collections, 1.0-1.2 s on the
    2-core Xeon here) and again when the interpreter shuts down (2.1 s from the last statement to
    the process's exit). So the collector is off while the command's modules are imported
    (:data:`PRELOAD`, after the arguments are parsed: ``--help`` stays instant); then everything
    alive is moved to the permanent generation (``gc.freeze()``, the same at exit) and
    collection resumes for what the command creates. Measured: imports 6.3-6.9 s instead of
    7.1-10.0 s, exit 0.3 s instead of 2.1 s. atexit handlers, stream flushing and module teardown
    still run; only reference cycles among frozen objects are not collected, which at exit means
    their memory goes back to the operating system with the process.
    """
    global _gc_paused
    gc.disable()
    _gc_paused = True
    try:
        code = main()
    finally:
        _end_gc_pause("")
    _end_on_late_interrupt(code)
    gc.freeze()
    sys.exit(code)


def _end_on_late_interrupt(code: int) -> None:
    """After the command returned, a Ctrl-C ends the process at once with the command's own exit
    status (0 for a completed run: a script's ``&&`` still goes on), instead of raising
    ``KeyboardInterrupt`` inside whatever runs then: an atexit handler or the join of a library's
    thread, which Python reports as "Exception ignored in atexit callback" with a traceback. The
    run folder is complete by then and stdout is flushed first; only the interpreter's own clean-up
    is skipped.

    Args:
        code: the exit status :func:`main` returned.
    """
    import signal
    import threading

    def end(signum: int, frame: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, end)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one ``vitft`` command (the console script calls it through :func:`run`).

    An unexpected error prints one line (``VITFT_DEBUG=1`` adds the traceback) and exits 1;
    Ctrl-C outside training exits 130.
    """
    args = build_parser().parse_args(argv)
    commands = {"train": run_train, "sweep": run_sweep, "predict": run_predict, "scan": run_scan, "evaluate": run_evaluate,
                "export": run_export, "report": run_report, "demo": run_demo,
                "label-issues": run_label_issues, "zero-shot": run_zero_shot}
    install_sigint_handler()
    # The server logs what it decides and every unexpected error at INFO; the one-shot commands
    # print their own progress and let only warnings through.
    configure_logging(logging.INFO if args.command in ("app", "demo") else logging.WARNING)
    if args.command not in commands:  # "app"
        _end_gc_pause("app")
        from .server import launch

        launch(args)
        return 0
    if args.command != "scan":  # scan loads no model
        _quiet_library_progress_bars()
    try:
        _end_gc_pause(args.command)  # after `vitft run` paused the collector: import, freeze, resume
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"\nvitft {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for people; the traceback on request
        if os.environ.get("VITFT_DEBUG"):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"vitft {args.command}: error: {type(exc).__name__}" + (f": {text}" if text else "")
              + " (set VITFT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    run()
