"""Hostile and faulty-input cases, tried as a new user and an attacker would (issue 13).

Runs every case against the real handlers (the app's tab functions, the CLI in a subprocess, a
real app with ``--auth`` over HTTP) in a sandbox folder, and prints one line per case and the
totals: cases tried, handled with a clear message (or accepted correctly), tracebacks, generic
errors, stuck states, writes outside the allowed folders.

    PYTHONPATH=. python benchmarks/hostile_cases.py            # everything (~5 min on 2 busy cores)
    PYTHONPATH=. python benchmarks/hostile_cases.py --quick    # without the app, SIGKILL and training cases

Allowed folders for writes: the sandbox's ``data/uploads`` and ``runs``, the app's download and
Gradio temp folders, and the run folders a case creates on purpose.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
GENERIC = re.compile(r"^(❌ )?(Error|Exception|[A-Z][A-Za-z]+Error|KeyError|TypeError)\b[: ]?|Could not start: [A-Z]\w+Error|"
                     r"failed: [A-Z]\w+Error")


@dataclass
class Outcome:
    name: str
    kind: str  # "message", "ok", "traceback", "generic", "stuck", "outside"
    text: str


def classify(text: str, accepted: bool = False) -> str:
    """``traceback`` / ``generic`` / ``message`` (or ``ok`` when the input was accepted)."""
    if "Traceback (most recent call last)" in text:
        return "traceback"
    first = text.strip().splitlines()[0] if text.strip() else ""
    if GENERIC.search(first) or first in ("Error", "❌ Error"):
        return "generic"
    return "ok" if accepted else "message"


def snapshot(folder: Path, skip: tuple[str, ...]) -> set[str]:
    files = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        if any(rel == s or rel.startswith(s + os.sep) for s in skip):
            dirnames[:] = []
            continue
        files.update(os.path.join(rel, f) for f in filenames)
    return files


class Runner:
    def __init__(self, sandbox: Path):
        self.sandbox = sandbox
        self.outcomes: list[Outcome] = []

    def case(self, name: str, fn: Callable[[], tuple[str, bool]]) -> None:
        """Runs one case; ``fn`` returns ``(what the user saw, accepted?)``."""
        before = snapshot(self.sandbox, ("data/uploads", "runs", "work"))
        try:
            text, accepted = fn()
            kind = classify(text, accepted)
        except StuckError as exc:
            text, kind = str(exc), "stuck"
        except Exception:  # noqa: BLE001 - an exception out of a handler is what the user sees as an error
            text, kind = traceback.format_exc(), "traceback"
        after = snapshot(self.sandbox, ("data/uploads", "runs", "work"))
        if after - before:
            kind, text = "outside", f"new files: {sorted(after - before)[:5]} | {text}"
        self.outcomes.append(Outcome(name, kind, text))
        line = text.strip().splitlines()[-1] if kind == "traceback" else (text.strip().splitlines() or [""])[0]
        print(f"[{kind:9}] {name}: {line[:150]}", flush=True)

    def totals(self) -> dict[str, int]:
        counts = {k: 0 for k in ("message", "ok", "traceback", "generic", "stuck", "outside")}
        for outcome in self.outcomes:
            counts[outcome.kind] += 1
        return counts


class StuckError(RuntimeError):
    pass


# ---- inputs ------------------------------------------------------------------------------------


def bad_images(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}

    def put(name: str, data: bytes | None = None, image: Any = None, **save: Any) -> None:
        path = folder / name
        if data is not None:
            path.write_bytes(data)
        else:
            image.save(path, **save)
        made[name] = path

    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, "PNG")
    put("empty.png", b"")
    put("text.jpg", b"hello, not an image")
    put("truncated.png", good.getvalue()[:60])
    header = bytearray(good.getvalue())
    header[16:24] = struct.pack(">II", 60000, 60000)  # a 3.6 GP header (decompression bomb)
    put("bomb-header.png", bytes(header))
    put("cmyk.jpg", image=Image.new("CMYK", (40, 30), (0, 100, 100, 0)), format="JPEG")
    put("sixteen-bit.png", image=Image.new("I;16", (40, 30)), format="PNG")
    put("palette-alpha.png", image=Image.new("P", (40, 30)), format="PNG", transparency=0)
    put("one-pixel.png", image=Image.new("RGB", (1, 1)), format="PNG")
    put("extreme-aspect.png", image=Image.new("L", (4000, 2)), format="PNG")
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    made["animated.gif"] = folder / "animated.gif"
    put("svg-renamed.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    put("la.png", image=Image.new("LA", (20, 20)), format="PNG")
    put("float.tiff", image=Image.new("F", (20, 20)), format="TIFF")
    return made


def bad_zips(folder: Path, good_image: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}

    def build(name: str, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
        path = folder / name
        with zipfile.ZipFile(path, "w", compression) as archive:
            for member, data in members.items():
                archive.writestr(member, data)
        made[name] = path
        return path

    image = good_image.read_bytes()
    build("traversal.zip", {"../../escaped.txt": b"x", "d/a/1.png": image})
    build("absolute.zip", {"/tmp/abs-escape.txt": b"x"})
    build("drive.zip", {"C:/windows.txt": b"x"})
    link = folder / "symlink.zip"
    with zipfile.ZipFile(link, "w") as archive:
        info = zipfile.ZipInfo("d/link")
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    made["symlink.zip"] = link
    build("bomb-single.zip", {"d/a/big.png": b"\0" * (300 * 1024 * 1024 // 10)})  # 30 MiB of zeros
    build("bomb-split.zip", {f"d/a/{i}.png": b"\0" * (1024 * 1024) for i in range(40)})
    build("empty.zip", {})
    build("macosx-only.zip", {"__MACOSX/._a": b"x"})
    build("no-images.zip", {"d/a/readme.txt": b"hello", "d/b/notes.txt": b"x"})
    build("one-class.zip", {"d/a/1.png": image, "d/a/2.png": image})
    build("nested.zip", {"inner.zip": (folder / "one-class.zip").read_bytes()})
    build("unicode.zip", {"dätä/ça/ü.png": image, "dätä/ñ/é.png": image})
    build("good.zip", {"d/a/1.png": image, "d/a/2.png": image, "d/b/1.png": image, "d/b/2.png": image})
    data = bytearray((folder / "good.zip").read_bytes())
    central = data.rfind(b"PK\x01\x02")
    crc = bytearray(data)
    crc[30 + len("d/a/1.png") + 5] ^= 0xFF
    (folder / "bad-crc.zip").write_bytes(bytes(crc))
    made["bad-crc.zip"] = folder / "bad-crc.zip"
    enc = bytearray(data)
    enc[6] |= 1
    enc[central + 8] |= 1
    (folder / "encrypted.zip").write_bytes(bytes(enc))
    made["encrypted.zip"] = folder / "encrypted.zip"
    method = bytearray(data)
    method[8:10] = struct.pack("<H", 77)
    method[central + 10:central + 12] = struct.pack("<H", 77)
    (folder / "method.zip").write_bytes(bytes(method))
    made["method.zip"] = folder / "method.zip"
    short = bytearray(data)
    short[central + 24:central + 28] = struct.pack("<I", 10)
    short[22:26] = struct.pack("<I", 10)
    (folder / "understated.zip").write_bytes(bytes(short))
    made["understated.zip"] = folder / "understated.zip"
    (folder / "junk.zip").write_bytes(b"PK\x03\x04" + os.urandom(200))
    made["junk.zip"] = folder / "junk.zip"
    (folder / "truncated.zip").write_bytes(bytes(data[: len(data) // 2]))
    made["truncated.zip"] = folder / "truncated.zip"
    return made


def tiny_model(folder: Path, labels: list[str]) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={l: i for i, l in enumerate(labels)})
    model = ViTForImageClassification(config)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def cli(*args: str, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitft_app.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def cli_text(result: subprocess.CompletedProcess, ok_codes=(0,)) -> tuple[str, bool]:
    text = result.stderr.strip() or result.stdout.strip()
    lines = [l for l in text.splitlines() if l.strip() and "%|" not in l and not l.startswith("\r")]
    if "Traceback (most recent call last)" in result.stderr:
        return result.stderr, False
    return (lines[-1] if lines else f"(exit {result.returncode}, no output)"), result.returncode in ok_codes


# ---- the cases -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the app, SIGKILL and training cases")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox folder")
    args = parser.parse_args()

    sandbox = Path(tempfile.mkdtemp(prefix="vitft-hostile-"))
    os.environ["VITFT_HOME"] = str(sandbox / "work" / "home")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from vitft_app.data import ensure_example_dataset
    from vitft_app.jobs import JobRunner
    from vitft_app.ui import data_tab, evaluate_tab, predict_tab, train_tab
    from vitft_app.ui.app import AppContext, AppSettings

    data = sandbox / "data"
    digits = ensure_example_dataset(sandbox / "work" / "example", per_class=20)
    small = data / "digits"
    for name in ("0", "1", "7"):
        shutil.copytree(digits / name, small / name)
    model = tiny_model(data / "tiny-vit", ["0", "1", "7"])
    outside = sandbox / "work" / "outside"
    outside.mkdir(parents=True)
    (outside / "secret.png").write_bytes((small / "0" / sorted(os.listdir(small / "0"))[0]).read_bytes())
    runs = sandbox / "runs"
    confined = AppSettings(data_root=data, runs_dir=runs, example_dir=digits, device="cpu")
    local = AppSettings(data_root=data, runs_dir=runs, example_dir=digits, device="cpu", confined=False)
    ctx = AppContext(settings=confined, runner=JobRunner(runs, device="cpu"))
    run = Runner(sandbox)
    started = time.time()

    # --- A. bad images: prediction (drop zone), scan, CLI predict ------------------------------------
    images = bad_images(data / "bad-images")
    for name, path in images.items():
        def predict_one(path=path):
            result = predict_tab.predict_files(ctx, str(model), [str(path)], 3)[0]
            return (result.get("error") or f"predicted {result['answer']}"), "error" not in result
        run.case(f"image/{name}: drop zone", predict_one)
    image_dataset = data / "bad-image-dataset"
    for cls in ("a", "b"):
        (image_dataset / cls).mkdir(parents=True)
        for name, path in images.items():
            shutil.copy(path, image_dataset / cls / name)
        for i in range(3):
            shutil.copy(small / "0" / sorted(os.listdir(small / "0"))[i], image_dataset / cls / f"ok{i}.png")
    run.case("image/all bad images in a dataset: scan", lambda: (
        data_tab.scan_folder(str(image_dataset), confined)["summary"], True))
    run.case("image/bad images: CLI predict", lambda: cli_text(
        cli("predict", "--model", str(model), *map(str, images.values()), cwd=sandbox / "work"), ok_codes=(1,)))

    def huge_webcam():
        import gradio as gr
        from gradio.data_classes import ImageData

        buffer = io.BytesIO()
        from PIL import Image

        Image.new("L", (12000, 9000)).save(buffer, "PNG")  # 108 MP
        payload = ImageData(url="data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        try:
            predict_tab.PixelCheckedImage(sources=["webcam"], type="filepath").preprocess(payload)
        except gr.Error as exc:
            return exc.message, False
        return "accepted a 108 MP webcam image", True
    run.case("image/108 MP webcam photo", huge_webcam)

    # --- B. hostile zips: dataset upload and batch prediction ------------------------------------------
    zips = bad_zips(sandbox / "work" / "zips", small / "0" / sorted(os.listdir(small / "0"))[0])
    for name, path in zips.items():
        run.case(f"zip/{name}: dataset upload", lambda path=path: (
            lambda r: (r[1], r[1].startswith("📦")))(data_tab.receive_upload(str(path), confined)))
        run.case(f"zip/{name}: batch prediction", lambda path=path: (
            lambda r: (r[2], r[2].startswith("✅")))(predict_tab.predict_batch(ctx, str(model), None, str(path), 3, 0.0, False)))
    run.case("zip/not a .zip name", lambda: (data_tab.receive_upload(str(images["text.jpg"]), confined)[1], False))
    quota = AppSettings(data_root=data, runs_dir=runs, example_dir=digits, uploads_quota_bytes=1000)
    run.case("zip/over the uploads quota", lambda: (data_tab.receive_upload(str(zips["good.zip"]), quota)[1], False))
    one = str(images["one-pixel.png"])
    for label, relpaths in (("numbers", "[1, 2]"), ("object", '{"a": 1}'), ("nulls", "[null, null]"),
                            ("not json", "{{{"), ("traversal", '["../../x.png", "a/b.png"]'),
                            ("absolute", '["/etc/x.png", "a/b.png"]'), ("count mismatch", '["a/b.png"]'),
                            ("empty names", '["", ""]')):
        run.case(f"folder upload/{label}", lambda relpaths=relpaths: (
            data_tab.receive_folder([one, one], relpaths, confined)[1], False))

    # --- C. path tricks -----------------------------------------------------------------------------
    (data / "link-out").symlink_to(outside, target_is_directory=True)
    for text in ("/etc", "../../", "/proc/self/cwd", "/proc/self/root/etc", "/sys/kernel", "/dev", "~root", "~",
                 str(data / "link-out"), "digits/../../work", "a\x00b", "", "   ", "/nonexistent/folder",
                 str(images["text.jpg"])):
        run.case(f"path/dataset box {text!r} (confined)", lambda text=text: (
            data_tab.scan_folder(text, confined)["summary"], False))
    for text in ("/proc/self/cwd", "/nonexistent", "/etc"):
        run.case(f"path/dataset box {text!r} (local app)", lambda text=text: (
            lambda s: (s, not s.startswith("❌")))(data_tab.scan_folder(text, local)["summary"]))
    for text in ("/etc", "/etc/missing", "../../etc", "/proc/self/root", "~", "./", str(outside), "a/b/c/d"):
        def model_box(text=text):
            message, _ = train_tab.start_run(ctx, {"model": text, "epochs": 1.0, "precision": "fp32"}, str(small))
            if "/proc/" in message and str(os.getpid()) in message:
                return "leaked the server pid: " + message, False
            return message, False
        run.case(f"path/model box {text!r}", model_box)
        run.case(f"path/model info {text!r}", lambda text=text: (
            train_tab.model_info(text, None, 0, ["a", "b"], settings=confined)[1], False))
    batch = data / "batch"
    batch.mkdir()
    shutil.copy(images["one-pixel.png"], batch / "mine.png")
    (batch / "link.png").symlink_to(outside / "secret.png")

    def batch_symlink():
        table, _, message = predict_tab.predict_batch(ctx, str(model), str(batch), None, 3, 0.0, False)
        files = [] if table is None else table["file"].tolist()
        if "link.png" in files:
            return "read a symlink out of the data root: " + message, False
        return message, True
    run.case("path/batch folder with a symlink out", batch_symlink)
    (data / "labels.csv").write_text("path,label\ndigits/0/x.png,0\n")
    for text in ("/etc", str(data / "labels.csv"), str(data / "bad-images" / "empty.png"), "/proc/self/cwd"):
        run.case(f"path/batch folder {text!r}", lambda text=text: (
            predict_tab.predict_batch(ctx, str(model), text, None, 3, 0.0, False)[2], False))

    # --- F. corrupt run folders (CLI and app) ---------------------------------------------------------
    from vitft_app.config import TrainConfig

    base = TrainConfig(data_dir=str(small), model=str(model), epochs=1, batch_size=8, precision="fp32", augment="none",
                       output_dir=str(runs))

    # One real stopped run (stopped after its first evaluation: model, metrics and checkpoint), copied
    # for each kind of damage.
    from vitft_app.events import EvalDone

    template_runner = JobRunner(sandbox / "runs" / "template", device="cpu")
    job = template_runner.start(dataclasses.replace(base, epochs=3),
                                listener=lambda e: isinstance(e, EvalDone) and template_runner.stop())
    job.wait(600)
    template = job.run_dir

    def fake_run(name: str) -> Path:
        run_dir = runs / f"{template.name}-{re.sub(r'[^a-z0-9]+', '-', name.lower())}"
        shutil.copytree(template, run_dir)
        return run_dir

    class Evil:
        def __reduce__(self):
            return (open, (str(sandbox / "PWNED"), "w"))

    import torch

    damage: dict[str, Callable[[Path], None]] = {
        "config epochs 'three'": lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "epochs": "three"})),
        "config not JSON": lambda d: (d / "config.json").write_text("{nope"),
        "config is a list": lambda d: (d / "config.json").write_text("[]"),
        "config lr string": lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "lr": "fast"})),
        "config missing model": lambda d: (d / "config.json").write_text(
            json.dumps({k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "model"})),
        "status garbage": lambda d: (d / "status.json").write_text("\x00\x01"),
        "metrics garbage": lambda d: (d / "metrics.csv").write_text("a,b\n1,2,3,4\n\x00"),
        "weights truncated": lambda d: (d / "model" / "model.safetensors").write_bytes(
            (d / "model" / "model.safetensors").read_bytes()[:100]),
        "preprocessor []": lambda d: (d / "model" / "preprocessor_config.json").write_text("[]"),
        "model config garbage": lambda d: (d / "model" / "config.json").write_text("{"),
        "checkpoint garbage": lambda d: (d / "checkpoint.pt").write_bytes(b"garbage"),
        "checkpoint crafted pickle": lambda d: torch.save({"version": 2, "x": Evil()}, d / "checkpoint.pt"),
        "checkpoint missing keys": lambda d: torch.save({"version": 2}, d / "checkpoint.pt"),
        "checkpoint wrong version": lambda d: torch.save({"version": 99}, d / "checkpoint.pt"),
        "model folder deleted": lambda d: shutil.rmtree(d / "model"),
    }
    image = str(small / "0" / sorted(os.listdir(small / "0"))[0])
    for label, spoil in damage.items():
        run_dir = fake_run(label)
        spoil(run_dir)
        run.case(f"run/{label}: CLI resume", lambda d=run_dir: cli_text(cli("train", "--resume", str(d), cwd=sandbox / "work")))
        run.case(f"run/{label}: CLI evaluate", lambda d=run_dir: cli_text(cli("evaluate", str(d), cwd=sandbox / "work")))
        run.case(f"run/{label}: CLI predict", lambda d=run_dir: cli_text(
            cli("predict", "--model", str(d), image, cwd=sandbox / "work")))

        def app_resume(d=run_dir):
            message, resumed = train_tab.resume_run(ctx, str(d))
            if resumed:
                job = ctx.runner.current
                job.wait(300)
                status = json.loads((d / "status.json").read_text())
                if status.get("status") in ("starting", "running"):
                    raise StuckError(f"still {status['status']} after the job ended")
                return f"{message} -> {status.get('status')}: {status.get('error')}", status.get("status") != "failed"
            return message, False
        run.case(f"run/{label}: app Resume", app_resume)
        run.case(f"run/{label}: app Evaluate", lambda d=run_dir: (
            lambda r: (r["summary"] or "", not (r["summary"] or "").startswith("❌")))(
                evaluate_tab.run_evaluation(ctx, str(d), "val", 3)))
        run.case(f"run/{label}: app report", lambda d=run_dir: (
            lambda r: (r[1], r[1].startswith("📄")))(evaluate_tab.make_report(str(d))))
        run.case(f"run/{label}: app Predict", lambda d=run_dir: (
            lambda r: (r.get("error") or r.get("answer"), "error" not in r))(
                predict_tab.predict_files(ctx, str(d), [image], 3)[0]))
    if (sandbox / "PWNED").exists():
        run.outcomes.append(Outcome("run/crafted pickle executed", "outside", "PWNED created"))

    # --- H. absurd settings ------------------------------------------------------------------------------
    absurd = {"batch_size": 0, "lr": -1.0, "epochs": 0, "image_size": 1, "val_fraction": 2.0, "grad_accum_steps": 0,
              "freeze_depth": 999, "mixup": -1.0, "label_smoothing": 1.0, "num_workers": -1.0, "log_every_steps": 0,
              "weight_decay": -5.0, "warmup_ratio": 3.0, "ema_decay": 1.5, "patch_dropout": 1.0, "seed": 1.5,
              "early_stopping_patience": -2, "lr_nan": float("nan"), "lr_inf": float("inf"), "batch_size_big": 10**9}
    for field, value in absurd.items():
        name = field.split("_nan")[0].split("_inf")[0].replace("_big", "")
        values = {"model": "vit-tiny-scratch", "image_size": 32, "epochs": 1.0, "batch_size": 8.0, "precision": "fp32",
                  name: value}

        def start(values=values):
            message, run_dir = train_tab.start_run(ctx, values, str(small))
            if run_dir:
                ctx.runner.stop()
                ctx.runner.current.wait(300)
                status = json.loads((Path(run_dir) / "status.json").read_text())
                if status.get("status") in ("starting", "running"):
                    raise StuckError("still running after Stop")
                return f"{message} -> {status['status']} {status.get('error') or ''}", status["status"] != "failed"
            return message, False
        run.case(f"setting/{field}={value!r}: app Start", start)
    for flags in (["--batch-size", "0"], ["--lr", "nan"], ["--epochs", "-3"], ["--val-fraction", "1"],
                  ["--image-size", "100000"], ["--precision", "fp64"], ["--freeze-depth", "-1"]):
        run.case(f"setting/CLI train {' '.join(flags)}", lambda flags=flags: cli_text(cli(
            "train", "--data", str(small), "--model", "vit-tiny-scratch", "--output-dir", str(runs), *flags,
            cwd=sandbox / "work")))
    for flags in (["--val-fraction", "2"], ["--val-fraction", "-1"], ["--max-pixels", "0"]):
        run.case(f"setting/CLI scan {' '.join(flags)}", lambda flags=flags: cli_text(
            cli("scan", str(small), *flags, cwd=sandbox / "work")))
    (sandbox / "work" / "empty").mkdir()
    run.case("setting/CLI predict on a folder without images", lambda: cli_text(
        cli("predict", "--model", str(model), str(sandbox / "work" / "empty"), cwd=sandbox / "work")))

    if not args.quick:
        slow_cases(run, sandbox, ctx, small, model, runs)
    totals = run.totals()
    print(f"\n{len(run.outcomes)} cases in {time.time() - started:.0f} s: "
          f"{totals['message'] + totals['ok']} handled ({totals['message']} with a clear message, {totals['ok']} accepted),"
          f" {totals['traceback']} tracebacks, {totals['generic']} generic errors, {totals['stuck']} stuck states,"
          f" {totals['outside']} writes outside the allowed folders")
    if not args.keep:
        shutil.rmtree(sandbox, ignore_errors=True)
    return 0 if totals["traceback"] + totals["generic"] + totals["stuck"] + totals["outside"] == 0 else 1


def slow_cases(run: Runner, sandbox: Path, ctx: Any, small: Path, model: Path, runs: Path) -> None:
    """Full disk, SIGKILL, a deleted run folder, Ctrl-C, and a real app with --auth."""
    import torch

    from vitft_app.config import TrainConfig
    from vitft_app.jobs import JobRunner

    config = TrainConfig(data_dir=str(small), model=str(model), epochs=3, batch_size=16, precision="fp32",
                         augment="none", output_dir=str(runs))

    def full_disk(where: str) -> tuple[str, bool]:
        real = {"save": torch.save}
        from vitft_app import runs as runs_module
        real["model"] = runs_module.save_model_atomically
        calls = []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) >= 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return (real["save"] if where == "checkpoint" else real["model"])(*args, **kwargs)
        if where == "checkpoint":
            torch.save = failing
        else:
            import vitft_app.training.loop as training_module  # where the loop saves the best model
            training_module.save_model_atomically = failing
        try:
            runner = JobRunner(runs, device="cpu")
            job = runner.start(config)
            job.wait(300)
        finally:
            torch.save = real["save"]
            import vitft_app.training.loop as training_module
            training_module.save_model_atomically = real["model"]
        status = json.loads((job.run_dir / "status.json").read_text())
        if status["status"] in ("starting", "running") or runner.is_busy():
            raise StuckError(f"status {status['status']} after a full disk")
        leftovers = [p.name for p in job.run_dir.glob(".*tmp*")]
        if leftovers:
            return f"temp files left: {leftovers}", False
        resumed = runner.resume(job.run_dir)
        resumed.wait(300)
        after = json.loads((job.run_dir / "status.json").read_text())["status"]
        return f"{status['error']} -> resumed: {after}", False
    run.case("disk/full while writing the checkpoint", lambda: full_disk("checkpoint"))

    def sigkill() -> tuple[str, bool]:
        process = subprocess.Popen(
            [sys.executable, "-m", "vitft_app.cli", "train", "--data", str(small), "--model", str(model), "--epochs",
             "200", "--batch-size", "8", "--precision", "fp32", "--output-dir", str(runs / "killed")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=sandbox / "work")
        try:
            deadline = time.time() + 180
            while time.time() < deadline and not list((runs / "killed").glob("*/checkpoint.pt")):
                time.sleep(0.3)
        finally:
            process.kill()
            process.wait(30)
        run_dir = next((runs / "killed").glob("*/config.json")).parent
        from vitft_app.runs import read_status

        status = read_status(run_dir)["status"]
        if status != "interrupted":
            raise StuckError(f"a SIGKILLed run reads as {status}")
        runner = JobRunner(runs / "killed", device="cpu")
        job = runner.resume(run_dir)
        time.sleep(3)
        runner.stop()
        job.wait(300)
        return f"interrupted, resumed, then {read_status(run_dir)['status']}", True
    run.case("kill/SIGKILL during training, then Resume", sigkill)

    def sigint_ignored() -> tuple[str, bool]:
        process = subprocess.Popen(
            [sys.executable, "-m", "vitft_app.cli", "train", "--data", str(small), "--model", str(model), "--epochs",
             "200", "--batch-size", "8", "--precision", "fp32", "--output-dir", str(runs / "ctrl-c")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=sandbox / "work",
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            deadline = time.time() + 180
            while time.time() < deadline and not list((runs / "ctrl-c").glob("*/metrics.csv")):
                time.sleep(0.3)
            process.send_signal(signal.SIGINT)
            try:
                out, err = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                raise StuckError("kill -INT did nothing (SIGINT ignored)") from None
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        return cli_text(subprocess.CompletedProcess([], process.returncode, out, err))
    run.case("kill/kill -INT of a background CLI run", sigint_ignored)

    def deleted_folder() -> tuple[str, bool]:
        process = subprocess.Popen(
            [sys.executable, "-m", "vitft_app.cli", "train", "--data", str(small), "--model", str(model), "--epochs",
             "200", "--batch-size", "8", "--precision", "fp32", "--output-dir", str(runs / "deleted"),
             "--log-every-steps", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=sandbox / "work")
        try:
            deadline = time.time() + 180
            while time.time() < deadline and not list((runs / "deleted").glob("*/metrics.csv")):
                time.sleep(0.3)
            shutil.rmtree(next((runs / "deleted").glob("*/metrics.csv")).parent)
            out, err = process.communicate(timeout=180)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        return cli_text(subprocess.CompletedProcess([], process.returncode, out, err))
    run.case("run/folder deleted while the CLI trains", deleted_folder)

    auth_cases(run, sandbox)


def auth_cases(run: Runner, sandbox: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(sandbox / "work" / "app.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "vitft_app.cli", "app", "--port", str(port), "--auth", "admin:s3cret", "--data-root",
         str(sandbox / "data"), "--runs-dir", str(sandbox / "runs"), "--no-browser"],
        cwd=sandbox / "work", stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"

    def request(path: str, data: bytes | None = None) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, data=data), timeout=30) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.5)
        time.sleep(2)
        secret = str(sandbox)

        def page() -> tuple[str, bool]:
            status, body = request("/")
            if "window.gradio_api_info = {};" not in body or secret in body:
                return f"the login page leaks (status {status}, api info or server paths present)", False
            return f"{status}: login page only", False
        run.case("auth/GET / without a login", page)
        for path in ("/config", "/gradio_api/info", "/gradio_api/info?all_endpoints=true", "/gradio_api/openapi.json",
                     "/openapi.json", "/docs", "/gradio_api/token", "/gradio_api/app_id", f"/gradio_api/file={secret}",
                     "/gradio_api/queue/data", "/gradio_api/run-history/records", "/gradio_api/vibe-code",
                     "/monitoring", "/gradio_api/upload_progress"):
            def probe(path=path) -> tuple[str, bool]:
                status, body = request(path)
                if status < 400 or secret in body:
                    return f"{status}: reachable without a login", False
                return f"{status}: refused", False
            run.case(f"auth/GET {path} without a login", probe)
        for path in ("/gradio_api/upload", "/gradio_api/queue/join", "/gradio_api/reset", "/gradio_api/cancel",
                     "/gradio_api/vibe-edit"):
            def post(path=path) -> tuple[str, bool]:
                status, body = request(path, b"{}")
                if status < 400:
                    return f"{status}: accepted without a login", False
                return f"{status}: refused", False
            run.case(f"auth/POST {path} without a login", post)

        def throttle() -> tuple[str, bool]:
            form = urllib.parse.urlencode({"username": "admin", "password": "guess"}).encode()
            codes = [request("/login", form)[0] for _ in range(7)]
            right = request("/login", urllib.parse.urlencode({"username": "admin", "password": "s3cret"}).encode())
            if 429 not in codes or right[0] != 429:
                return f"no throttling: {codes}, right password {right[0]}", False
            return f"failed logins {codes}; then {right[1]}", False
        run.case("auth/password guessing", throttle)
    finally:
        process.kill()
        process.wait(30)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
