"""Hardening (issue 13): hostile run folders, a full disk, hostile uploads, confinement, auth,
Ctrl-C and the smaller refusals. Each test fails on the code before the fix."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


# ---- 1. a checkpoint never runs code -------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    from vitft_app.checkpoint import ResumeError, load_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"version": 2, "loop": {}, "model": {}, "optimizer": {}, "scheduler": {}, "rng": {},
                "evil": _Payload(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match="nothing in it ran"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_crafted_checkpoint_is_called_crafted_and_random_or_cut_bytes_damaged(tmp_path, caplog):
    """Only a disallowed class or function is reported as a possible attack; random bytes, a cut
    file and an empty one are "damaged", in one message with no traceback logged at warning."""
    import logging
    import os

    from vitft_app.checkpoint import ResumeError, load_checkpoint

    torch.save({"version": 2, "loop": {}, "evil": _Payload(tmp_path / "pwned")}, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match="crafted to run code"):
        load_checkpoint(tmp_path)
    torch.save({"version": 2, "loop": {}, "weights": torch.ones(1000)}, tmp_path / "good.pt")
    damaged = {"random bytes": os.urandom(100_000), "cut": (tmp_path / "good.pt").read_bytes()[:5000], "empty": b""}
    for what, content in damaged.items():
        (tmp_path / "checkpoint.pt").write_bytes(content)
        with caplog.at_level(logging.WARNING, logger="vitft_app"), pytest.raises(ResumeError) as info:
            load_checkpoint(tmp_path)
        assert "damaged" in str(info.value) and "run code" not in str(info.value), (what, info.value)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no traceback on the CLI's stderr


def test_checkpoint_round_trip_is_tensors_and_plain_data(tmp_path):
    from vitft_app.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

    gen = torch.Generator().manual_seed(3)
    np.random.seed(5)
    random.seed(7)
    rng = capture_rng(gen)
    expected = (np.random.rand(), random.random(), torch.rand(1, generator=gen).item())
    save_checkpoint(tmp_path, {"loop": {"step": 4}, "model": {"w": torch.ones(2)}, "optimizer": {},
                               "scheduler": {}, "rng": rng})
    # the file loads with plain weights_only=True (no extra allowed types)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["loop"] == {"step": 4}
    restore_rng(load_checkpoint(tmp_path)["rng"], gen)
    assert (np.random.rand(), random.random(), torch.rand(1, generator=gen).item()) == expected


def test_checkpoint_of_the_previous_format_still_resumes(tmp_path):
    """Version 1 (before this fix) pickled NumPy's RNG keys as an ndarray: still read, with only
    the NumPy array types allowed."""
    from vitft_app.checkpoint import load_checkpoint, restore_rng

    gen = torch.Generator().manual_seed(1)
    np.random.seed(11)
    state = {"torch": torch.get_rng_state(), "cuda": [], "python": random.getstate(),
             "numpy": np.random.get_state(), "shuffle": gen.get_state()}
    expected = np.random.rand()
    torch.save({"version": 1, "loop": {"step": 1}, "model": {}, "optimizer": {}, "scheduler": {}, "rng": state},
               tmp_path / "checkpoint.pt")
    restore_rng(load_checkpoint(tmp_path)["rng"], gen)
    assert np.random.rand() == expected


# ---- 2. a full disk ends the run as failed, resumable -------------------------------------------


def _config(data, model, out, **overrides):
    from vitft_app.config import TrainConfig

    values = dict(data_dir=str(data), model=str(model), epochs=3, batch_size=16, lr=3e-3, precision="fp32",
                  augment="none", output_dir=str(out), num_workers=0, val_fraction=0.25)
    values.update(overrides)
    return TrainConfig(**values)


def test_disk_full_during_a_checkpoint_fails_the_run_cleanly_and_it_resumes(tmp_path, digits_small, tiny_vit,
                                                                            monkeypatch):
    from vitft_app.checkpoint import checkpoint_path, has_checkpoint, load_checkpoint
    from vitft_app.events import RunFailed, RunFinished
    from vitft_app.jobs import JobRunner
    from vitft_app.runs import read_status

    real_save, calls = torch.save, []

    def save_until_full(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:  # the epoch-2 checkpoint hits a full disk half-way
            handle.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    runner = JobRunner(tmp_path / "runs", device="cpu")
    seen = []
    job = runner.start(_config(digits_small, tiny_vit, tmp_path / "runs"), listener=seen.append)
    assert job.wait(300)
    assert isinstance(seen[-1], RunFailed), seen[-1]
    assert seen[-1].error.startswith("disk full while writing the checkpoint (") and " MB free in " in seen[-1].error
    status = read_status(job.run_dir)
    assert status["status"] == "failed" and status["error"] == seen[-1].error
    assert not runner.is_busy() and runner.stop() is False
    assert not list(job.run_dir.glob(".*tmp*"))  # no temp file left behind
    assert has_checkpoint(job.run_dir) and load_checkpoint(job.run_dir)["loop"]["epoch"] == 1  # epoch 1's
    assert (job.run_dir / "model" / "model.safetensors").is_file()

    monkeypatch.setattr(torch, "save", real_save)  # space freed: Resume continues from epoch 2
    seen.clear()
    job = runner.resume(job.run_dir, listener=seen.append)
    assert job.wait(300)
    assert isinstance(seen[-1], RunFinished) and seen[-1].status == "completed", seen[-1]
    assert not checkpoint_path(job.run_dir).exists()


def test_a_failed_status_write_still_leaves_no_running_run(tmp_path, digits_small, tiny_vit, monkeypatch):
    """Even when the disk is so full that the RunFailed status write fails too, the run does not
    stay "running": the runner settles it as failed, and Resume is not refused as still running."""
    from vitft_app import runs as runs_module
    from vitft_app.jobs import JobRunner
    from vitft_app.runs import read_status

    real_write, state = runs_module.atomic_write_text, {"full": False}

    def write(path, text):
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, text)

    real_save = torch.save

    def save_then_fill(obj, handle, *args, **kwargs):
        state["full"] = True
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs_module, "atomic_write_text", write)
    monkeypatch.setattr(torch, "save", save_then_fill)
    runner = JobRunner(tmp_path / "runs", device="cpu")
    # 2 epochs: the checkpoint after epoch 1 is the first torch.save (none follows the last epoch)
    job = runner.start(_config(digits_small, tiny_vit, tmp_path / "runs", epochs=2))
    assert job.wait(300)
    status = read_status(job.run_dir)
    assert status["status"] == "failed" and "disk full" in status["error"]
    monkeypatch.setattr(torch, "save", real_save)


def test_low_disk_space_is_warned_before_training(tmp_path, digits_small, tiny_vit, monkeypatch):
    import shutil as shutil_module

    from vitft_app.jobs import JobRunner

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=1024))
    runner = JobRunner(tmp_path / "runs", device="cpu")
    job = runner.start(_config(digits_small, tiny_vit, tmp_path / "runs", epochs=1))
    assert job.wait(300)
    log = (job.run_dir / "train.log").read_text()
    assert "warning: low disk space: about" in log


# ---- 3. upload limits that hold ------------------------------------------------------------------


def _zip_of_zeros(path: Path, members: int, size: int) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(members):
            archive.writestr(f"c/{i}.png", b"\0" * size)
    return path


def test_a_zip_bomb_split_into_1_mib_members_is_refused_before_writing(tmp_path):
    from vitft_app.uploads import UnsafeArchiveError, extract_zip

    bomb = _zip_of_zeros(tmp_path / "bomb.zip", 40, 1024 * 1024)  # 40 MiB from ~40 KiB
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        extract_zip(bomb, tmp_path / "uploads")
    assert list((tmp_path / "uploads").iterdir()) == []


def test_uploads_quota_and_free_space_are_checked_before_writing(tmp_path, monkeypatch):
    import shutil as shutil_module
    import zipfile

    from vitft_app.uploads import UnsafeArchiveError, copy_folder_upload, extract_zip

    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("d/a/1.png", os.urandom(300_000))
    first = extract_zip(archive, tmp_path / "uploads", quota_bytes=500_000)
    with pytest.raises(UnsafeArchiveError, match="--uploads-quota-mb"):
        extract_zip(archive, tmp_path / "uploads", quota_bytes=500_000)
    source = tmp_path / "x.png"
    source.write_bytes(os.urandom(300_000))
    with pytest.raises(UnsafeArchiveError, match="quota"):
        copy_folder_upload([str(source)], ["f/a/x.png"], tmp_path / "uploads", quota_bytes=500_000)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=100 * 1024**2))
    with pytest.raises(UnsafeArchiveError, match="not enough disk space"):
        extract_zip(archive, tmp_path / "uploads")
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == [first.parent.name]


def test_flags_for_upload_limits_are_in_the_help():
    result = subprocess.run([sys.executable, "-m", "vitft_app.cli", "app", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert "--uploads-quota-mb" in result.stdout and "--max-upload-mb" in result.stdout


def test_delete_an_upload_in_the_data_tab(tmp_path, digits_small):
    import zipfile

    from vitft_app.jobs import JobRunner
    from vitft_app.ui import data_tab
    from vitft_app.ui.app import AppContext, AppSettings

    settings = AppSettings(data_root=tmp_path, runs_dir=tmp_path / "runs", example_dir=tmp_path / "ex")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    archive = tmp_path / "digits.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for image in sorted((digits_small / "0").iterdir())[:3]:
            z.write(image, f"digits/0/{image.name}")
    folder, message = data_tab.receive_upload(str(archive), settings)
    choices = data_tab.upload_choices(settings)
    assert len(choices) == 1 and "MiB" in choices[0][0]
    update, message = data_tab.delete_upload_folder(ctx, choices[0][1])
    assert message.startswith("✓") and update["choices"] == [] and not Path(folder).exists()
    _, refused = data_tab.delete_upload_folder(ctx, str(digits_small))
    assert "Only uploaded datasets" in refused and digits_small.exists()


# ---- 4. every bad zip gets a clear message -------------------------------------------------------


def _bad_zips(tmp_path: Path) -> dict[str, Path]:
    import struct
    import warnings
    import zipfile

    made = {}
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("d/a/1.png", b"x" * 5000)
    data = bytearray(good.read_bytes())
    # bad CRC: flip a byte of the compressed data (after the 30-byte local header and the name)
    crc = bytearray(data)
    crc[30 + len("d/a/1.png") + 3] ^= 0xFF
    made["bad crc"] = tmp_path / "crc.zip"
    made["bad crc"].write_bytes(bytes(crc))
    # encryption flag set in the local and the central header
    enc = bytearray(data)
    enc[6] |= 1
    central = enc.rfind(b"PK\x01\x02")
    enc[central + 8] |= 1
    made["encrypted"] = tmp_path / "enc.zip"
    made["encrypted"].write_bytes(bytes(enc))
    # an unknown compression method (99) in both headers
    method = bytearray(data)
    method[8:10] = struct.pack("<H", 77)
    method[central + 10:central + 12] = struct.pack("<H", 77)
    made["method"] = tmp_path / "method.zip"
    made["method"].write_bytes(bytes(method))
    # the header understates the member's size
    short = bytearray(data)
    short[central + 24:central + 28] = struct.pack("<I", 10)
    short[22:26] = struct.pack("<I", 10)
    made["understated"] = tmp_path / "short.zip"
    made["understated"].write_bytes(bytes(short))
    made["not a zip"] = tmp_path / "junk.zip"
    made["not a zip"].write_bytes(b"PK\x03\x04 nothing else")
    # names the file system refuses: a member that is a file and a folder, a 300-byte name
    for kind, names in (("file then folder", ["d/a", "d/a/1.png"]), ("folder then file", ["d/a/", "d/a"]),
                        ("long name", ["d/" + "x" * 300 + ".png"]), ("long path", ["/".join(["d" * 200] * 25) + "/1.png"]),
                        ("same member twice", ["d/a/1.png", "d/a/1.png"])):
        made[kind] = tmp_path / f"{kind.replace(' ', '-')}.zip"
        with zipfile.ZipFile(made[kind], "w") as z, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
            for name in names:
                z.writestr(name, b"" if name.endswith("/") else b"x")
    return made


def test_every_bad_zip_is_a_one_line_message_in_upload_and_batch_prediction(tmp_path, tiny_vit):
    from vitft_app.jobs import JobRunner
    from vitft_app.ui import data_tab, predict_tab
    from vitft_app.ui.app import AppContext, AppSettings

    settings = AppSettings(data_root=tmp_path, runs_dir=tmp_path / "runs", example_dir=tmp_path / "ex", device="cpu")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    for kind, archive in _bad_zips(tmp_path).items():
        value, message = data_tab.receive_upload(str(archive), settings)
        assert message.startswith("✗ ") and "\n" not in message and "Traceback" not in message, (kind, message)
        assert str(tmp_path) not in message and "Errno" not in message, (kind, message)
        _, _, batch = predict_tab.predict_batch(ctx, str(tiny_vit), None, str(archive), 3, 0.0, False)
        assert batch.startswith("✗ ") and "\n" not in batch, (kind, batch)
    assert not [p for p in (tmp_path / "uploads").iterdir()]  # nothing left behind


def test_folder_upload_with_paths_that_are_not_strings_is_a_message(tmp_path):
    from vitft_app.ui import data_tab
    from vitft_app.ui.app import AppSettings

    settings = AppSettings(data_root=tmp_path, runs_dir=tmp_path / "runs", example_dir=tmp_path / "ex")
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    for relpaths in ("[1, 2]", '{"a": 1}', "[null]", "not json"):
        _, message = data_tab.receive_folder([str(image), str(image)], relpaths, settings)
        assert message.startswith("✗ "), relpaths


# ---- 5. confinement everywhere; the data-root rule per host (issue 17 item 5) --------------------


def test_the_data_root_rule_per_host():
    from vitft_app.confine import is_confined

    assert not is_confined("127.0.0.1", None, data_root_given=False)  # a local app: any readable folder
    assert not is_confined("localhost", None, data_root_given=False)
    assert not is_confined("::1", None, data_root_given=False)
    assert is_confined("127.0.0.1", None, data_root_given=True)
    assert is_confined("127.0.0.1", ("u", "p"), data_root_given=False)
    assert is_confined("0.0.0.0", None, data_root_given=False)
    assert is_confined("192.168.1.5", None, data_root_given=False)


def test_confined_app_refuses_paths_outside_and_names_the_flag(tmp_path, digits_small):
    from vitft_app.ui import data_tab
    from vitft_app.ui.app import AppSettings

    confined = AppSettings(data_root=digits_small.parent, runs_dir=tmp_path / "runs", example_dir=tmp_path / "ex")
    local = AppSettings(data_root=tmp_path / "home", runs_dir=tmp_path / "runs", example_dir=tmp_path / "ex",
                        confined=False)
    with pytest.raises(ValueError, match="--data-root") as refused:
        data_tab.resolve_data_path("/usr", confined)
    assert "'/usr'" in str(refused.value)
    assert data_tab.resolve_data_path(str(digits_small), local) == digits_small.resolve()  # any readable folder
    for system in ("/proc/self/cwd", "/proc", "/sys/kernel"):
        for settings in (confined, local):
            with pytest.raises(ValueError) as refused:
                data_tab.resolve_data_path(system, settings)
            assert f"/proc/{os.getpid()}" not in str(refused.value) and "system folder" in str(refused.value)


def test_model_box_accepts_only_the_data_root_and_runs_folder_and_reveals_no_paths(tmp_path, digits_small, tiny_vit):
    from vitft_app.confine import PathNotAllowed
    from vitft_app.jobs import JobRunner
    from vitft_app.ui import train_tab
    from vitft_app.ui.app import AppContext, AppSettings

    settings = AppSettings(data_root=digits_small.parent, runs_dir=tmp_path / "runs", example_dir=tmp_path / "ex",
                           device="cpu")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    values = {"model": "/etc", "epochs": 1.0, "batch_size": 8.0, "precision": "fp32"}
    existing, _ = train_tab.start_run(ctx, values, str(digits_small))
    missing, _ = train_tab.start_run(ctx, {**values, "model": "/etc/no-such-model"}, str(digits_small))
    assert "outside the data root" in existing and "--data-root" in existing
    assert existing.replace("/etc", "X") == missing.replace("/etc/no-such-model", "X")  # no existence oracle
    assert "Unrecognized" not in existing
    _, info = train_tab.model_info("/etc", None, 0, ["a", "b"], settings=settings)
    assert "outside the data root" in info
    with pytest.raises(PathNotAllowed):
        settings.check_model(str(tiny_vit))  # a model folder outside the data root and the runs folder
    import shutil

    inside = Path(shutil.copytree(tiny_vit, digits_small.parent / "models" / "tiny"))
    assert settings.check_model(str(inside)) == str(inside.resolve())
    assert settings.check_model("google/vit-base-patch16-224") == "google/vit-base-patch16-224"  # a Hub id
    assert settings.check_model("vit-tiny-scratch") == "vit-tiny-scratch"


def test_batch_prediction_does_not_follow_a_symlink_out_of_the_data_root(tmp_path, digits_small, tiny_vit):
    import shutil

    from vitft_app.jobs import JobRunner
    from vitft_app.ui import predict_tab
    from vitft_app.ui.app import AppContext, AppSettings

    root = tmp_path / "root"
    (root / "batch").mkdir(parents=True)
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    first = sorted((digits_small / "0").iterdir())[0]
    shutil.copy(first, secret)
    shutil.copy(first, root / "batch" / "mine.png")
    (root / "batch" / "link.png").symlink_to(secret)
    (root / "batch" / "linked-dir").symlink_to(secret.parent, target_is_directory=True)
    (root / "labels.csv").write_text("path,label\nbatch/mine.png,0\n")
    settings = AppSettings(data_root=root, runs_dir=tmp_path / "runs", example_dir=tmp_path / "ex", device="cpu")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    table, _, message = predict_tab.predict_batch(ctx, str(tiny_vit), str(root / "batch"), None, 2, 0.0, False)
    assert table["file"].tolist() == ["mine.png"], message
    _, _, csv_message = predict_tab.predict_batch(ctx, str(tiny_vit), str(root / "labels.csv"), None, 2, 0.0, False)
    assert csv_message.startswith("✗") and "folder of images" in csv_message


# ---- 6. auth that does not leak, and login throttling -------------------------------------------


def test_login_throttle_waits_longer_after_each_failure():
    from vitft_app.server import LoginThrottle

    now = [0.0]
    throttle = LoginThrottle(free_failures=3, base_delay_s=10, max_delay_s=35, clock=lambda: now[0])
    for _ in range(2):
        throttle.failed("a")
        assert throttle.wait_s("a") == 0
    throttle.failed("a")
    assert throttle.wait_s("a") == 10 and throttle.wait_s("b") == 0
    now[0] = 10
    throttle.failed("a")
    assert throttle.wait_s("a") == 20
    throttle.failed("a")
    assert throttle.wait_s("a") == 35  # capped
    throttle.succeeded("a")
    assert throttle.wait_s("a") == 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_with_auth_an_unauthenticated_client_gets_only_the_login_page(tmp_path):
    import socket
    import time
    import urllib.error
    import urllib.parse
    import urllib.request

    data_root = tmp_path / "secret-data-root"
    data_root.mkdir()
    port = _free_port()
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "vitft_app.cli", "app", "--port", str(port), "--auth", "admin:s3cret", "--data-root",
         str(data_root), "--runs-dir", str(tmp_path / "runs"), "--no-browser"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    base = f"http://127.0.0.1:{port}"

    def request(path, data=None, cookie=None):
        req = urllib.request.Request(base + path, data=data)
        if cookie:
            req.add_header("Cookie", cookie)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, response.read().decode(), response.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), exc.headers

    def login(password):
        return request("/login", urllib.parse.urlencode({"username": "admin", "password": password}).encode())

    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert process.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("app did not start")
        status, page, _ = request("/")
        assert status == 200 and "window.gradio_api_info = {};" in page
        assert str(data_root) not in page and str(tmp_path) not in page and "/gradio_api/" not in page.split("gradio_api_info")[1][:50]
        for path in ("/config", "/gradio_api/info", "/gradio_api/app_id", "/openapi.json", "/gradio_api/token",
                     "/gradio_api/upload", f"/gradio_api/file={data_root}"):
            code, body, _ = request(path)
            assert code in (401, 404, 405), (path, code, body[:200])
            assert str(data_root) not in body
        status, _, headers = login("s3cret")
        assert status == 200
        cookie = "; ".join(c.split(";")[0] for c in headers.get_all("set-cookie"))
        status, page, _ = request("/", cookie=cookie)
        assert status == 200 and "window.gradio_api_info = {};" not in page  # logged in: the full app
        codes = [login("wrong")[0] for _ in range(6)]
        assert codes[:5] == [400] * 5 and codes[5] == 429
        status, body, headers = login("s3cret")  # even the right password waits now
        assert status == 429 and "try again in" in body and int(headers["retry-after"]) > 0
    finally:
        process.kill()
        process.wait(30)
        log.close()


# ---- 7. damaged run folders: one line naming the file ---------------------------------------------


@pytest.fixture
def finished_run(tmp_path, digits_small, tiny_vit):
    from vitft_app.jobs import JobRunner

    runner = JobRunner(tmp_path / "runs", device="cpu")
    job = runner.start(_config(digits_small, tiny_vit, tmp_path / "runs", epochs=1))
    assert job.wait(300)
    return job.run_dir


def test_damaged_config_json_is_one_line_in_resume_and_evaluate(tmp_path, finished_run, vitft_here):
    from vitft_app.checkpoint import save_checkpoint

    config = json.loads((finished_run / "config.json").read_text())
    (finished_run / "config.json").write_text(json.dumps({**config, "epochs": "three"}))
    save_checkpoint(finished_run, {"loop": {}, "model": {}, "optimizer": {}, "scheduler": {}, "rng": {}})
    for args in (("train", "--resume", str(finished_run)), ("evaluate", str(finished_run))):
        result = vitft_here(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "config.json is damaged (epochs must be a whole number, got 'three')" \
            in result.stderr, (args, result.stderr[-2000:])


def test_damaged_model_files_are_one_line_in_predict_and_evaluate(tmp_path, finished_run, digits_small, vitft_here):
    from vitft_app.checkpoint import save_checkpoint

    image = str(sorted((digits_small / "0").iterdir())[0])
    weights = finished_run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for args in (("predict", "--model", str(finished_run), image), ("evaluate", str(finished_run))):
        result = vitft_here(*args, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        assert "is damaged (config.json / model.safetensors" in result.stderr, result.stderr[-2000:]
        # a completed run deleted its checkpoint: it cannot be resumed, so the message does not say to
        assert "has no checkpoint to resume from: train it again" in result.stderr, result.stderr[-2000:]
    (finished_run / "model" / "preprocessor_config.json").write_text("[]")
    save_checkpoint(finished_run, {"loop": {}})  # a stopped run keeps its checkpoint: resume saves a new model
    result = vitft_here("predict", "--model", str(finished_run / "model"), image, cwd=tmp_path)
    assert result.returncode == 2 and "is damaged (preprocessor_config.json" in result.stderr, result.stderr[-2000:]
    assert f"resume run {finished_run.name} from its last checkpoint" in result.stderr, result.stderr[-2000:]


def test_a_missing_model_of_an_ended_run_says_what_to_do(tmp_path):
    from vitft_app.predict import Predictor

    run = tmp_path / "run1"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "status.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from: train it again"):
        Predictor(run)


def test_app_resume_of_an_unreadable_checkpoint_says_so_at_once_and_report_is_a_message(tmp_path, finished_run):
    from vitft_app.jobs import JobRunner
    from vitft_app.runs import RunRecorder, read_status
    from vitft_app.ui import evaluate_tab, train_tab
    from vitft_app.ui.app import AppContext, AppSettings

    settings = AppSettings(data_root=tmp_path, runs_dir=finished_run.parent, example_dir=tmp_path / "ex",
                           device="cpu")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    RunRecorder(finished_run).write_status(status="stopped")
    (finished_run / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    message, resumed = train_tab.resume_run(ctx, str(finished_run))
    assert message.startswith("✗") and "damaged" in message and resumed is None
    assert read_status(finished_run)["status"] == "stopped" and ctx.runner.current is None
    (finished_run / "metrics.csv").write_text("kind,step\n\x00\x00garbage,\n")
    (finished_run / "status.json").write_text("[1, 2]")
    file, text = evaluate_tab.make_report(str(finished_run))
    assert text.startswith(("✗", "📄")) and "Error" != text


def test_run_folder_deleted_while_training_is_one_line_in_the_cli(tmp_path, digits_small, tiny_vit):
    import shutil
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "vitft_app.cli", "train", "--data", str(digits_small), "--model", str(tiny_vit),
         "--epochs", "500", "--batch-size", "8", "--precision", "fp32", "--output-dir", str(tmp_path / "runs"),
         "--log-every-steps", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.time() + 120
        runs = []
        while time.time() < deadline and not runs:
            runs = list((tmp_path / "runs").glob("*/metrics.csv")) if (tmp_path / "runs").exists() else []
            time.sleep(0.2)
        assert runs, "training did not start"
        for _ in range(20):  # the run may write a file while the folder is being removed: remove again
            shutil.rmtree(runs[0].parent, ignore_errors=True)
            if not runs[0].parent.exists():
                break
            time.sleep(0.05)
        assert not runs[0].parent.exists()
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert process.returncode == 1
    assert "Traceback" not in err and "was deleted or moved while training" in err, err[-2000:]


# ---- 8. Ctrl-C works even when the shell started the CLI with SIGINT ignored ----------------------


def test_sigint_stops_a_cli_run_started_with_sigint_ignored(tmp_path, digits_small, tiny_vit):
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "vitft_app.cli", "train", "--data", str(digits_small), "--model", str(tiny_vit),
         "--epochs", "500", "--batch-size", "8", "--precision", "fp32", "--output-dir", str(tmp_path / "runs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # what `cmd &` in a script does
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob("runs/*/metrics.csv")):
            time.sleep(0.2)
        assert list(tmp_path.glob("runs/*/metrics.csv")), "training did not start"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert process.returncode == 0, err[-2000:]
    assert json.loads((Path(out.strip().splitlines()[-1]) / "status.json").read_text())["status"] == "stopped"


# ---- 9. the smaller ones ---------------------------------------------------------------------------


def test_scan_refuses_a_val_fraction_train_would_refuse(tmp_path, digits_small, vitft_here):
    for value in ("2", "-1", "0"):
        result = vitft_here("scan", str(digits_small), "--val-fraction", value, cwd=tmp_path)
        assert result.returncode == 2 and "--val-fraction must be in (0, 1)" in result.stderr


def test_predict_on_a_folder_without_images_says_so(tmp_path, tiny_vit, vitft_here):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    result = vitft_here("predict", "--model", str(tiny_vit), str(tmp_path / "empty"), cwd=tmp_path)
    assert result.returncode == 1 and "no image files in" in result.stderr and result.stdout == ""


def test_scans_leave_no_temp_folder_each(tmp_path, digits_small):
    import tempfile

    from vitft_app.ui import data_tab
    from vitft_app.ui.app import AppSettings

    settings = AppSettings(data_root=digits_small.parent, runs_dir=tmp_path / "runs", example_dir=tmp_path / "ex")
    before = set(Path(tempfile.gettempdir()).glob("vitft-*"))
    first = data_tab.scan_folder(str(digits_small), settings)["csv"]
    for _ in range(3):
        assert data_tab.scan_folder(str(digits_small), settings)["csv"] == first
    assert len(set(Path(tempfile.gettempdir()).glob("vitft-*")) - before) <= 1


def test_imbalance_is_checked_per_split(tmp_path, digits_root):
    import shutil

    from vitft_app.data import scan_dataset

    root = tmp_path / "given"
    for split, counts in (("train", {"0": 12, "1": 81}), ("val", {"0": 81, "1": 12})):
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for path in sorted((digits_root / name).iterdir())[:n]:
                shutil.copy(path, root / split / name / path.name)
    report = scan_dataset(root, cache=None)
    assert any(w.startswith("Class imbalance in the training split 6.8:1") for w in report.warnings), report.warnings


def test_webcam_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    import gradio as gr
    from PIL import Image

    from vitft_app.ui.predict_tab import check_image_header

    big = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(big)

    class Payload:
        url = None
        path = str(big)

    with pytest.raises(gr.Error, match="4000x3000"):
        check_image_header(Payload(), max_pixels=10_000_000)
    check_image_header(Payload(), max_pixels=20_000_000)  # under the limit: passes


def test_an_infinite_learning_rate_is_refused():
    from vitft_app.config import TrainConfig

    with pytest.raises(ValueError, match="lr must be finite, got inf"):
        TrainConfig(data_dir="x", lr=float("inf"))
